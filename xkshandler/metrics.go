package xkshandler

import (
	"errors"
	"math"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The handler's metrics live for the process, so that counters go on across
// config reloads, and are registered in each config's registry (Caddy makes a
// new one per config and serves it on the admin endpoint's /metrics).
var metrics = struct {
	requests      *prometheus.CounterVec
	duration      *prometheus.HistogramVec
	hsmDuration   *prometheus.HistogramVec
	certExpiry    *prometheus.GaugeVec
	certDays      *certificateDays
	authzDenied   *prometheus.CounterVec
	collectorList []prometheus.Collector
}{}

// latencyBuckets span what matters against KMS's 250 ms budget.
var latencyBuckets = []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .25, .5, 1}

var initMetrics = sync.OnceFunc(func() {
	const ns, sub = "caddy", "xks"
	metrics.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "requests_total",
		Help: "XKS API requests by key store, operation and outcome (ok or the XKS errorName).",
	}, []string{"key_store", "operation", "outcome"})
	metrics.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: ns, Subsystem: sub, Name: "request_duration_seconds",
		Help: "Time from a request's arrival to its answer.", Buckets: latencyBuckets,
	}, []string{"key_store", "operation"})
	metrics.hsmDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: ns, Subsystem: sub, Name: "hsm_duration_seconds",
		Help: "Time a request spent on HSM work (session wait and PKCS#11 calls).", Buckets: latencyBuckets,
	}, []string{"key_store", "operation"})
	metrics.authzDenied = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "authorization_denied_total",
		Help: "Requests denied by secondary authorization, by key store and deciding rule.",
	}, []string{"key_store", "rule"})
	metrics.certExpiry = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Subsystem: sub, Name: "certificate_expiry_timestamp_seconds",
		Help: "When the server certificate served for a hostname expires (Unix time).",
	}, []string{"hostname"})
	metrics.certDays = newCertificateDays(prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "certificate_days_to_expire"),
		"Whole days left before the server certificate served for a hostname expires, as KMS's XksProxyCertificateDaysToExpire counts them; computed when scraped.",
		[]string{"hostname"}, nil))
	metrics.collectorList = []prometheus.Collector{metrics.requests, metrics.duration, metrics.hsmDuration, metrics.authzDenied, metrics.certExpiry, metrics.certDays}
})

// certificateDays is a gauge of the days left on each hostname's served
// certificate. It is computed at every scrape from the expiry time, so it
// goes down by itself between renewals.
type certificateDays struct {
	desc *prometheus.Desc
	now  func() time.Time

	mu       sync.Mutex
	notAfter map[string]time.Time // by hostname
}

func newCertificateDays(desc *prometheus.Desc) *certificateDays {
	return &certificateDays{desc: desc, now: time.Now, notAfter: make(map[string]time.Time)}
}

// set records when the certificate served for hostname expires.
func (c *certificateDays) set(hostname string, notAfter time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.notAfter[hostname] = notAfter
}

// Describe implements prometheus.Collector.
func (c *certificateDays) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *certificateDays) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	for host, notAfter := range c.notAfter {
		days := math.Floor(notAfter.Sub(now).Hours() / 24)
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, days, host)
	}
}

// registerMetrics adds the handler's metrics to a config's registry; several
// handlers of one config register them once.
func registerMetrics(reg prometheus.Registerer) error {
	initMetrics()
	for _, c := range metrics.collectorList {
		if err := reg.Register(c); err != nil {
			if _, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); !ok {
				return err
			}
		}
	}
	return nil
}

// Interface guards
var _ prometheus.Collector = (*certificateDays)(nil)
