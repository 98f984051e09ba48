package ekmhandler

import (
	"time"

	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/frontend"
)

// exchange is the state of one EKM call, for the response, the audit line
// and the metrics.
type exchange struct {
	start   time.Time
	ks      *KeyStore
	op      operation
	keyName string
	client  string      // the client certificate's subject, once accepted
	req     *ekmRequest // once decoded
	bodyLen int
	rule    string // the authorization rule that decided, if any
	denied  bool
	hsmTime time.Duration
	elapsed time.Duration
	status  int
	err     *ekmError
	// response is the answer's body when the call succeeded.
	response any
	// healthReason says why an info call found a backend that is not
	// ACTIVE.
	healthReason string
}

// log writes the audit line of the call, with every field of the
// request_context, so that it can be matched with Managed HSM's own logs.
// It never carries a value, wrapped or not.
func (x *exchange) log(audit *zap.Logger) {
	line := frontend.AuditLine{
		Message:   "ekm request",
		Operation: x.op.String(),
		Outcome:   "ok",
		Key:       x.keyName,
		Rule:      x.rule,
		HSMTime:   x.hsmTime,
		Total:     x.elapsed,
	}
	if x.ks != nil {
		line.KeyStore = x.ks.name()
	}
	line.Fields = append(line.Fields, zap.Int("status", x.status))
	if x.client != "" {
		line.Fields = append(line.Fields, zap.String("client_subject", x.client))
	}
	if r := x.req; r != nil {
		line.Fields = append(line.Fields, zap.String("request_id", r.context.RequestID),
			zap.String("correlation_id", r.context.CorrelationID), zap.String("pool_name", r.context.PoolName))
		if r.alg != "" {
			line.Fields = append(line.Fields, zap.String("alg", r.alg), zap.Int("value_bytes", len(r.value)))
		}
	}
	switch {
	case x.err != nil:
		line.Outcome, line.Failed = x.err.code, x.status >= 500
		if x.err.cause != nil {
			line.Reason = x.err.cause.Error()
		}
	case x.healthReason != "":
		line.Reason = x.healthReason
	}
	line.Write(audit)
}

// observe counts the call in the handler's metrics.
func (x *exchange) observe() {
	ks, outcome := "", "ok"
	if x.ks != nil {
		ks = x.ks.name()
	}
	if x.err != nil {
		outcome = x.err.code
	}
	var deniedBy *string
	if x.denied {
		deniedBy = &x.rule
	}
	metrics().Observe(ks, x.op.String(), outcome, x.elapsed, x.hsmTime, deniedBy)
}
