package ekmhandler_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/internal/faultshim"
	"github.com/caddy-xks/caddy-xks/internal/kwref"
	"github.com/caddy-xks/caddy-xks/internal/vendorshim"
)

// The fault tests put a PKCS#11 shim between Caddy and SoftHSM2 that fails
// or stalls chosen calls, which SoftHSM2 itself cannot, and check the
// answers in the API's terms: the same rules as XKS (package hsm's pool,
// deadlines and reconnection), with the statuses of reference/azure-ekm.md
// §5.1.

// newFaultFixture runs the proxy with a fault shim in front of backend soft,
// changed by change.
func newFaultFixture(t *testing.T, change func(*fixture)) (*fixture, *faultshim.Shim) {
	t.Helper()
	var shim *faultshim.Shim
	f := newFixtureWith(t, func(f *fixture) {
		shim = faultshim.New(t, f.soft.Module)
		f.module = shim.Path
		change(f)
	})
	// A device error makes the backend re-initialize its library in the
	// background; the shim forwards that to SoftHSM2, whose state is per
	// process: the next test must not start before it has settled.
	t.Cleanup(func() {
		shim.Set()
		waitFor(t, "the HSM to recover after the test", func() bool {
			return f.call(&f.good, "/soft/info", query, contextBody).status == http.StatusOK
		})
	})
	return f, shim
}

// waitFor waits, however slow the machine, for ok.
func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("waited two minutes for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestHungHSMIsRequestTimeout: the HSM hangs in C_WrapKey until the test
// releases it, so the answer can only come from the key store's deadline:
// 408 RequestTimeout, Microsoft's status for an HSM that did not answer in
// the proxy's budget. Metadata, which needs no C_WrapKey, is served beside
// the hung call.
func TestHungHSMIsRequestTimeout(t *testing.T) {
	// Long enough for the start-up checks on a loaded machine; the hang is
	// longer still.
	f, shim := newFaultFixture(t, func(f *fixture) { f.softStore = "\t\t\tdeadline 1s\n" })
	shim.Set("C_WrapKey=hang")
	r := f.wrap("/soft", kekAES, ekmapi.AlgA256KW, randomBytes(32))
	expectError(t, r, http.StatusRequestTimeout, ekmapi.CodeRequestTimeout)
	if shim.Hung("C_WrapKey") != 1 {
		t.Errorf("%d calls hung, want the one", shim.Hung("C_WrapKey"))
	}
	if r := f.call(&f.good, "/soft/"+kekAES+"/metadata", query, contextBody); r.status != http.StatusOK {
		t.Errorf("metadata beside a hung call: %d %s", r.status, r.raw)
	}
	shim.Set()
}

// TestSaturationIsThrottled: with the backend's only session held by a
// hung call, the next call is 429 Throttled with Retry-After; so is a call
// past the key store's max_concurrent. The hung call succeeds once the HSM
// answers.
func TestSaturationIsThrottled(t *testing.T) {
	for _, tt := range []struct {
		name          string
		hsm, keyStore string
		message       string
	}{
		{"the session pool", "\t\t\tmax_sessions 1\n\t\t\tsession_wait 20ms\n", "", "the HSM is busy; retry later"},
		{"max_concurrent", "", "\t\t\tmax_concurrent 1\n", "too many requests of this key store are in the HSM"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f, shim := newFaultFixture(t, func(f *fixture) { f.softExtra, f.softStore = tt.hsm, tt.keyStore })
			dek := randomBytes(32)
			wrapped := kwref.KW(f.softKEK, dek)
			shim.Set("C_UnwrapKey=hang")
			var wg sync.WaitGroup
			var slow response
			wg.Go(func() { slow = f.unwrap("/soft", kekAES, ekmapi.AlgA256KW, wrapped) })
			shim.WaitHung(t, "C_UnwrapKey", 1)
			r := f.call(&f.good, "/soft/"+kekAES+"/metadata", query, contextBody)
			expectError(t, r, http.StatusTooManyRequests, ekmapi.CodeThrottled)
			if r.header.Get("Retry-After") != "1" || !bytes.Contains([]byte(r.raw), []byte(tt.message)) {
				t.Errorf("%s: Retry-After %q, %s", tt.name, r.header.Get("Retry-After"), r.raw)
			}
			shim.Set()
			wg.Wait()
			if got := f.value(slow, true); !bytes.Equal(got, dek) {
				t.Errorf("the slow call unwrapped another key")
			}
		})
	}
}

// TestDeviceErrorIsBadGatewayThenRecovers: a failing device is 502
// BadGateway for key wrap and for info, whose health then finds no HSM
// available; once the device answers again the proxy serves again without
// a restart, and what it wraps still unwraps in software.
func TestDeviceErrorIsBadGatewayThenRecovers(t *testing.T) {
	f, shim := newFaultFixture(t, func(f *fixture) { f.softExtra = "\t\t\thealth_ttl 1ms\n" })
	shim.Set("C_WrapKey=0x30", "C_UnwrapKey=0x30", "C_Decrypt=0x30", "C_EncryptInit=0x30") // CKR_DEVICE_ERROR
	expectError(t, f.wrap("/soft", kekAES, ekmapi.AlgA256KW, randomBytes(32)), http.StatusBadGateway, ekmapi.CodeBadGateway)
	expectError(t, f.call(&f.good, "/soft/info", query, contextBody), http.StatusBadGateway, ekmapi.CodeBadGateway)
	shim.Set()
	dek := randomBytes(32)
	waitFor(t, "key wrap after the HSM came back", func() bool {
		return f.wrap("/soft", kekAES, ekmapi.AlgA256KW, dek).status == http.StatusOK
	})
	if back, err := kwref.KWUnwrap(f.softKEK, f.value(f.wrap("/soft", kekAES, ekmapi.AlgA256KW, dek), false)); err != nil || !bytes.Equal(back, dek) {
		t.Fatalf("after recovery: %v", err)
	}
	if n := shim.Calls("C_Initialize"); n < 2 {
		t.Fatalf("C_Initialize called %d times; no re-initialization", n)
	}
}

// TestVendorShims runs key wrap through Caddy on each production HSM's
// documented behaviour (package vendorshim: nShield's accelerator slot
// without private objects, CloudHSM's session limit, Luna's two firmware
// generations, a module with NSS's length query), with a fault shim in
// front: each serves A256KW, A256KWP and RSA-OAEP, checked against
// software, then fails with a device error and recovers. vendorshim
// changes AES-GCM only: what it proves for key wrap is that the login,
// session and object rules of each personality leave key wrap working.
func TestVendorShims(t *testing.T) {
	for _, p := range vendorshim.All {
		t.Run(p.Name, func(t *testing.T) {
			var shim *faultshim.Shim
			f := newFixtureWith(t, func(f *fixture) {
				v := vendorshim.New(t, p, f.soft.Module, f.soft.Label)
				shim = faultshim.New(t, v.Path)
				f.module = shim.Path
				f.softToken = v.TokenLabel(f.soft.Label)
				f.softExtra = fmt.Sprintf("\t\t\tiv %s\n\t\t\tprivate_keys %t\n", p.IVMode, p.PrivateKeys)
				f.keysNotPrivate = !p.PrivateKeys
			})
			t.Cleanup(func() {
				shim.Set()
				waitFor(t, "the HSM to recover after the test", func() bool {
					return f.call(&f.good, "/soft/info", query, contextBody).status == http.StatusOK
				})
			})
			dek := randomBytes(32)
			for _, alg := range []string{ekmapi.AlgA256KW, ekmapi.AlgA256KWP} {
				pad := alg == ekmapi.AlgA256KWP
				sw := aesSoftware(f.softKEK, pad)
				if back, err := sw.unwrap(f.value(f.wrap("/soft", kekAES, alg, dek), false)); err != nil || !bytes.Equal(back, dek) {
					t.Fatalf("%s: software does not unwrap the proxy's: %v", alg, err)
				}
				if got := f.value(f.unwrap("/soft", kekAES, alg, sw.wrap(dek)), true); !bytes.Equal(got, dek) {
					t.Fatalf("%s: the proxy does not unwrap software's", alg)
				}
			}
			oaep, _ := rsa.EncryptOAEP(crypto.SHA1.New(), rand.Reader, &f.pair.PublicKey, dek, nil)
			if got := f.value(f.unwrap("/soft", kekRSA, ekmapi.AlgRSAOAEP, oaep), true); !bytes.Equal(got, dek) {
				t.Fatal("RSA-OAEP: the proxy does not unwrap crypto/rsa's")
			}
			shim.Set("C_Decrypt=0x30", "C_UnwrapKey=0x30", "C_WrapKey=0x30")
			expectError(t, f.unwrap("/soft", kekRSA, ekmapi.AlgRSAOAEP, oaep), http.StatusBadGateway, ekmapi.CodeBadGateway)
			shim.Set()
			waitFor(t, "RSA-OAEP after the HSM came back", func() bool {
				return f.unwrap("/soft", kekRSA, ekmapi.AlgRSAOAEP, oaep).status == http.StatusOK
			})
		})
	}
}

// TestUnwrapFaultOfAFailingTokenIsADeviceError: C_UnwrapKey (AES key wrap
// on SoftHSM2) and C_Decrypt (RSA-OAEP) answering CKR_GENERAL_ERROR, which
// is what SoftHSM2 answers a tampered wrapped key with, is 400
// InvalidCiphertext while the token is healthy; while the token fails its
// other calls too, it is a device error, 502 BadGateway, and the proxy
// reconnects.
func TestUnwrapFaultOfAFailingTokenIsADeviceError(t *testing.T) {
	f, shim := newFaultFixture(t, func(*fixture) {})
	dek := randomBytes(32)
	kw := kwref.KW(f.softKEK, dek)
	oaep, _ := rsa.EncryptOAEP(crypto.SHA1.New(), rand.Reader, &f.pair.PublicKey, dek, nil)
	for _, tt := range []struct {
		name, key, alg, fn string
		wrapped            []byte
	}{
		{"A256KW through C_UnwrapKey", kekAES, ekmapi.AlgA256KW, "C_UnwrapKey", kw},
		{"RSA-OAEP through C_Decrypt", kekRSA, ekmapi.AlgRSAOAEP, "C_Decrypt", oaep},
	} {
		t.Run(tt.name, func(t *testing.T) {
			shim.Set(tt.fn + "=0x5")
			expectError(t, f.unwrap("/soft", tt.key, tt.alg, tt.wrapped), http.StatusBadRequest, ekmapi.CodeInvalidCiphertext)
			shim.Set(tt.fn+"=0x5", "C_GetSessionInfo=0x30", "C_GetTokenInfo=0x30", "C_EncryptInit=0x30")
			expectError(t, f.unwrap("/soft", tt.key, tt.alg, tt.wrapped), http.StatusBadGateway, ekmapi.CodeBadGateway)
			shim.Set()
			waitFor(t, "unwrap after the HSM came back", func() bool {
				return f.unwrap("/soft", tt.key, tt.alg, tt.wrapped).status == http.StatusOK
			})
		})
	}
}

// TestRefusedPINRecoversAfterAForcedReload: the HSM fails with a device
// error and, when the proxy reconnects, refuses the PIN once. The proxy
// never tries the PIN again on its own (real HSMs lock it): info and key
// wrap answer 502 BadGateway, until a forced reload makes one login, which
// succeeds, and the proxy serves again.
func TestRefusedPINRecoversAfterAForcedReload(t *testing.T) {
	f, shim := newFaultFixture(t, func(*fixture) {})
	dek := randomBytes(32)
	wrapped := f.value(f.wrap("/soft", kekAES, ekmapi.AlgA256KW, dek), false)
	shim.Set("C_UnwrapKey=0x30", "C_Login=0xA0*1") // CKR_DEVICE_ERROR; CKR_PIN_INCORRECT, once
	expectError(t, f.unwrap("/soft", kekAES, ekmapi.AlgA256KW, wrapped), http.StatusBadGateway, ekmapi.CodeBadGateway)
	waitFor(t, "the refused login", func() bool { return shim.Calls("C_Login") > 1 })
	shim.Set()
	logins := shim.Calls("C_Login")
	for range 3 {
		expectError(t, f.unwrap("/soft", kekAES, ekmapi.AlgA256KW, wrapped), http.StatusBadGateway, ekmapi.CodeBadGateway)
		expectError(t, f.call(&f.good, "/soft/info", query, contextBody), http.StatusBadGateway, ekmapi.CodeBadGateway)
	}
	if n := shim.Calls("C_Login") - logins; n != 0 {
		t.Fatalf("%d C_Login calls without a reload, want none", n)
	}
	if err := f.proxy.ForceReload(f.config()); err != nil {
		t.Fatalf("forced reload: %v", err)
	}
	f.closeIdle()
	if n := shim.Calls("C_Login") - logins; n != 1 {
		t.Fatalf("%d C_Login calls after the forced reload, want 1", n)
	}
	if got := f.value(f.unwrap("/soft", kekAES, ekmapi.AlgA256KW, wrapped), true); !bytes.Equal(got, dek) {
		t.Fatal("after the forced reload the proxy unwrapped another key")
	}
}
