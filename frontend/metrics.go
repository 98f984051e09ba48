package frontend

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// RequestMetrics are a front end's request metrics: requests by key store,
// operation and outcome, their duration, the part of it spent on HSM work,
// and the requests secondary authorization denied. They live for the
// process, so that counters go on across config reloads, and are
// registered in each config's registry (Caddy makes a new one per config
// and serves it on the admin endpoint's /metrics).
type RequestMetrics struct {
	Requests    *prometheus.CounterVec
	Duration    *prometheus.HistogramVec
	HSMDuration *prometheus.HistogramVec
	AuthzDenied *prometheus.CounterVec
}

// LatencyBuckets span what matters against the clouds' 250 ms budget.
var LatencyBuckets = []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .25, .5, 1}

// NewRequestMetrics makes the metrics caddy_<subsystem>_requests_total,
// _request_duration_seconds, _hsm_duration_seconds and
// _authorization_denied_total. api names the API in their help, and
// outcomes what an outcome label holds besides "ok".
func NewRequestMetrics(subsystem, api, outcomes string) *RequestMetrics {
	const ns = "caddy"
	return &RequestMetrics{
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: subsystem, Name: "requests_total",
			Help: api + " requests by key store, operation and outcome (ok or " + outcomes + ").",
		}, []string{"key_store", "operation", "outcome"}),
		Duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: subsystem, Name: "request_duration_seconds",
			Help: "Time from a request's arrival to its answer.", Buckets: LatencyBuckets,
		}, []string{"key_store", "operation"}),
		HSMDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: subsystem, Name: "hsm_duration_seconds",
			Help: "Time a request spent on HSM work (session wait and PKCS#11 calls).", Buckets: LatencyBuckets,
		}, []string{"key_store", "operation"}),
		AuthzDenied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: subsystem, Name: "authorization_denied_total",
			Help: "Requests denied by secondary authorization, by key store and deciding rule.",
		}, []string{"key_store", "rule"}),
	}
}

// Collectors lists the metrics, for Register.
func (m *RequestMetrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.Requests, m.Duration, m.HSMDuration, m.AuthzDenied}
}

// Observe counts one request: its outcome, how long it took and how much
// of that went to the HSM, and, for a denied one, the rule that denied it.
func (m *RequestMetrics) Observe(keyStore, operation, outcome string, elapsed, hsmTime time.Duration, deniedBy *string) {
	m.Requests.WithLabelValues(keyStore, operation, outcome).Inc()
	m.Duration.WithLabelValues(keyStore, operation).Observe(elapsed.Seconds())
	if hsmTime > 0 {
		m.HSMDuration.WithLabelValues(keyStore, operation).Observe(hsmTime.Seconds())
	}
	if deniedBy != nil {
		m.AuthzDenied.WithLabelValues(keyStore, *deniedBy).Inc()
	}
}

// Register adds collectors to a config's registry; several handlers of one
// config register them once.
func Register(reg prometheus.Registerer, collectors ...prometheus.Collector) error {
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			if _, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); !ok {
				return err
			}
		}
	}
	return nil
}
