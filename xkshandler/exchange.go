package xkshandler

import (
	"strings"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

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
	outcome := "ok"
	level := zapcore.InfoLevel
	if x.err != nil {
		outcome = x.err.name
		if x.err.httpStatus() >= 500 {
			level = zapcore.ErrorLevel
		}
	}
	ce := audit.Check(level, "xks request")
	if ce == nil {
		return
	}
	fields := make([]zap.Field, 0, 16)
	fields = append(fields, zap.String("operation", x.op.String()), zap.String("outcome", outcome))
	if x.ks != nil {
		fields = append(fields, zap.String("key_store", x.ks.URIPath))
	}
	if x.keyID != "" {
		fields = append(fields, zap.String("external_key_id", x.keyID))
	}
	if x.akid != "" {
		fields = append(fields, zap.String("access_key_id", x.akid))
	}
	if m := x.requestMetadata; m != nil {
		for i, f := range m.Fields() {
			fields = append(fields, zap.String(auditKeys[i], f.Value))
		}
	}
	if x.rule != "" {
		fields = append(fields, zap.String("authz_rule", x.rule))
	}
	switch {
	case x.err != nil && x.err.cause != nil:
		fields = append(fields, zap.String("reason", x.err.cause.Error()))
	case x.healthReason != "":
		fields = append(fields, zap.String("reason", x.healthReason))
	}
	fields = append(fields, zap.Duration("hsm_time", x.hsmTime), zap.Duration("total_time", x.elapsed))
	ce.Write(fields...)
}

// observe counts the call in the handler's metrics.
func (x *exchange) observe() {
	ks, op := "", x.op.String()
	if x.ks != nil {
		ks = x.ks.URIPath
	}
	outcome := "ok"
	if x.err != nil {
		outcome = x.err.name
	}
	metrics.requests.WithLabelValues(ks, op, outcome).Inc()
	metrics.duration.WithLabelValues(ks, op).Observe(x.elapsed.Seconds())
	if x.hsmTime > 0 {
		metrics.hsmDuration.WithLabelValues(ks, op).Observe(x.hsmTime.Seconds())
	}
	if x.err != nil && x.err.name == AccessDeniedException {
		metrics.authzDenied.WithLabelValues(ks, x.rule).Inc()
	}
}
