package hsm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// Health status values.
const (
	// HealthActive: the last round trip worked in time and nothing is
	// strained.
	HealthActive = "ACTIVE"
	// HealthDegraded: the round trip worked, but slowly (over half the call
	// timeout), or the session pool was saturated or had calls stuck in the
	// HSM, or the library reconnected within the last minute.
	HealthDegraded = "DEGRADED"
	// HealthUnavailable: the round trip failed, the token is closed, the
	// token refused the PIN, or the library is reconnecting.
	HealthUnavailable = "UNAVAILABLE"
)

// recoveringWindow is how long after a reconnection health stays DEGRADED.
var recoveringWindow = time.Minute

// Health is the result of a health check.
type Health struct {
	// Status is ACTIVE, DEGRADED or UNAVAILABLE.
	Status string
	// Manufacturer, Model, Serial and Firmware describe the token.
	Manufacturer, Model, Serial, Firmware string
	// Library is the PKCS#11 library's manufacturer, description and version.
	Library string
	// Reason says why the status is not ACTIVE.
	Reason string
	// CheckedAt is when the round trip ran.
	CheckedAt time.Time
}

// now is the clock of health results; tests move it to age a cached result.
var now = time.Now

// healthCache holds the last round trip's result. One round trip runs at a
// time; running is closed when it ends.
type healthCache struct {
	mu    sync.Mutex // guards the fields below; never held during a round trip
	last  Health
	valid bool
	// events is the library's event count when the round trip started: a
	// device error or a reconnection since makes the result stale, however
	// young, so that the next check reports it.
	events  uint64
	running chan struct{} // nil when no round trip runs
}

// failedHealthTTL bounds how long an UNAVAILABLE result is reused.
const failedHealthTTL = 5 * time.Second

// Health reports the token's state. It runs a real encrypt/decrypt round
// trip on a session key at most once per health TTL and returns the cached
// result in between; a closed token or a reconnecting library is reported
// at once. It never returns a round trip result older than the spec's
// limit of one minute: a caller that finds only an older one while a round
// trip runs waits for it until ctx is done, and then gets UNAVAILABLE. A
// device error or a reconnection of the library makes the cached result
// stale at once.
func (b *Backend) Health(ctx context.Context) Health {
	h := b.describe()
	if b.tok.destroyed.Load() {
		return unavailable(h, errTokenClosed.Error())
	}
	if pe := b.tok.pinFailed.Load(); pe != nil {
		return unavailable(h, pe.Error())
	}
	if down, reason, _ := b.tok.lib.status(); down {
		return unavailable(h, "reconnecting: "+reason)
	}
	events := b.tok.lib.events.Load()
	b.health.mu.Lock()
	ttl := b.healthTTL
	if b.health.last.Status == HealthUnavailable {
		// A failed check is retried sooner: it may have been one slow call.
		ttl = min(ttl, failedHealthTTL)
	}
	if last, ok := b.health.lastWithin(ttl, events); ok {
		b.health.mu.Unlock()
		return last
	}
	running := b.health.running
	if running == nil {
		done := make(chan struct{})
		b.health.running = done
		b.health.mu.Unlock()
		return b.refreshHealth(ctx, done)
	}
	// KMS gives a health call 250 ms, so rather than wait for the running
	// round trip a caller takes the last result, if it is young enough.
	last, ok := b.health.lastWithin(xksapi.MaxHealthAge, events)
	b.health.mu.Unlock()
	if ok {
		return last
	}
	select {
	case <-running:
	case <-ctx.Done():
		return unavailable(h, "the last health check is over a minute old and the running one did not end in time")
	}
	b.health.mu.Lock()
	// The round trip waited for may have started before the latest event:
	// its result is still the freshest there is.
	last, ok = b.health.lastWithin(xksapi.MaxHealthAge, b.health.events)
	b.health.mu.Unlock()
	if !ok {
		return unavailable(h, "the health check ended without a result")
	}
	return last
}

// HealthTTL is how long the backend reuses a health check's round trip
// (health_ttl).
func (b *Backend) HealthTTL() time.Duration { return b.healthTTL }

// lastWithin returns the last result and whether it is younger than d and
// no library event came after its round trip started. c.mu must be held.
func (c *healthCache) lastWithin(d time.Duration, events uint64) (Health, bool) {
	return c.last, c.valid && c.events == events && now().Sub(c.last.CheckedAt) < d
}

// refreshHealth runs the round trip, caches its result and closes done,
// which wakes the callers waiting for it.
func (b *Backend) refreshHealth(ctx context.Context, done chan struct{}) Health {
	defer func() {
		b.health.mu.Lock()
		b.health.running = nil
		b.health.mu.Unlock()
		close(done)
	}()
	events := b.tok.lib.events.Load()
	h := b.checkHealth(ctx)
	b.health.mu.Lock()
	b.health.last, b.health.valid, b.health.events = h, true, events
	b.health.mu.Unlock()
	return h
}

func unavailable(h Health, reason string) Health {
	h.Status, h.Reason, h.CheckedAt = HealthUnavailable, reason, now()
	return h
}

func (b *Backend) describe() Health {
	var h Health
	if st := b.tok.state.Load(); st != nil {
		h.Manufacturer, h.Model, h.Serial = st.info.manufacturer, st.info.model, st.info.serial
		h.Firmware, h.Library = st.info.firmware, st.info.library
	}
	return h
}

func (b *Backend) checkHealth(ctx context.Context) Health {
	start := time.Now()
	err := b.run(ctx, "health check", "", b.callTimeout, func(cs *callSession) error {
		if _, err := cs.ctx.GetTokenInfo(cs.st.slot); err != nil {
			return err
		}
		key, err := cs.sessionKey(b.privateKeys)
		if err != nil {
			return err
		}
		defer func() { _ = cs.ctx.DestroyObject(cs.h, key) }()
		iv, ct, tag, err := encryptGCM(cs, key, b.ivMode, selfTestPlaintext, selfTestAAD)
		if err != nil {
			return err
		}
		if bytes.Equal(iv, make([]byte, len(iv))) {
			return &Error{Kind: ErrInternal, Op: "health check", Err: errZeroIV}
		}
		pt, err := decryptGCM(cs, key, "health check", "", iv, ct, tag, selfTestAAD)
		if err != nil {
			return err
		}
		if !bytes.Equal(pt, selfTestPlaintext) {
			return &Error{Kind: ErrInternal, Op: "health check", Err: errors.New("round trip changed the plaintext")}
		}
		return nil
	})
	elapsed := time.Since(start)
	h := b.describe()
	h.CheckedAt = now()
	if err != nil {
		if errors.Is(err, ErrBusy) {
			h.Status, h.Reason = HealthDegraded, "session pool exhausted"
			return h
		}
		h.Status, h.Reason = HealthUnavailable, err.Error()
		return h
	}
	var reasons []string
	if elapsed > b.callTimeout/2 {
		reasons = append(reasons, fmt.Sprintf("round trip took %s", elapsed.Round(time.Millisecond)))
	}
	s := b.Stats()
	if s.StuckCalls > 0 {
		reasons = append(reasons, fmt.Sprintf("%d calls stuck in the hsm", s.StuckCalls))
	}
	if s.Waiters > 0 {
		reasons = append(reasons, "session pool saturated")
	}
	if since := b.tok.sinceRecovery(); since < recoveringWindow {
		reasons = append(reasons, fmt.Sprintf("reconnected %s ago", since.Round(time.Second)))
	}
	h.Status = HealthActive
	if len(reasons) > 0 {
		h.Status, h.Reason = HealthDegraded, strings.Join(reasons, "; ")
	}
	return h
}
