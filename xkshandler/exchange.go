package xkshandler

import (
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// exchange is the state of one XKS call, for the response, the audit line
// and the metrics.
type exchange struct {
	start           time.Time
	ks              *KeyStore
	op              operation
	keyID           string
	akid            string
	requestMetadata *xksapi.RequestMetadata
	rule            string // the authorization rule that decided, if any
	hsmTime         time.Duration
	elapsed         time.Duration
	err             *xksError
	response        any
	// healthReason says why a GetHealthStatus reports a backend that is
	// not ACTIVE.
	healthReason string
}

// auditKeys are the audit line's names of the requestMetadata fields, in
// the order of RequestMetadata.Fields: their JSON keys in snake case
// (kmsRequestId is kms_request_id).
var auditKeys = func() []string {
	fields := (&xksapi.RequestMetadata{}).Fields()
	keys := make([]string, 0, len(fields))
	for _, f := range fields {
		var b strings.Builder
		for _, c := range f.Key {
			if 'A' <= c && c <= 'Z' {
				b.WriteByte('_')
				c += 'a' - 'A'
			}
			b.WriteRune(c)
		}
		keys = append(keys, b.String())
	}
	return keys
}()

// log writes the audit line of the call. It names who asked for what and
// how it ended; it never carries plaintext, AAD, secrets or signatures.
func (x *exchange) log(audit *zap.Logger) {
	line := frontend.AuditLine{
		Message:   "xks request",
		Operation: x.op.String(),
		Outcome:   "ok",
		Key:       x.keyID,
		Rule:      x.rule,
		Reason:    x.healthReason,
		HSMTime:   x.hsmTime,
		Total:     x.elapsed,
	}
	if x.ks != nil {
		line.KeyStore = x.ks.URIPath
	}
	if x.err != nil {
		line.Outcome, line.Failed = x.err.name, x.err.httpStatus() >= 500
		if x.err.cause != nil {
			line.Reason = x.err.cause.Error()
		}
	}
	if x.akid != "" {
		line.Fields = append(line.Fields, zap.String("access_key_id", x.akid))
	}
	if m := x.requestMetadata; m != nil {
		for i, f := range m.Fields() {
			line.Fields = append(line.Fields, zap.String(auditKeys[i], f.Value))
		}
	}
	line.Write(audit)
}

// observe counts the call in the handler's metrics.
func (x *exchange) observe() {
	ks, outcome := "", "ok"
	if x.ks != nil {
		ks = x.ks.URIPath
	}
	var deniedBy *string
	if x.err != nil {
		outcome = x.err.name
		if x.err.name == xksapi.AccessDeniedException {
			deniedBy = &x.rule
		}
	}
	metrics.requests.Observe(ks, x.op.String(), outcome, x.elapsed, x.hsmTime, deniedBy)
}
