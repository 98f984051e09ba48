package xkshandler_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// The recovery tests drive the HSM through a fault and back with the fault
// shim, and check what an operator relies on: the answers, the log, the
// metrics, and how many times the proxy logged in to the token.

// logEntry is one JSON line of the proxy's log.
type logEntry map[string]any

func (e logEntry) str(field string) string { return fmt.Sprint(e[field]) }

// logEntries reads the proxy's log.
func (f *fixture) logEntries() []logEntry {
	f.t.Helper()
	data, err := os.ReadFile(f.logFile)
	if err != nil {
		f.t.Fatal(err)
	}
	var entries []logEntry
	for line := range bytes.SplitSeq(data, []byte("\n")) {
		var e logEntry
		if json.Unmarshal(line, &e) == nil {
			entries = append(entries, e)
		}
	}
	return entries
}

// countLog counts the log lines that match.
func (f *fixture) countLog(match func(logEntry) bool) int {
	f.t.Helper()
	n := 0
	for _, e := range f.logEntries() {
		if match(e) {
			n++
		}
	}
	return n
}

// waitLog waits until more than n log lines match: the event they record
// has happened, however slow the machine.
func (f *fixture) waitLog(what string, n int, match func(logEntry) bool) {
	f.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for f.countLog(match) <= n {
		if time.Now().After(deadline) {
			f.t.Fatalf("no log line for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// hsmLine matches a line of the hsm app's loggers at level with msg in its
// message.
func hsmLine(level, msg string) func(logEntry) bool {
	return func(e logEntry) bool {
		return strings.HasPrefix(e.str("logger"), "hsm") && e.str("level") == level && strings.Contains(e.str("msg"), msg)
	}
}

var reconnected = hsmLine("info", "pkcs11 module reconnected")

// TestRefusedPINRecoversAfterAForcedReload: the HSM fails with a device
// error, the proxy reconnects, and the token refuses the PIN once when it is
// logged in again; then the HSM is well. The refusal is logged at ERROR with
// what to do, counted, and reported by health; the proxy does not try the
// PIN again by itself (real HSMs lock it), and a plain reload of the
// unchanged config is a no-op. `caddy reload --force` of the same config is
// one attempt to log in: refused, the reload fails and says why; accepted,
// the proxy serves again without a restart.
func TestRefusedPINRecoversAfterAForcedReload(t *testing.T) {
	f, shim := newFaultFixture(t, "")
	before := f.encrypt(f.ks1[0], "/ks1", keyBoth, []byte("sealed before the fault"), nil)
	encrypt := func() response {
		t.Helper()
		return f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false))
	}
	refused := hsmLine("error", "refused the PIN")

	shim.Set("C_Encrypt=0x30", "C_Login=0xA0*1") // CKR_DEVICE_ERROR; CKR_PIN_INCORRECT, once
	expectError(t, encrypt(), http.StatusInternalServerError, "InternalException")
	f.waitLog("the refused PIN", 0, refused)
	f.waitLog("the reconnection", 0, func(e logEntry) bool {
		return strings.HasPrefix(e.str("logger"), "hsm") && strings.Contains(e.str("msg"), "pkcs11 module reconnected")
	})
	shim.Set() // from here on a login would succeed: only the count shows one
	logins := shim.Calls("C_Login")

	for _, e := range f.logEntries() {
		if refused(e) && (!strings.Contains(e.str("token"), f.token.Label) || e.str("ckr") != "CKR_PIN_INCORRECT" ||
			!strings.Contains(e.str("action"), "caddy reload --force")) {
			t.Errorf("the refusal's log line lacks the token, the CKR name or what to do: %v", e)
		}
	}
	for range 3 {
		expectError(t, encrypt(), http.StatusInternalServerError, "InternalException")
		if h := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody); h.status != http.StatusOK || !strings.Contains(h.raw, `"healthStatus":"UNAVAILABLE"`) {
			t.Errorf("health with a refused PIN: %d %s", h.status, h.raw)
		}
	}
	m := f.metrics()
	if v := proxytest.MetricValue(t, m, `caddy_xks_hsm_health{backend="main",status="UNAVAILABLE"}`); v != 1 {
		t.Errorf("caddy_xks_hsm_health UNAVAILABLE = %v, want 1:\n%s", v, grepLines(m, "caddy_xks_hsm_health"))
	}
	if v := proxytest.MetricValue(t, m, `caddy_xks_hsm_login_failures_total{backend="main"}`); v != 1 {
		t.Errorf("caddy_xks_hsm_login_failures_total = %v, want 1:\n%s", v, grepLines(m, "login_failures"))
	}
	healthReasons := f.countLog(func(e logEntry) bool {
		return e.str("logger") == "http.handlers.xks.audit" && e.str("operation") == "GetHealthStatus" &&
			strings.Contains(e.str("reason"), "UNAVAILABLE") && strings.Contains(e.str("reason"), "CKR_PIN_INCORRECT")
	})
	if healthReasons == 0 {
		t.Error("no GetHealthStatus audit line says why the backend is UNAVAILABLE")
	}

	// A plain reload of the unchanged config: Caddy leaves it alone.
	f.load(1)
	expectError(t, encrypt(), http.StatusInternalServerError, "InternalException")
	if n := shim.Calls("C_Login") - logins; n != 0 {
		t.Fatalf("%d C_Login calls without a forced reload, want none", n)
	}

	// A forced reload while the token still refuses the PIN: one attempt,
	// and the reload fails, saying why; the running config stays.
	shim.Set("C_Login=0xA0*1")
	err := f.proxy.ForceReload(f.config(1))
	shim.Set()
	if err == nil || !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
		t.Fatalf("forced reload with the PIN still refused: %v", err)
	}
	if n := shim.Calls("C_Login") - logins; n != 1 {
		t.Fatalf("the refused forced reload made %d C_Login calls, want 1", n)
	}
	f.proxy.Client.CloseIdleConnections()
	expectError(t, encrypt(), http.StatusInternalServerError, "InternalException")

	// The forced reload once the PIN works: one login, and the proxy serves.
	if err := f.proxy.ForceReload(f.config(1)); err != nil {
		t.Fatalf("forced reload: %v", err)
	}
	f.proxy.Client.CloseIdleConnections()
	if n := shim.Calls("C_Login") - logins; n != 2 {
		t.Fatalf("%d C_Login calls after the second forced reload, want 2", n)
	}
	if r := encrypt(); r.status != http.StatusOK {
		t.Fatalf("encrypt after the forced reload: %d %s", r.status, r.raw)
	}
	r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/decrypt", decryptBody(before, nil))
	if r.status != http.StatusOK || string(r.bytes(t, "plaintext")) != "sealed before the fault" {
		t.Fatalf("decrypt after the forced reload: %d %s", r.status, r.raw)
	}
	if h := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody); strings.Contains(h.raw, "UNAVAILABLE") {
		t.Errorf("health after the forced reload: %s", h.raw)
	}
	if f.countLog(hsmLine("warn", "tries to log in once")) != 2 || f.countLog(hsmLine("info", "token logged in")) != 1 {
		t.Errorf("the log does not record the two login attempts of the forced reloads and the login:\n%s", grepLines(string(mustRead(t, f.logFile)), `"logger":"hsm`))
	}
	if v := proxytest.MetricValue(t, f.metrics(), `caddy_xks_hsm_login_failures_total{backend="main"}`); v != 2 {
		t.Errorf("caddy_xks_hsm_login_failures_total = %v, want 2", v)
	}
}

func mustRead(t testing.TB, file string) []byte {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestHealthAfterAReconnectIsNotCached: a health result cached before a
// device error (the default health_ttl is 30 s) is not what the first
// GetHealthStatus after the reconnection answers.
func TestHealthAfterAReconnectIsNotCached(t *testing.T) {
	f, shim := newFaultFixture(t, "")
	health := func() response {
		return f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody)
	}
	if h := health(); !strings.Contains(h.raw, `"healthStatus":"ACTIVE"`) {
		t.Fatalf("health before the fault: %s", h.raw)
	}
	reconnects := f.countLog(reconnected)
	shim.Set("C_EncryptInit=0x30*1") // one device error
	expectError(t, f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false)),
		http.StatusInternalServerError, "InternalException")
	f.waitLog("the reconnection", reconnects, reconnected)
	if h := health(); h.status != http.StatusOK || !strings.Contains(h.raw, `"healthStatus":"DEGRADED"`) {
		t.Errorf("first health after the reconnection: %d %s, want DEGRADED", h.status, h.raw)
	}
}

// TestDecryptFaultOfAFailingTokenIsADeviceError: C_Decrypt answering
// CKR_GENERAL_ERROR is a bad tag while the token is healthy
// (InvalidCiphertextException, which KMS does not retry), but a device
// error while the token fails its other calls: answered 500 and
// reconnected.
func TestDecryptFaultOfAFailingTokenIsADeviceError(t *testing.T) {
	f, shim := newFaultFixture(t, "")
	s := f.encrypt(f.ks1[0], "/ks1", keyBoth, []byte("sealed"), nil)
	decrypt := func() response {
		return f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/decrypt", decryptBody(s, nil))
	}
	shim.Set("C_Decrypt=0x5")
	expectError(t, decrypt(), http.StatusBadRequest, "InvalidCiphertextException")

	failures := f.countLog(hsmLine("error", "pkcs11 module failed"))
	shim.Set("C_Decrypt=0x5", "C_GetSessionInfo=0x30", "C_GetTokenInfo=0x30", "C_EncryptInit=0x30")
	expectError(t, decrypt(), http.StatusInternalServerError, "InternalException")
	f.waitLog("the reconnection's start", failures, hsmLine("error", "pkcs11 module failed"))
	shim.Set()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		r := decrypt()
		if r.status == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after the HSM came back: %d %s", r.status, r.raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
