package hsm

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap/zaptest"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/faultshim"
)

// shimBackend opens a backend through a freshly built fault shim that
// forwards to SoftHSM2. Each shim is a library of its own, so its
// re-initializations reach no other test's backend. The shim forwards
// C_Finalize, so every test leaves SoftHSM2 initialized again before it ends.
func shimBackend(t *testing.T, mod func(*Config)) (*Backend, *faultshim.Shim, hsmtest.Token) {
	t.Helper()
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1")
	shim := faultshim.New(t, tk.Module)
	cfg := configFor(tk)
	cfg.Module = shim.Path
	if mod != nil {
		mod(&cfg)
	}
	b := open(t, "shimmed", cfg)
	t.Cleanup(func() {
		shim.Set()
		waitFor(t, 5*time.Second, func() bool { return !b.tok.lib.down.Load() })
	})
	return b, shim, tk
}

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
	// While the device fails, calls fail fast and health says so.
	start := time.Now()
	for i := 0; i < 50; i++ {
		if _, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Decrypt on a failing device: %v", err)
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("50 failing calls took %s; not failing fast", d)
	}
	if h := b.Health(bg); h.Status != HealthUnavailable {
		t.Fatalf("health while failing: %+v", h)
	}
	// The device comes back: the backend serves again, without a restart.
	shim.Set()
	waitFor(t, 5*time.Second, func() bool {
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
	// breaker spaces them out (20 ms doubling to 200 ms in tests).
	shim.Set("C_OpenSession=0x30", "C_EncryptInit=0x30")
	deadline := time.Now().Add(600 * time.Millisecond)
	for time.Now().Before(deadline) {
		_, _ = b.Encrypt(bg, "k1", []byte("x"), nil)
		time.Sleep(time.Millisecond)
	}
	if n := shim.Calls("C_Initialize") - before; n < 2 || n > 8 {
		t.Fatalf("%d re-initializations in 600ms of continuous failure", n)
	}
}

func TestHangTimesOut(t *testing.T) {
	const timeout = 200 * time.Millisecond
	b, shim, _ := shimBackend(t, func(c *Config) { c.CallTimeout = caddy.Duration(timeout) })
	shim.Set("C_Encrypt=sleep:1500")
	start := time.Now()
	_, err := b.Encrypt(bg, "k1", []byte("x"), nil)
	elapsed := time.Since(start)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("Encrypt on a hung HSM: %v", err)
	}
	if elapsed < timeout || elapsed > timeout+100*time.Millisecond {
		t.Fatalf("timed out after %s, want %s", elapsed, timeout)
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
	waitFor(t, 3*time.Second, func() bool { return b.Stats().StuckCalls == 0 })
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
}

func TestStuckCallsCapped(t *testing.T) {
	const sessions = 4
	b, shim, _ := shimBackend(t, func(c *Config) {
		c.MaxSessions = sessions
		c.CallTimeout = caddy.Duration(100 * time.Millisecond)
		c.SessionWait = caddy.Duration(20 * time.Millisecond)
	})
	shim.Set("C_Encrypt=sleep:1000")
	var wg sync.WaitGroup
	errs := make(chan error, 12)
	start := time.Now()
	for i := 0; i < cap(errs); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := b.Encrypt(bg, "k1", []byte("x"), nil)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("callers were held for %s by hung calls", d)
	}
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
	waitFor(t, 3*time.Second, func() bool { return b.Stats().StuckCalls == 0 })
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
	// nShield reports a bad tag as CKR_FUNCTION_FAILED; on decrypt that is
	// the ciphertext's fault, not the session's, and is not retried.
	before := shim.Calls("C_Decrypt")
	shim.Set("C_Decrypt=0x6")
	_, err = b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil)
	if !errors.Is(err, ErrInvalidCiphertext) || !strings.Contains(err.Error(), "CKR_FUNCTION_FAILED") {
		t.Fatalf("Decrypt: %v", err)
	}
	if n := shim.Calls("C_Decrypt") - before; n != 1 {
		t.Fatalf("C_Decrypt called %d times, want once", n)
	}
}

// TestHealthDoesNotWaitForARunningCheck: while a slow round trip runs,
// other callers get the last result at once (KMS allows 250 ms).
func TestHealthDoesNotWaitForARunningCheck(t *testing.T) {
	b, shim, _ := shimBackend(t, func(c *Config) {
		c.HealthTTL = caddy.Duration(time.Millisecond)
		c.CallTimeout = caddy.Duration(5 * time.Second)
	})
	if h := b.Health(bg); h.Status != HealthActive {
		t.Fatalf("health %+v", h)
	}
	time.Sleep(5 * time.Millisecond)
	shim.Set("C_Encrypt=sleep:500")
	done := make(chan Health)
	go func() { done <- b.Health(bg) }()
	time.Sleep(100 * time.Millisecond) // the slow check is running
	start := time.Now()
	h := b.Health(bg)
	if d := time.Since(start); d > 50*time.Millisecond || h.Status != HealthActive {
		t.Fatalf("health during a running check took %s: %+v", d, h)
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
	waitFor(t, 10*time.Second, func() bool { return b.tok.pinFailed.Load() != nil })
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
