package frontend

import (
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// AuditLine is the audit line of one call: who asked for what and how it
// ended. It never carries key material, plaintext, secrets or signatures.
type AuditLine struct {
	// Message is the line's message, e.g. "xks request".
	Message   string
	Operation string
	// Outcome is "ok" or the API's error name; Failed is true for an
	// error the proxy answered with a 5xx status, logged at ERROR.
	Outcome string
	Failed  bool
	// KeyStore and Key name the key store and the external key id, "" when
	// the call had none.
	KeyStore, Key string
	// Fields are the API's own, after the key.
	Fields []zap.Field
	// Rule is the authorization rule that decided, if any.
	Rule string
	// Reason says why the call failed (the cause the client is not told)
	// or, for a health call, why a backend is not ACTIVE.
	Reason string
	// HSMTime is the time spent on HSM work, Total the whole call's.
	HSMTime, Total time.Duration
}

// Write writes the line to audit, at INFO, or at ERROR for a call that
// failed with a 5xx status.
func (a *AuditLine) Write(audit *zap.Logger) {
	level := zapcore.InfoLevel
	if a.Failed {
		level = zapcore.ErrorLevel
	}
	ce := audit.Check(level, a.Message)
	if ce == nil {
		return
	}
	fields := make([]zap.Field, 0, 8+len(a.Fields))
	fields = append(fields, zap.String("operation", a.Operation), zap.String("outcome", a.Outcome))
	if a.KeyStore != "" {
		fields = append(fields, zap.String("key_store", a.KeyStore))
	}
	if a.Key != "" {
		fields = append(fields, zap.String("external_key_id", a.Key))
	}
	fields = append(fields, a.Fields...)
	if a.Rule != "" {
		fields = append(fields, zap.String("authz_rule", a.Rule))
	}
	if a.Reason != "" {
		fields = append(fields, zap.String("reason", a.Reason))
	}
	fields = append(fields, zap.Duration("hsm_time", a.HSMTime), zap.Duration("total_time", a.Total))
	ce.Write(fields...)
}
