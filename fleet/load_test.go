package fleet_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// loadRate is the round trips (an Encrypt and a Decrypt each) the load
// sends per second, spread over its connections: enough to have calls in
// flight on every instance at any moment, little enough for a busy 2-core
// machine that also runs three proxies, Redis and HAProxy.
const loadRate = 100

// call is the outcome of one XKS call of a load.
type call struct {
	start, end time.Time
	err        error // nil: 200 and the right answer
	transport  bool  // the call got no HTTP answer
}

// load sends signed round trips through the balancer until stopped.
type load struct {
	name   string
	client *xksClient
	stop   context.CancelFunc
	done   sync.WaitGroup
	mu     sync.Mutex
	calls  []call
	begin  time.Time
}

// startLoad starts a load over HTTP/2 (one connection, as a client opens)
// or HTTP/1.1 (16 keep-alive connections).
func (f *fleet) startLoad(t *testing.T, h2 bool) *load {
	t.Helper()
	conns, name := 16, "HTTP/1.1"
	if h2 {
		conns, name = 1, "HTTP/2"
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{name: name, client: f.newXKSClient(h2, conns), stop: cancel, begin: time.Now()}
	tokens := make(chan struct{}, loadRate)
	l.done.Go(func() {
		defer close(tokens)
		tick := time.NewTicker(time.Second / loadRate)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				select {
				case tokens <- struct{}{}:
				default: // every worker busy: the load is what the fleet takes
				}
			}
		}
	})
	for range 16 {
		l.done.Go(func() {
			for range tokens {
				l.roundTrip()
			}
		})
	}
	t.Cleanup(l.finish)
	return l
}

// roundTrip sends one Encrypt and its Decrypt and records both.
func (l *load) roundTrip() {
	// A call gets a minute, as the client's own timeout: a call the fleet
	// loses fails, it does not hang the test.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l.client.roundTrip(ctx, func(start time.Time, err error) {
		end := time.Now()
		var te *transportError
		l.mu.Lock()
		defer l.mu.Unlock()
		l.calls = append(l.calls, call{start: start, end: end, err: err, transport: errors.As(err, &te)})
	})
}

// finish stops the load and waits for its calls to end.
func (l *load) finish() {
	l.stop()
	l.done.Wait()
	l.client.http.CloseIdleConnections()
}

// results stops the load and returns its calls, by start.
func (l *load) results() []call {
	l.finish()
	l.mu.Lock()
	defer l.mu.Unlock()
	out := append([]call(nil), l.calls...)
	sort.Slice(out, func(i, j int) bool { return out[i].start.Before(out[j].start) })
	return out
}

// failures are the calls that failed.
func failures(calls []call) []call {
	var out []call
	for _, c := range calls {
		if c.err != nil {
			out = append(out, c)
		}
	}
	return out
}

// inFlight counts the calls that had started and not ended at t.
func inFlight(calls []call, t time.Time) int {
	n := 0
	for _, c := range calls {
		if !c.start.After(t) && c.end.After(t) {
			n++
		}
	}
	return n
}

// describe summarises failed calls, relative to t0.
func describe(fails []call, t0 time.Time) string {
	if len(fails) == 0 {
		return "none"
	}
	var b strings.Builder
	for i, c := range fails {
		if i == 5 {
			fmt.Fprintf(&b, "; and %d more", len(fails)-i)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "started %+dms, ended %+dms: %v", c.start.Sub(t0).Milliseconds(), c.end.Sub(t0).Milliseconds(), c.err)
	}
	return b.String()
}

// transportError is a call that got no HTTP answer: the connection failed
// or was cut.
type transportError struct{ err error }

func (e *transportError) Error() string { return "transport: " + e.err.Error() }
func (e *transportError) Unwrap() error { return e.err }
