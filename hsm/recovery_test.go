package hsm

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-xks/caddy-xks/internal/faultshim"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// refusePIN drives a backend's token into the state the PIN tests start
// from: a device error makes the library reconnect, and the token refuses
// the PIN when it is logged in again. The fault rules are cleared
// afterwards, so that any further C_Login would succeed: only the count of
// C_Login calls tells whether something tried the PIN again.
func refusePIN(t *testing.T, b *Backend, shim *faultshim.Shim) {
	t.Helper()
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	logins := shim.Calls("C_Login")
	shim.Set("C_EncryptInit=0x30*1", "C_Login=0xA0*1") // CKR_DEVICE_ERROR, then CKR_PIN_INCORRECT
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Encrypt on a failing device: %v", err)
	}
	waitFor(t, settle, func() bool { return b.tok.pinFailed.Load() != nil && !b.tok.lib.down.Load() })
	shim.Set()
	if n := shim.Calls("C_Login") - logins; n != 1 {
		t.Fatalf("the reconnection made %d C_Login calls, want 1", n)
	}
}

// TestRefusedPINIsReportedAndNotRetried: a PIN refused when the token is
// logged in again after a reconnection is logged at ERROR (the token, the
// CKR name and what to do), counted, and reported by health; and nothing
// tries it again on its own, since real HSMs lock the PIN after a few
// failed logins.
func TestRefusedPINIsReportedAndNotRetried(t *testing.T) {
	b, shim, tk, logs := shimBackendObserved(t, func(c *Config) { c.HealthTTL = caddy.Duration(time.Millisecond) })
	res, err := b.Encrypt(bg, "k1", []byte("sealed before"), nil)
	if err != nil {
		t.Fatal(err)
	}
	refusePIN(t, b, shim)

	refusals := logs.FilterMessageSnippet("refused the PIN").FilterLevelExact(zapcore.ErrorLevel).All()
	if len(refusals) != 1 {
		t.Fatalf("want one ERROR line for the refused PIN, got: %v", logs.All())
	}
	fields := refusals[0].ContextMap()
	if !strings.Contains(fmt.Sprint(fields["token"]), tk.Label) || fields["ckr"] != "CKR_PIN_INCORRECT" ||
		!strings.Contains(fmt.Sprint(fields["action"]), "caddy reload --force") {
		t.Fatalf("the refusal's fields: %v", fields)
	}
	if n := b.tok.loginFailures.Load(); n != 1 {
		t.Fatalf("%d login failures counted, want 1", n)
	}

	logins := shim.Calls("C_Login")
	for range 10 {
		if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
			t.Fatalf("Encrypt with a refused PIN: %v", err)
		}
		if _, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Decrypt with a refused PIN: %v", err)
		}
		if _, err := b.Metadata(bg, "k1"); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Metadata with a refused PIN: %v", err)
		}
		if h := b.Health(bg); h.Status != HealthUnavailable || !strings.Contains(h.Reason, "CKR_PIN_INCORRECT") {
			t.Fatalf("health with a refused PIN: %+v", h)
		}
	}
	if n := shim.Calls("C_Login") - logins; n != 0 {
		t.Fatalf("%d more C_Login calls with a refused PIN, want none", n)
	}
}

// TestALoadTriesARefusedPINOnce: opening a backend on a token whose PIN was
// refused (what a configuration reload does, `caddy reload --force` for an
// unchanged one) is one deliberate attempt to log in. Refused again, the
// load fails and the token stays as it was; accepted, the token serves
// again, through the new backend and the old one, without a restart.
func TestALoadTriesARefusedPINOnce(t *testing.T) {
	b, shim, tk := shimBackend(t, nil)
	refusePIN(t, b, shim)
	cfg := configFor(tk)
	cfg.Module = shim.Path

	logins := shim.Calls("C_Login")
	shim.Set("C_Login=0xA0*1")
	if _, err := Open("reloaded", cfg, nil); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
		t.Fatalf("a load whose login is refused again: %v", err)
	}
	shim.Set()
	if n := shim.Calls("C_Login") - logins; n != 1 {
		t.Fatalf("the load made %d C_Login calls, want 1", n)
	}
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Encrypt after a refused retry: %v", err)
	}
	if n := shim.Calls("C_Login") - logins; n != 1 {
		t.Fatalf("%d C_Login calls after a refused retry, want still 1", n)
	}
	if n := b.tok.loginFailures.Load(); n != 2 {
		t.Fatalf("%d login failures counted, want 2", n)
	}

	nb := open(t, "reloaded", cfg)
	if n := shim.Calls("C_Login") - logins; n != 2 {
		t.Fatalf("%d C_Login calls after the second load, want 2", n)
	}
	for _, backend := range []*Backend{nb, b} {
		if _, err := backend.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
			t.Fatalf("Encrypt through %s after the login: %v", backend.Name(), err)
		}
	}
	if h := b.Health(bg); h.Status == HealthUnavailable {
		t.Fatalf("health after the login: %+v", h)
	}
}

// TestRefusedReloginIsNotRetried: the token forgets the login
// (CKR_USER_NOT_LOGGED_IN) and refuses the PIN when the backend logs in
// again on the spot. That refusal, too, is never tried again by the calls
// that follow, until a load asks for one attempt.
func TestRefusedReloginIsNotRetried(t *testing.T) {
	b, shim, tk := shimBackend(t, nil)
	logins := shim.Calls("C_Login")
	shim.Set("C_Encrypt=0x101", "C_Login=0xA0") // CKR_USER_NOT_LOGGED_IN, CKR_PIN_INCORRECT
	var err error
	for range 5 {
		if _, err = b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Encrypt after a refused relogin: %v", err)
		}
	}
	if n := shim.Calls("C_Login") - logins; n != 1 {
		t.Fatalf("%d C_Login calls, want the one refused", n)
	}
	if !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
		t.Fatalf("Encrypt after a refused relogin: %v, want the refusal", err)
	}
	if h := b.Health(bg); h.Status != HealthUnavailable {
		t.Fatalf("health after a refused relogin: %+v", h)
	}
	shim.Set()
	cfg := configFor(tk)
	cfg.Module = shim.Path
	open(t, "reloaded", cfg)
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
		t.Fatalf("Encrypt after the load logged in: %v", err)
	}
}

// TestHealthIsNotCachedAcrossAReconnect: a device error and the
// reconnection that follows make the cached health result stale, however
// young: the first health check afterwards is not the ACTIVE of before.
func TestHealthIsNotCachedAcrossAReconnect(t *testing.T) {
	b, shim, _ := shimBackend(t, func(c *Config) { c.HealthTTL = caddy.Duration(xksapi.MaxHealthAge) })
	if h := b.Health(bg); h.Status != HealthActive {
		t.Fatalf("health before: %+v", h)
	}
	shim.Set("C_EncryptInit=0x30*1")
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Encrypt on a failing device: %v", err)
	}
	waitFor(t, settle, func() bool { return !b.tok.lib.down.Load() })
	if h := b.Health(bg); h.Status != HealthDegraded || !strings.Contains(h.Reason, "reconnected") {
		t.Fatalf("first health after the reconnection: %+v", h)
	}
}

// TestFailedLoginBacksOff: the token forgets the login
// (CKR_USER_NOT_LOGGED_IN) and C_Login fails on every try, with a PIN code
// of PKCS#11, with a vendor's code, or with another error. 20 requests
// never make 20 C_Login calls: a refused PIN (PKCS#11's codes, and those
// named in pin_refused_codes) is tried once and never again, any other
// failure again only after a backoff that doubles from loginBackoffMin,
// so at most 1+log2(1+elapsed/loginBackoffMin) times in elapsed.
func TestFailedLoginBacksOff(t *testing.T) {
	const requests = 20
	tests := []struct {
		name    string
		code    string
		named   []string // pin_refused_codes
		refused bool     // a refused PIN: one C_Login, never another
	}{
		{"CKR_PIN_INCORRECT: refused", "0xA0", nil, true},
		{"a vendor's code, named in pin_refused_codes: refused", "0x80000001", []string{"0x80000001"}, true},
		{"a vendor's code, named as logs name it: refused", "0x80000001", []string{"CKR_VENDOR_DEFINED+0x1"}, true},
		{"a vendor's code, not named: backs off", "0x80000001", nil, false},
		{"CKR_FUNCTION_FAILED: backs off", "0x6", []string{"0x80000001"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, shim, tk := shimBackend(t, func(c *Config) { c.PINRefusedCodes = tt.named })
			logins := shim.Calls("C_Login")
			shim.Set("C_Encrypt=0x101", "C_Login="+tt.code)
			start := time.Now()
			for range requests {
				if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) {
					t.Fatalf("Encrypt while logins fail: %v", err)
				}
			}
			elapsed := time.Since(start)
			n := shim.Calls("C_Login") - logins
			bound := 1
			if !tt.refused {
				bound = 1 + int(math.Log2(1+float64(elapsed)/float64(loginBackoffMin)))
			}
			t.Logf("%d requests in %s: %d C_Login calls (at most %d)", requests, elapsed.Round(time.Millisecond), n, bound)
			if n < 1 || n > bound {
				t.Fatalf("%d requests in %s made %d C_Login calls, want 1 to %d", requests, elapsed, n, bound)
			}
			if refused := b.tok.pinFailed.Load() != nil; refused != tt.refused {
				t.Fatalf("PIN recorded as refused: %v, want %v", refused, tt.refused)
			}
			if tt.refused {
				return
			}
			// A load is one deliberate attempt, whatever the backoff.
			before := shim.Calls("C_Login")
			cfg := configFor(tk)
			cfg.Module = shim.Path
			if _, err := Open("reloaded", cfg, nil); err == nil {
				t.Fatal("a load succeeded while logins fail")
			}
			if n := shim.Calls("C_Login") - before; n != 1 {
				t.Fatalf("the load made %d C_Login calls, want 1", n)
			}
			// Once the backoff is over, a request logs in again.
			b.tok.connectMu.Lock()
			retry := b.tok.loginRetry
			b.tok.connectMu.Unlock()
			waitFor(t, settle, func() bool { return time.Now().After(retry) })
			before = shim.Calls("C_Login")
			if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Encrypt while logins fail: %v", err)
			}
			if n := shim.Calls("C_Login") - before; n != 1 {
				t.Fatalf("%d C_Login calls after the backoff, want 1", n)
			}
		})
	}
}
