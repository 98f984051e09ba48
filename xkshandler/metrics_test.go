package xkshandler

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestCertificateDaysToExpire: whole days left, counted at each scrape from
// the expiry, so the value falls by itself between renewals.
func TestCertificateDaysToExpire(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	c := newCertificateDays(prometheus.NewDesc("caddy_xks_certificate_days_to_expire", "days", []string{"hostname"}, nil))
	c.now = func() time.Time { return now }
	c.set("a.example.com", now.Add(30*24*time.Hour+time.Hour))
	c.set("b.example.com", now.Add(-time.Hour))
	want := func(a, b string) string {
		return "# HELP caddy_xks_certificate_days_to_expire days\n# TYPE caddy_xks_certificate_days_to_expire gauge\n" +
			`caddy_xks_certificate_days_to_expire{hostname="a.example.com"} ` + a + "\n" +
			`caddy_xks_certificate_days_to_expire{hostname="b.example.com"} ` + b + "\n"
	}
	if err := testutil.CollectAndCompare(c, strings.NewReader(want("30", "-1"))); err != nil {
		t.Fatal(err)
	}
	now = now.Add(48 * time.Hour) // two days later, without a renewal
	if err := testutil.CollectAndCompare(c, strings.NewReader(want("28", "-3"))); err != nil {
		t.Fatal(err)
	}
}
