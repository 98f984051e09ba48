package xkshandler

import (
	"math"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-xks/caddy-xks/frontend"
)

// The handler's metrics live for the process, so that counters go on across
// config reloads, and are registered in each config's registry (Caddy makes a
// new one per config and serves it on the admin endpoint's /metrics).
var metrics = struct {
	requests      *frontend.RequestMetrics
	certExpiry    *prometheus.GaugeVec
	certDays      *certificateDays
	usage         *usageMetrics
	collectorList []prometheus.Collector
}{}

var initMetrics = sync.OnceFunc(func() {
	const ns, sub = "caddy", "xks"
	metrics.requests = frontend.NewRequestMetrics(sub, "XKS API", "the XKS errorName")
	metrics.certExpiry = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Subsystem: sub, Name: "certificate_expiry_timestamp_seconds",
		Help: "When the server certificate served for a hostname expires (Unix time).",
	}, []string{"hostname"})
	metrics.certDays = newCertificateDays(prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "certificate_days_to_expire"),
		"Whole days left before the server certificate served for a hostname expires, as KMS's XksProxyCertificateDaysToExpire counts them; computed when scraped.",
		[]string{"hostname"}, nil))
	metrics.usage = &usageMetrics{
		encryptions: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "key_version_encryptions"),
			"Encrypts with a key version, counted across the fleet (this instance's live count plus the others' last written counts).",
			[]string{"key_store", "key", "version", "label"}, nil),
		used: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "key_version_limit_used_ratio"),
			"The fraction of the key store's encrypt_limit that a key version has used across the fleet.",
			[]string{"key_store", "key", "version", "label"}, nil),
		current: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "key_current_version"),
			"The key version Encrypt uses for an external key id.",
			[]string{"key_store", "key"}, nil),
	}
	metrics.collectorList = append(metrics.requests.Collectors(), metrics.certExpiry, metrics.certDays, metrics.usage)
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
	return frontend.Register(reg, metrics.collectorList...)
}

// liveStores are the key stores of the configs running, for usageMetrics.
var liveStores = &storeSet{stores: map[*KeyStore]uint64{}}

// storeSet is a set of key stores, each with the order it was added in.
type storeSet struct {
	mu     sync.Mutex
	next   uint64
	stores map[*KeyStore]uint64
}

func (s *storeSet) add(stores []*KeyStore) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ks := range stores {
		s.next++
		s.stores[ks] = s.next
	}
}

func (s *storeSet) remove(stores []*KeyStore) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ks := range stores {
		delete(s.stores, ks)
	}
}

// usageMetrics reports every key version's count, computed when scraped.
// While a reload runs, the old and new configs both have the key store: the
// newer one is reported.
type usageMetrics struct {
	encryptions, used, current *prometheus.Desc
}

// Describe implements prometheus.Collector.
func (u *usageMetrics) Describe(ch chan<- *prometheus.Desc) {
	ch <- u.encryptions
	ch <- u.used
	ch <- u.current
}

// Collect implements prometheus.Collector.
func (u *usageMetrics) Collect(ch chan<- prometheus.Metric) {
	liveStores.mu.Lock()
	newest := map[string]*KeyStore{}
	order := map[string]uint64{}
	for ks, n := range liveStores.stores {
		if n > order[ks.URIPath] {
			newest[ks.URIPath], order[ks.URIPath] = ks, n
		}
	}
	liveStores.mu.Unlock()
	for _, ks := range newest {
		for _, vk := range ks.versionedKeys() {
			if cur := vk.current.Load(); cur != nil {
				ch <- prometheus.MustNewConstMetric(u.current, prometheus.GaugeValue, float64(cur.n), ks.URIPath, vk.key)
			}
			for _, v := range vk.versions {
				c := v.usage
				if c == nil {
					continue
				}
				version := strconv.FormatUint(uint64(v.n), 10)
				total := float64(c.total())
				ch <- prometheus.MustNewConstMetric(u.encryptions, prometheus.GaugeValue, total, ks.URIPath, vk.key, version, v.label)
				ch <- prometheus.MustNewConstMetric(u.used, prometheus.GaugeValue, total/float64(ks.limit), ks.URIPath, vk.key, version, v.label)
			}
		}
	}
}

// Interface guards
var (
	_ prometheus.Collector = (*certificateDays)(nil)
	_ prometheus.Collector = (*usageMetrics)(nil)
)
