package hsm

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/faultshim"
)

// shimBackend opens a backend through a freshly built fault shim that
// forwards to SoftHSM2. Each shim is a library of its own, so its
// re-initializations reach no other test's backend. The shim forwards
// C_Finalize, so every test leaves SoftHSM2 initialized again before it ends.
func shimBackend(t *testing.T, mod func(*Config)) (*Backend, *faultshim.Shim, hsmtest.Token) {
	t.Helper()
	b, shim, tk, _ := shimBackendObserved(t, mod)
	return b, shim, tk
}

// shimBackendObserved is shimBackend that also keeps the log lines of the
// backend and its token, at INFO and above, for the test to read.
func shimBackendObserved(t *testing.T, mod func(*Config)) (*Backend, *faultshim.Shim, hsmtest.Token, *observer.ObservedLogs) {
	t.Helper()
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1")
	shim := faultshim.New(t, tk.Module)
	cfg := configFor(tk)
	cfg.Module = shim.Path
	if mod != nil {
		mod(&cfg)
	}
	core, logs := observer.New(zapcore.InfoLevel)
	b, err := Open("shimmed", cfg, zap.New(zapcore.NewTee(zaptest.NewLogger(t).Core(), core)))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		shim.Set()
		waitFor(t, settle, func() bool { return !b.tok.lib.down.Load() })
		_ = b.Close()
	})
	return b, shim, tk, logs
}

// settle is how long a test waits for a state the HSM layer reaches by
// itself (a reconnection, a stuck call's return): seconds on a loaded
// machine, never minutes.
const settle = 2 * time.Minute

func waitFor(t *testing.T, d time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestDeviceErrorThenRecovery(t *testing.T) {
	b, shim, _ := shimBackend(t, nil)
	res, err := b.Encrypt(bg, "k1", []byte("before"), nil)
	if err != nil {
		t.Fatal(err)
	}
	shim.Set("C_EncryptInit=0x30", "C_DecryptInit=0x30") // CKR_DEVICE_ERROR
	_, err = b.Encrypt(bg, "k1", []byte("x"), nil)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "CKR_DEVICE_ERROR") {
		t.Fatalf("Encrypt on a failing device: %v", err)
	}
	// While the device fails, calls fail fast and health says so: a call
	// reaches the HSM only after a re-initialization, not every time.
	initsBefore, decryptsBefore := shim.Calls("C_Initialize"), shim.Calls("C_DecryptInit")
	for range 50 {
		if _, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Decrypt on a failing device: %v", err)
		}
	}
	inits, decrypts := shim.Calls("C_Initialize")-initsBefore, shim.Calls("C_DecryptInit")-decryptsBefore
	if decrypts > inits+1 {
		t.Fatalf("50 failing calls made %d C_DecryptInit calls across %d re-initializations; not failing fast", decrypts, inits)
	}
	if h := b.Health(bg); h.Status != HealthUnavailable {
		t.Fatalf("health while failing: %+v", h)
	}
	// The device comes back: the backend serves again, without a restart.
	shim.Set()
	waitFor(t, settle, func() bool {
		_, err := b.Encrypt(bg, "k1", []byte("after"), nil)
		return err == nil
	})
	if pt, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil); err != nil || string(pt) != "before" {
		t.Fatalf("Decrypt after recovery: %q %v", pt, err)
	}
	if h := b.Health(bg); h.Status != HealthDegraded || !strings.Contains(h.Reason, "reconnected") {
		t.Fatalf("health just after recovery: %+v", h)
	}
	if n := shim.Calls("C_Initialize"); n < 2 {
		t.Fatalf("C_Initialize called %d times; no re-initialization", n)
	}
}

func TestReinitIsRateLimited(t *testing.T) {
	b, shim, _ := shimBackend(t, nil)
	before := shim.Calls("C_Initialize")
	// Every open session fails: each re-initialization fails too, and the
	// breaker spaces them out (20 ms doubling to 200 ms in tests). The
	// failure goes on for at least 600 ms and until two re-initializations
	// have happened, however slow the machine; then the count must fit the
	// backoff schedule over the time that actually passed.
	shim.Set("C_OpenSession=0x30", "C_EncryptInit=0x30")
	start := time.Now()
	deadline := start.Add(settle)
	for time.Since(start) < 600*time.Millisecond || shim.Calls("C_Initialize")-before < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d re-initializations in %s of continuous failure", shim.Calls("C_Initialize")-before, settle)
		}
		_, _ = b.Encrypt(bg, "k1", []byte("x"), nil)
		time.Sleep(time.Millisecond)
	}
	elapsed := time.Since(start)
	if n, most := shim.Calls("C_Initialize")-before, reinitsWithin(elapsed); n > most {
		t.Fatalf("%d re-initializations in %s of continuous failure; the backoff allows %d", n, elapsed, most)
	}
}

// reinitsWithin is the most re-initializations the breaker's backoff
// allows in d: one at once, then one after each backoff step.
func reinitsWithin(d time.Duration) int {
	n, spent, step := 1, time.Duration(0), reinitBackoffMin
	for spent+step <= d {
		spent += step
		n++
		step = min(2*step, reinitBackoffMax)
	}
	return n
}

// TestHangTimesOut: the HSM hangs until the test releases it, so the
// answer can only come from the call timeout: for a call made directly, and
// for one made on a lane (offload_test.go), as for a module that answers in
// milliseconds.
func TestHangTimesOut(t *testing.T) {
	for _, path := range []struct {
		name   string
		onLane bool
	}{{"direct", false}, {"lane", true}} {
		onLane := path.onLane
		t.Run(path.name, func(t *testing.T) {
			// Long enough for the start-up self-test on a loaded machine.
			const timeout = time.Second
			b, shim, _ := shimBackend(t, func(c *Config) { c.CallTimeout = caddy.Duration(timeout) })
			calls := b.tok.lib.fns.calls
			if onLane {
				// As if the module had answered in seconds so far.
				calls.floor.Store(int64(time.Second))
			}
			shim.Set("C_Encrypt=hang")
			start := time.Now()
			_, err := b.Encrypt(bg, "k1", []byte("x"), nil)
			elapsed := time.Since(start)
			if !errors.Is(err, ErrTimeout) {
				t.Fatalf("Encrypt on a hung HSM: %v", err)
			}
			if elapsed < timeout {
				t.Fatalf("timed out after %s, before the %s call timeout", elapsed, timeout)
			}
			if s := b.Stats(); s.StuckCalls != 1 {
				t.Fatalf("stats %+v, want one stuck call", s)
			}
			// Other operations go on meanwhile.
			if _, err := b.Metadata(bg, "k1"); err != nil {
				t.Fatalf("Metadata beside a hung call: %v", err)
			}
			shim.Set()
			// The hung call returns, and its session is closed rather than reused.
			waitFor(t, settle, func() bool { return b.Stats().StuckCalls == 0 })
			if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
				t.Fatal(err)
			}
			// Fewer calls than a window: the path chosen at the start held,
			// for the hung call and the one after (and any health check's).
			if n := calls.offloaded.Load(); !onLane && n != 0 || onLane && n < 2 {
				t.Fatalf("%d crypt calls on lanes (on a lane: %v)", n, onLane)
			}
		})
	}
}

func TestStuckCallsCapped(t *testing.T) {
	const sessions = 4
	b, shim, _ := shimBackend(t, func(c *Config) {
		c.MaxSessions = sessions
		c.CallTimeout = caddy.Duration(time.Second)
		c.SessionWait = caddy.Duration(20 * time.Millisecond)
	})
	// The calls hang until the test ends: every caller that returns was
	// not held by them.
	shim.Set("C_Encrypt=hang")
	var wg sync.WaitGroup
	errs := make(chan error, 12)
	for i := 0; i < cap(errs); i++ {
		wg.Go(func() {
			_, err := b.Encrypt(bg, "k1", []byte("x"), nil)
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	counts := map[error]int{}
	for err := range errs {
		switch {
		case errors.Is(err, ErrTimeout):
			counts[ErrTimeout]++
		case errors.Is(err, ErrBusy):
			counts[ErrBusy]++
		default:
			t.Fatalf("unexpected result %v", err)
		}
	}
	if counts[ErrTimeout] != sessions || counts[ErrBusy] != cap(errs)-sessions {
		t.Fatalf("timeouts %d, busy %d; want %d stuck calls at most", counts[ErrTimeout], counts[ErrBusy], sessions)
	}
	if s := b.Stats(); s.StuckCalls != sessions || s.SessionsInUse != sessions {
		t.Fatalf("stats %+v", s)
	}
	if h := b.Health(bg); h.Status == HealthActive {
		t.Fatalf("health with every session stuck: %+v", h)
	}
	shim.Set()
	waitFor(t, settle, func() bool { return b.Stats().StuckCalls == 0 })
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
}

func TestWrongPINIsNotRetried(t *testing.T) {
	tk := hsmtest.NewToken(t)
	shim := faultshim.New(t, tk.Module)
	cfg := configFor(tk)
	cfg.Module = shim.Path
	cfg.PIN = "0000-wrong"
	_, err := Open("wrong-pin", cfg, zaptest.NewLogger(t))
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
		t.Fatalf("Open with a wrong pin: %v", err)
	}
	if strings.Contains(err.Error(), cfg.PIN) {
		t.Fatal("error contains the pin")
	}
	if n := shim.Calls("C_Login"); n != 1 {
		t.Fatalf("C_Login called %d times, want exactly 1", n)
	}
	// The right PIN works afterwards: nothing was left behind.
	cfg.PIN = tk.PIN
	open(t, "right-pin", cfg)
}

func TestSessionErrorsAreRetried(t *testing.T) {
	b, shim, _ := shimBackend(t, nil)
	res, err := b.Encrypt(bg, "k1", []byte("hello"), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, rule := range []string{
		"C_Encrypt=0xB3*1",     // CKR_SESSION_HANDLE_INVALID in the middle of the call
		"C_EncryptInit=0xB3*1", // ... at its start
		"C_Decrypt=0xB3*1",
		"C_EncryptInit=0x82*1", // CKR_OBJECT_HANDLE_INVALID: the handle is found anew
		"C_Encrypt=0x101*1",    // CKR_USER_NOT_LOGGED_IN: logged in again
		"C_FindObjectsInit=0x5*1",
	} {
		t.Run(rule, func(t *testing.T) {
			b.tok.keys.clear() // so that C_FindObjectsInit is called
			name := rule[:strings.IndexByte(rule, '=')]
			before := shim.Calls(name)
			shim.Set(rule)
			if strings.HasPrefix(rule, "C_Decrypt") {
				if pt, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil); err != nil || string(pt) != "hello" {
					t.Fatalf("Decrypt: %q %v", pt, err)
				}
			} else if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
				t.Fatalf("Encrypt: %v", err)
			}
			if shim.Calls(name)-before < 2 {
				t.Fatalf("%s was not retried", name)
			}
		})
	}
	// A second failure in a row is reported, not retried for ever.
	shim.Set("C_Encrypt=0xB3*2")
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrInternal) || !strings.Contains(err.Error(), "CKR_SESSION_HANDLE_INVALID") {
		t.Fatalf("two session failures: %v", err)
	}
}

func TestDecryptVendorFailureIsInvalidCiphertext(t *testing.T) {
	b, shim, _ := shimBackend(t, nil)
	res, err := b.Encrypt(bg, "k1", []byte("hello"), nil)
	if err != nil {
		t.Fatal(err)
	}
	// nShield reports a bad tag as CKR_FUNCTION_FAILED, SoftHSM2 as
	// CKR_GENERAL_ERROR; on decrypt, while the token answers otherwise, that
	// is the ciphertext's fault, not the session's, and is not retried.
	for _, tc := range []struct{ rule, ckr string }{
		{"C_Decrypt=0x6", "CKR_FUNCTION_FAILED"},
		{"C_Decrypt=0x5", "CKR_GENERAL_ERROR"},
	} {
		before, checks := shim.Calls("C_Decrypt"), shim.Calls("C_GetSessionInfo")
		shim.Set(tc.rule)
		_, err = b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil)
		if !errors.Is(err, ErrInvalidCiphertext) || !strings.Contains(err.Error(), tc.ckr) {
			t.Fatalf("%s: Decrypt: %v", tc.rule, err)
		}
		if n := shim.Calls("C_Decrypt") - before; n != 1 {
			t.Fatalf("%s: C_Decrypt called %d times, want once", tc.rule, n)
		}
		if shim.Calls("C_GetSessionInfo") == checks {
			t.Fatalf("%s: the token was not checked before the answer", tc.rule)
		}
	}
}

// TestDecryptFailureOfAFailingTokenIsADeviceError: C_Decrypt answers
// CKR_GENERAL_ERROR or CKR_FUNCTION_FAILED, and the token fails the check
// that follows. Then it is the HSM that fails, not the ciphertext: the error
// of the check decides, as for any other call. A device error is
// ErrUnavailable and reconnects the library; a dead session is retried on a
// new one.
func TestDecryptFailureOfAFailingTokenIsADeviceError(t *testing.T) {
	tests := []struct {
		name  string
		rules []string
		want  error  // nil: the retry decrypts
		ckr   string // in the error
	}{
		{"general error, then the session check fails with a device error",
			[]string{"C_Decrypt=0x5", "C_GetSessionInfo=0x30", "C_GetTokenInfo=0x30", "C_EncryptInit=0x30"}, ErrUnavailable, "CKR_DEVICE_ERROR"},
		{"function failed, then the token is not present",
			[]string{"C_Decrypt=0x6", "C_GetTokenInfo=0xE0"}, ErrUnavailable, "CKR_TOKEN_NOT_PRESENT"},
		{"general error on a session that died: retried on a new one",
			[]string{"C_Decrypt=0x5*1", "C_GetSessionInfo=0xB3*1"}, nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, shim, _ := shimBackend(t, nil)
			res, err := b.Encrypt(bg, "k1", []byte("hello"), nil)
			if err != nil {
				t.Fatal(err)
			}
			inits, decrypts := shim.Calls("C_Initialize"), shim.Calls("C_DecryptInit")
			shim.Set(tt.rules...)
			pt, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil)
			if tt.want == nil {
				if err != nil || string(pt) != "hello" {
					t.Fatalf("Decrypt: %q %v", pt, err)
				}
				if n := shim.Calls("C_DecryptInit") - decrypts; n != 2 {
					t.Fatalf("%d decryptions, want 2: the failure and its retry", n)
				}
				return
			}
			if !errors.Is(err, tt.want) || errors.Is(err, ErrInvalidCiphertext) || !strings.Contains(err.Error(), tt.ckr) {
				t.Fatalf("Decrypt: %v, want %v with %s", err, tt.want, tt.ckr)
			}
			// The library reconnects once the token works again.
			shim.Set()
			waitFor(t, settle, func() bool { return shim.Calls("C_Initialize") > inits && !b.tok.lib.down.Load() })
			if pt, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil); err != nil || string(pt) != "hello" {
				t.Fatalf("Decrypt after the reconnection: %q %v", pt, err)
			}
		})
	}
}

// TestHealthDoesNotWaitForARunningCheck: while a round trip hangs in the
// HSM, other callers get the last (fresh) result at once (KMS allows
// 250 ms). The hang lasts until the test ends it, so a caller that waited
// would reach its own deadline and get UNAVAILABLE.
func TestHealthDoesNotWaitForARunningCheck(t *testing.T) {
	b, shim, _ := shimBackend(t, func(c *Config) {
		c.HealthTTL = caddy.Duration(time.Millisecond)
		c.CallTimeout = caddy.Duration(time.Minute)
	})
	if h := b.Health(bg); h.Status != HealthActive {
		t.Fatalf("health %+v", h)
	}
	time.Sleep(5 * time.Millisecond) // past the 1 ms TTL: the next caller runs a round trip
	shim.Set("C_Encrypt=hang")
	done := make(chan Health)
	go func() { done <- b.Health(bg) }()
	shim.WaitHung(t, "C_Encrypt", 1) // the round trip is in the HSM
	ctx, cancel := context.WithTimeout(bg, 10*time.Second)
	defer cancel()
	if h := b.Health(ctx); h.Status != HealthActive {
		t.Fatalf("health during a running check: %+v", h)
	}
	shim.Set()
	if slow := <-done; slow.Status == HealthUnavailable {
		t.Fatalf("the slow check: %+v", slow)
	}
}

// TestNewPINAfterARefusedOne: the PIN is changed on the HSM, the token
// reconnects and its old PIN is refused (and never retried); a config with
// the new PIN, loaded without a restart, logs the token in again.
func TestNewPINAfterARefusedOne(t *testing.T) {
	b, shim, tk := shimBackend(t, nil)
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	tk = tk.SetPIN(t, "changed-pin-5678")
	shim.Set("C_EncryptInit=0x30*1") // one device error: the library reconnects
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Encrypt on a failing device: %v", err)
	}
	waitFor(t, settle, func() bool { return b.tok.pinFailed.Load() != nil })
	logins := shim.Calls("C_Login")
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "PIN") {
		t.Fatalf("Encrypt with a refused PIN: %v", err)
	}
	if shim.Calls("C_Login") != logins {
		t.Fatal("a refused PIN was tried again")
	}
	cfg := configFor(tk)
	cfg.Module = shim.Path
	nb := open(t, "reloaded", cfg)
	if _, err := nb.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
		t.Fatalf("Encrypt after a config with the new PIN: %v", err)
	}
}
