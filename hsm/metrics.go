package hsm

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// backendCollector exports the state of an app's backends: the session
// pool's figures, the health status and the token's failed logins. It reads them at scrape time, so it
// keeps no state of its own; health comes from the backend's cached check.
type backendCollector struct {
	app *App
}

var (
	descSessionsInUse = prometheus.NewDesc("caddy_xks_hsm_sessions_in_use",
		"PKCS#11 sessions held by operations, stuck ones included.", []string{"backend"}, nil)
	descSessionsIdle = prometheus.NewDesc("caddy_xks_hsm_sessions_idle",
		"Open PKCS#11 sessions waiting in the pool.", []string{"backend"}, nil)
	descSessionWaiters = prometheus.NewDesc("caddy_xks_hsm_session_waiters",
		"Operations waiting for a free session.", []string{"backend"}, nil)
	descStuckCalls = prometheus.NewDesc("caddy_xks_hsm_stuck_calls",
		"PKCS#11 calls abandoned at their deadline that have not returned from the HSM yet.", []string{"backend"}, nil)
	descMaxSessions = prometheus.NewDesc("caddy_xks_hsm_sessions_max",
		"Size of the session pool.", []string{"backend"}, nil)
	descHealth = prometheus.NewDesc("caddy_xks_hsm_health",
		"1 for the backend's current health status (ACTIVE, DEGRADED or UNAVAILABLE), 0 for the others.", []string{"backend", "status"}, nil)
	descLoginFailures = prometheus.NewDesc("caddy_xks_hsm_login_failures_total",
		"Failed C_Login calls on the backend's token since it was opened, refused PINs among them.", []string{"backend"}, nil)
	descLaneCalls = prometheus.NewDesc("caddy_xks_hsm_lane_calls_total",
		"C_Encrypt and C_Decrypt calls of the backend's PKCS#11 module (shared by the backends that load it) made on a thread of their own because the module answers in milliseconds, since the process started.", []string{"backend"}, nil)
)

// Describe implements prometheus.Collector.
func (c backendCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSessionsInUse, descSessionsIdle, descSessionWaiters, descStuckCalls, descMaxSessions, descHealth, descLoginFailures, descLaneCalls} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c backendCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for name, b := range c.app.backends {
		s := b.Stats()
		for _, m := range []struct {
			desc *prometheus.Desc
			v    int
		}{{descSessionsInUse, s.SessionsInUse}, {descSessionsIdle, s.SessionsIdle}, {descSessionWaiters, s.Waiters}, {descStuckCalls, s.StuckCalls}, {descMaxSessions, s.MaxSessions}} {
			ch <- prometheus.MustNewConstMetric(m.desc, prometheus.GaugeValue, float64(m.v), name)
		}
		ch <- prometheus.MustNewConstMetric(descLoginFailures, prometheus.CounterValue, float64(b.tok.loginFailures.Load()), name)
		ch <- prometheus.MustNewConstMetric(descLaneCalls, prometheus.CounterValue, float64(b.tok.lib.fns.calls.offloaded.Load()), name)
		status := b.Health(ctx).Status
		for _, st := range []string{HealthActive, HealthDegraded, HealthUnavailable} {
			v := 0.0
			if st == status {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(descHealth, prometheus.GaugeValue, v, name, st)
		}
	}
}
