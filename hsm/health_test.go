package hsm

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// TestHealthWhileACheckRuns: a caller that finds a round trip running gets
// the cached result only while it is within the spec's one-minute limit
// (XKS Proxy API 5.4: "The cached result MUST not be older than one
// minute"). The cache is aged with the injected clock; the HSM hangs in the
// running round trip until the test ends that round trip by cancelling its
// context, so the round trip outlasts the caller's deadline however slow the
// machine.
func TestHealthWhileACheckRuns(t *testing.T) {
	tests := []struct {
		name     string
		age      time.Duration // of the cached result when the caller comes
		deadline time.Duration // the caller's; zero for none
		want     string        // "cached", "unavailable" or "running check's"
	}{
		{"a result within the limit is returned at once", xksapi.MaxHealthAge / 2, 100 * time.Millisecond, "cached"},
		{"a result over the limit is not returned: unavailable at the caller's deadline", xksapi.MaxHealthAge + time.Second, 100 * time.Millisecond, "unavailable"},
		{"a result over the limit is not returned: a caller without a deadline waits for the running check", xksapi.MaxHealthAge + time.Second, 0, "running check's"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, shim, _ := shimBackend(t, func(c *Config) {
				c.HealthTTL = caddy.Duration(10 * time.Second)
				c.CallTimeout = caddy.Duration(30 * time.Second)
			})
			cached := b.Health(bg)
			if cached.Status != HealthActive {
				t.Fatalf("first health: %+v", cached)
			}
			now = func() time.Time { return time.Now().Add(tt.age) }
			t.Cleanup(func() { now = time.Now })

			// A round trip starts and hangs in C_Encrypt.
			shim.Set("C_Encrypt=hang")
			runningCtx, endRunning := context.WithCancel(bg)
			running := make(chan Health, 1)
			runningDone := make(chan struct{})
			go func() {
				defer close(runningDone)
				running <- b.Health(runningCtx)
			}()
			defer func() {
				// The round trip ends, and its hung call returns before the
				// test does.
				endRunning()
				<-runningDone
				shim.Set()
				waitFor(t, settle, func() bool { return b.Stats().StuckCalls == 0 })
			}()
			shim.WaitHung(t, "C_Encrypt", 1)

			ctx := bg
			if tt.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(bg, tt.deadline)
				defer cancel()
			}
			got := make(chan Health, 1)
			go func() { got <- b.Health(ctx) }()
			var h Health
			switch tt.want {
			case "cached", "unavailable":
				h = <-got
				select {
				case r := <-running:
					t.Fatalf("the running check ended before the caller's answer: %+v", r)
				default:
				}
				endRunning()
				<-running
			case "running check's":
				select {
				case h = <-got:
					t.Fatalf("answered while the check ran: %+v", h)
				case <-time.After(200 * time.Millisecond):
				}
				endRunning()
				r := <-running
				h = <-got
				if h.CheckedAt != r.CheckedAt || h.Status != r.Status {
					t.Fatalf("got %+v, want the running check's result %+v", h, r)
				}
			}
			if age := now().Sub(h.CheckedAt); age >= xksapi.MaxHealthAge {
				t.Fatalf("got a result %s old: %+v", age, h)
			}
			switch tt.want {
			case "cached":
				if h != cached {
					t.Fatalf("got %+v, want the cached %+v", h, cached)
				}
			case "unavailable":
				if h.Status != HealthUnavailable || !strings.Contains(h.Reason, "over a minute old") {
					t.Fatalf("got %+v, want unavailable", h)
				}
			}
		})
	}
}
