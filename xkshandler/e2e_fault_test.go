package xkshandler_test

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/internal/faultshim"
)

// The fault tests put a PKCS#11 shim between Caddy and SoftHSM2 that fails
// or stalls chosen calls: SoftHSM2 itself cannot produce device errors or
// hang, which is exactly what these tests need.

func newFaultFixture(t *testing.T, hsmExtra string) (*fixture, *faultshim.Shim) {
	t.Helper()
	var shim *faultshim.Shim
	f := newFixtureWith(t, func(f *fixture) {
		shim = faultshim.New(t, f.token.Module)
		f.module = shim.Path
		f.exportable = false
		f.hsmExtra = hsmExtra
	})
	// A device error makes the backend re-initialize its library, in the
	// background and with backoff. The shim forwards C_Finalize and
	// C_Initialize to SoftHSM2, whose state is per process: the next test
	// must not start before that has settled.
	t.Cleanup(func() {
		shim.Set()
		deadline := time.Now().Add(2 * time.Minute)
		for {
			r := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody)
			if r.status == http.StatusOK && !strings.Contains(r.raw, "UNAVAILABLE") {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the HSM did not recover after the test: %s", r.raw)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	return f, shim
}

// TestHungHSMIsDependencyTimeout: the HSM hangs until the test releases
// it, so the answer can only come from the call timeout.
func TestHungHSMIsDependencyTimeout(t *testing.T) {
	// Long enough for the start-up self-test on a loaded machine; the hang
	// is longer still.
	f, shim := newFaultFixture(t, "\t\t\tcall_timeout 1s")
	shim.Set("C_Encrypt=hang")
	r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false))
	expectError(t, r, http.StatusServiceUnavailable, "DependencyTimeoutException")
	if shim.Hung("C_Encrypt") != 1 {
		t.Errorf("%d calls hung, want the one", shim.Hung("C_Encrypt"))
	}
	shim.Set()
	// Metadata needs no C_Encrypt and is served while the hung call ends.
	if r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/metadata", metaBody); r.status != http.StatusOK {
		t.Errorf("metadata beside a hung call: %d %s", r.status, r.raw)
	}
}

func TestExhaustedSessionsAreThrottling(t *testing.T) {
	f, shim := newFaultFixture(t, "\t\t\tmax_sessions 1\n\t\t\tsession_wait 20ms")
	f.load(2)
	shim.Set("C_Encrypt=hang")
	var wg sync.WaitGroup
	var slow response
	wg.Go(func() {
		slow = f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false))
	})
	shim.WaitHung(t, "C_Encrypt", 1) // the slow call holds the only session
	r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/metadata", metaBody)
	expectError(t, r, http.StatusTooManyRequests, "ThrottlingException")
	shim.Set()
	wg.Wait()
	if slow.status != http.StatusOK {
		t.Errorf("the slow call: %d %s", slow.status, slow.raw)
	}
}

func TestDeviceErrorIsInternalThenRecovers(t *testing.T) {
	f, shim := newFaultFixture(t, "\t\t\thealth_ttl 1ms")
	shim.Set("C_EncryptInit=0x30") // CKR_DEVICE_ERROR
	r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false))
	expectError(t, r, http.StatusInternalServerError, "InternalException")
	h := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody)
	if h.status != http.StatusOK || !strings.Contains(h.raw, `"healthStatus":"UNAVAILABLE"`) {
		t.Errorf("health while the HSM fails: %d %s", h.status, h.raw)
	}
	shim.Set()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false))
		if r.status == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after the HSM came back: %d %s", r.status, r.raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
