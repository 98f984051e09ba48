package frontend

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"golang.org/x/time/rate"
)

// Limits bound the work of one key store: a request quota, a bound on the
// requests doing HSM work at once, and a deadline on each request. A key
// store's config embeds them, so their fields sit among its own.
type Limits struct {
	// RateLimit is the key store's request quota in requests per second,
	// a token bucket refilled at this rate; past it, requests are refused
	// as throttled before the HSM is asked (XKS: ThrottlingException;
	// Azure EKM: 429 with Retry-After). KMS's own default quota per
	// external key store is 1800. Default: 0, no quota.
	RateLimit float64 `json:"rate_limit,omitempty"`

	// RateBurst is the token bucket's size: how many requests may arrive
	// at once above the rate. Default: one second's worth of rate_limit.
	RateBurst int `json:"rate_burst,omitempty"`

	// MaxConcurrent bounds the requests of this key store doing HSM work at
	// once; past it, requests are refused as throttled at once. Default:
	// 0, bounded only by the HSM backend's session pool.
	MaxConcurrent int `json:"max_concurrent,omitempty"`

	// Deadline bounds each request, from its arrival to the HSM's answer;
	// past it the request fails as timed out (XKS:
	// DependencyTimeoutException; Azure EKM: 408), HSM work it started is
	// abandoned, counted, and its session closed when the HSM returns. KMS
	// and Azure Managed HSM each wait 250 ms for an answer, network
	// included. Default: 200ms.
	Deadline caddy.Duration `json:"deadline,omitempty"`

	limiter *rate.Limiter // nil: no quota
	slots   chan struct{} // nil: no bound on concurrent HSM work
}

// DefaultDeadline leaves the clouds' 250 ms for the network and TLS.
const DefaultDeadline = 200 * time.Millisecond

// Why a request is refused as throttled.
var (
	// ErrQuota: the key store's request quota is exceeded.
	ErrQuota = errors.New("the key store's request quota is exceeded")
	// ErrTooManyInFlight: max_concurrent requests of the key store are
	// doing HSM work.
	ErrTooManyInFlight = errors.New("too many requests of this key store are in the HSM")
)

// Validate checks the limits without side effects.
func (l *Limits) Validate() error {
	if l.RateLimit < 0 || l.RateBurst < 0 || l.MaxConcurrent < 0 || l.Deadline < 0 {
		return errors.New("rate_limit, rate_burst, max_concurrent and deadline must not be negative")
	}
	return nil
}

// Provision sets the defaults and builds the quota and the bound.
func (l *Limits) Provision() {
	if l.RateLimit > 0 {
		burst := l.RateBurst
		if burst == 0 {
			burst = max(int(l.RateLimit), 1)
		}
		l.limiter = rate.NewLimiter(rate.Limit(l.RateLimit), burst)
	}
	if l.MaxConcurrent > 0 {
		l.slots = make(chan struct{}, l.MaxConcurrent)
	}
	if l.Deadline == 0 {
		l.Deadline = caddy.Duration(DefaultDeadline)
	}
}

// quotaClock is the clock the request quotas read: nil for time.Now, or a
// test's (SetQuotaClock). Atomic, because a test sets it while the
// server's goroutines read it.
var quotaClock atomic.Pointer[func() time.Time]

// SetQuotaClock makes every key store's request quota read the time from
// clock, or from time.Now again with nil. It is for tests, which must
// decide when time passes for a quota rather than leave it to the
// machine's speed (caddy-ratelimit's injectable clock); a server never
// calls it.
func SetQuotaClock(clock func() time.Time) {
	if clock == nil {
		quotaClock.Store(nil)
		return
	}
	quotaClock.Store(&clock)
}

// quotaNow is the time a quota counts from.
func quotaNow() time.Time {
	if c := quotaClock.Load(); c != nil {
		return (*c)()
	}
	return time.Now()
}

// Admit takes a place for one request's HSM work, or says why not
// (ErrQuota, ErrTooManyInFlight). release must be called when the work is
// done.
func (l *Limits) Admit() (release func(), err error) {
	if l.limiter != nil && !l.limiter.AllowN(quotaNow(), 1) {
		return nil, ErrQuota
	}
	if l.slots == nil {
		return func() {}, nil
	}
	select {
	case l.slots <- struct{}{}:
		return func() { <-l.slots }, nil
	default:
		return nil, ErrTooManyInFlight
	}
}
