package frontend

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// TestQuotaCountsTimeNotSpeed: a quota of 1 request/s with a burst of 5
// admits the burst, then refuses until its clock gives a token, one a
// second, and never holds more than the burst; the test moves the clock,
// so the machine's speed decides nothing.
func TestQuotaCountsTimeNotSpeed(t *testing.T) {
	var elapsed atomic.Int64
	start := time.Now()
	SetQuotaClock(func() time.Time { return start.Add(time.Duration(elapsed.Load())) })
	t.Cleanup(func() { SetQuotaClock(nil) })
	l := Limits{RateLimit: 1, RateBurst: 5}
	l.Provision()
	tests := []struct {
		name          string
		advance       time.Duration
		ask, admitted int
	}{
		{"the burst, then refusals", 0, 8, 5},
		{"no time, no token", 0, 3, 0},
		{"a second gives one", time.Second, 2, 1},
		{"half a second gives none", 500 * time.Millisecond, 1, 0},
		{"the other half gives one", 500 * time.Millisecond, 2, 1},
		{"an idle hour refills the burst and no more", time.Hour, 9, 5},
	}
	for _, tt := range tests {
		elapsed.Add(int64(tt.advance))
		admitted := 0
		for range tt.ask {
			release, err := l.Admit()
			switch {
			case err == nil:
				admitted++
				release()
			case !errors.Is(err, ErrQuota):
				t.Fatalf("%s: %v", tt.name, err)
			}
		}
		if admitted != tt.admitted {
			t.Errorf("%s: %d of %d admitted, want %d", tt.name, admitted, tt.ask, tt.admitted)
		}
	}
}
