package hsm

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/miekg/pkcs11"
	"go.uber.org/zap/zaptest"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/faultshim"
	"github.com/caddy-xks/caddy-xks/internal/vendorshim"
)

// The vendor matrix: every personality of the vendor shim (nShield,
// CloudHSM, two Luna firmware generations, and a module that answers the
// GCM length query as NSS softokn does) through the backend, with real
// AES-GCM underneath that Go's crypto/cipher checks.

// vendorToken makes a SoftHSM2 token with an extractable key "k1" that the
// personality can use (not private on nShield's accelerator slot) and a
// shim over it.
func vendorToken(t *testing.T, p vendorshim.Personality) (hsmtest.Token, *vendorshim.Shim) {
	t.Helper()
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1", hsmtest.Extractable(), hsmtest.Private(p.PrivateKeys))
	return tk, vendorshim.New(t, p, tk.Module, tk.Label)
}

// vendorConfig is the backend config of the personality: the module's
// token label, no login on nShield's accelerator slot, and iv auto. It
// allows exportable keys: Go's AES-GCM checks the module's output with k1's
// value.
func vendorConfig(tk hsmtest.Token, shim *vendorshim.Shim, module string) Config {
	cfg := configFor(tk)
	cfg.AllowExportableKeys = true
	cfg.Module = module
	cfg.Token = shim.TokenLabel(tk.Label)
	cfg.IVMode = "auto"
	private := shim.PrivateKeys
	cfg.PrivateKeys = &private
	if shim.FakeLogin {
		cfg.PIN, cfg.NoLogin = "", true
	}
	return cfg
}

func TestVendorIVModeAuto(t *testing.T) {
	for _, p := range vendorshim.All {
		t.Run(p.Name, func(t *testing.T) {
			tk, shim := vendorToken(t, p)
			b := open(t, p.Name, vendorConfig(tk, shim, shim.Path))
			if b.IVMode() != p.IVMode {
				t.Fatalf("iv auto picked %s, want %s", b.IVMode(), p.IVMode)
			}
			block, err := aes.NewCipher(tk.KeyValue(t, "k1"))
			if err != nil {
				t.Fatal(err)
			}
			aead, err := cipher.NewGCMWithNonceSize(block, p.IVLen)
			if err != nil {
				t.Fatal(err)
			}
			seen := make(map[string]bool)
			for _, size := range []int{0, 1, 32, 4300} {
				pt := bytes.Repeat([]byte{'p'}, size)
				aad := bytes.Repeat([]byte{'a'}, 35)
				res, err := b.Encrypt(bg, "k1", pt, aad)
				if err != nil {
					t.Fatalf("Encrypt(%d): %v", size, err)
				}
				if len(res.IV) != p.IVLen || seen[string(res.IV)] {
					t.Fatalf("iv %x: want %d fresh bytes", res.IV, p.IVLen)
				}
				seen[string(res.IV)] = true
				if got, want := append(bytes.Clone(res.Ciphertext), res.Tag...), aead.Seal(nil, res.IV, pt, aad); !bytes.Equal(got, want) {
					t.Fatalf("ciphertext of %d bytes differs from crypto/cipher's under the iv the module made", size)
				}
				back, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, aad)
				if err != nil || !bytes.Equal(back, pt) {
					t.Fatalf("Decrypt(%d): %v", size, err)
				}
				tag := bytes.Clone(res.Tag)
				tag[0] ^= 1
				if _, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, tag, aad); !errors.Is(err, ErrInvalidCiphertext) {
					t.Fatalf("Decrypt with a wrong tag: %v, want ErrInvalidCiphertext", err)
				}
			}
			// A ciphertext made by Go decrypts in the HSM.
			iv := bytes.Repeat([]byte{7}, p.IVLen)
			sealed := aead.Seal(nil, iv, []byte("from go"), nil)
			if pt, err := b.Decrypt(bg, "k1", iv, sealed[:7], sealed[7:], nil); err != nil || string(pt) != "from go" {
				t.Fatalf("Decrypt of Go's ciphertext: %q %v", pt, err)
			}
			if h := b.Health(bg); h.Status != HealthActive {
				t.Fatalf("health %+v", h)
			}
		})
	}
}

func TestVendorWrongIVModeIsRefusedNamingTheRightOne(t *testing.T) {
	for _, p := range vendorshim.All {
		t.Run(p.Name, func(t *testing.T) {
			tk, shim := vendorToken(t, p)
			cfg := vendorConfig(tk, shim, shim.Path)
			cfg.IVMode = p.WrongIVMode
			_, err := Open(p.Name, cfg, zaptest.NewLogger(t))
			if err == nil {
				t.Fatalf("iv %s accepted", p.WrongIVMode)
			}
			want := "iv mode " + p.WrongIVMode + " does not work on this token"
			if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "the self-test passes with iv "+p.IVMode) {
				t.Fatalf("error %q does not say %q and name iv %s", err, want, p.IVMode)
			}
			cfg.IVMode = p.IVMode
			if b := open(t, p.Name, cfg); b.IVMode() != p.IVMode {
				t.Fatalf("iv mode %s", b.IVMode())
			}
		})
	}
}

func TestVendorKeygen(t *testing.T) {
	for _, p := range vendorshim.All {
		t.Run(p.Name, func(t *testing.T) {
			tk, shim := vendorToken(t, p)
			b := open(t, p.Name, vendorConfig(tk, shim, shim.Path))
			// The token says whether it needs keys that are not private.
			if can, err := b.CanHoldPrivateKeys(bg); err != nil || can != p.PrivateKeys {
				t.Fatalf("CanHoldPrivateKeys = %v, %v; the module needs private_keys %v", can, err, p.PrivateKeys)
			}
			meta, err := b.GenerateKey(bg, "generated")
			if err != nil {
				t.Fatalf("GenerateKey: %v", err)
			}
			if meta.KeySpec != "AES_256" {
				t.Fatalf("metadata %+v", meta)
			}
			if got := tk.Attribute(t, "generated", pkcs11.CKA_PRIVATE); len(got) != 1 || (got[0] == 1) != p.PrivateKeys {
				t.Fatalf("CKA_PRIVATE %v, want %v", got, p.PrivateKeys)
			}
			res, err := b.Encrypt(bg, "generated", []byte("x"), nil)
			if err != nil {
				t.Fatal(err)
			}
			if pt, err := b.Decrypt(bg, "generated", res.IV, res.Ciphertext, res.Tag, nil); err != nil || string(pt) != "x" {
				t.Fatalf("Decrypt: %q %v", pt, err)
			}
		})
	}
}

// TestNShieldLoginNeedsFakeLogin: with a pin line and
// CKNFAST_FAKE_ACCELERATOR_LOGIN the login succeeds without a PIN check;
// without the variable the accelerator slot refuses the login, and the
// backend does not open, naming the module's code. Which code nShield
// answers is not documented (the shim assumes
// CKR_USER_PIN_NOT_INITIALIZED), so the refusal is tried with others too.
func TestNShieldLoginNeedsFakeLogin(t *testing.T) {
	tk, shim := vendorToken(t, vendorshim.NShield)
	cfg := vendorConfig(tk, shim, shim.Path)
	cfg.NoLogin, cfg.PIN = false, "ignored-by-the-module"
	open(t, "nshield", cfg)

	for _, tt := range []struct {
		code uint
		ckr  string
	}{
		{pkcs11.CKR_USER_PIN_NOT_INITIALIZED, "CKR_USER_PIN_NOT_INITIALIZED"},
		{pkcs11.CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"},
		{pkcs11.CKR_USER_TYPE_INVALID, "CKR_USER_TYPE_INVALID"},
	} {
		t.Run(tt.ckr, func(t *testing.T) {
			tk := hsmtest.NewToken(t)
			shim := vendorshim.New(t, vendorshim.NShield, tk.Module, tk.Label, vendorshim.NShieldLoginRefusal(tt.code))
			t.Setenv("CKNFAST_FAKE_ACCELERATOR_LOGIN", "")
			cfg := vendorConfig(tk, shim, shim.Path)
			cfg.NoLogin, cfg.PIN = false, "some-pin"
			if _, err := Open("nshield", cfg, zaptest.NewLogger(t)); err == nil || !strings.Contains(err.Error(), tt.ckr) {
				t.Fatalf("login without fake login: %v", err)
			}
		})
	}
}

// TestCloudHSMSessionLimit: the pool is clamped to the session limit the
// token reports, less the anchor session, and a full pool answers busy
// rather than asking the HSM for a session it would refuse.
func TestCloudHSMSessionLimit(t *testing.T) {
	tk, shim := vendorToken(t, vendorshim.CloudHSM)
	b := open(t, "cloudhsm", vendorConfig(tk, shim, shim.Path))
	if got, want := b.Stats().MaxSessions, vendorshim.DefaultCloudHSMSessions-1; got != want {
		t.Fatalf("pool size %d, want %d (the token's limit less the anchor session)", got, want)
	}
}

// TestVendorFaultsRecover stacks the fault shim in front of each
// personality: a device error reconnects, a hang times out and the backend
// serves once the HSM answers again, and a session that dies in the middle
// of a call is replaced, as on SoftHSM2.
func TestVendorFaultsRecover(t *testing.T) {
	for _, p := range vendorshim.All {
		t.Run(p.Name, func(t *testing.T) {
			tk, shim := vendorToken(t, p)
			faults := faultshim.New(t, shim.Path)
			cfg := vendorConfig(tk, shim, faults.Path)
			// Long enough for a call on a loaded machine; the hang below
			// lasts until the test ends it.
			cfg.CallTimeout = caddy.Duration(2 * time.Second)
			b := open(t, p.Name, cfg)
			t.Cleanup(func() {
				faults.Set()
				waitFor(t, settle, func() bool { return !b.tok.lib.down.Load() })
			})
			if b.IVMode() != p.IVMode {
				t.Fatalf("iv mode %s through the fault shim, want %s", b.IVMode(), p.IVMode)
			}
			res, err := b.Encrypt(bg, "k1", []byte("before"), nil)
			if err != nil {
				t.Fatal(err)
			}

			faults.Set("C_EncryptInit=0x30") // CKR_DEVICE_ERROR
			if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Encrypt on a failing device: %v", err)
			}
			faults.Set()
			waitFor(t, settle, func() bool {
				_, err := b.Encrypt(bg, "k1", []byte("after"), nil)
				return err == nil
			})
			if pt, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil); err != nil || string(pt) != "before" {
				t.Fatalf("Decrypt after reconnecting: %q %v", pt, err)
			}

			faults.Set("C_Encrypt=hang")
			if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); !errors.Is(err, ErrTimeout) {
				t.Fatalf("Encrypt on a hung HSM: %v", err)
			}
			faults.Set()
			waitFor(t, settle, func() bool { return b.Stats().StuckCalls == 0 })
			if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
				t.Fatalf("Encrypt after the hang: %v", err)
			}

			before := faults.Calls("C_Encrypt")
			faults.Set("C_Encrypt=0xB3*1") // CKR_SESSION_HANDLE_INVALID
			res, err = b.Encrypt(bg, "k1", []byte("retried"), nil)
			if err != nil {
				t.Fatalf("Encrypt with a session dying once: %v", err)
			}
			if faults.Calls("C_Encrypt")-before < 2 {
				t.Fatal("C_Encrypt was not retried on a new session")
			}
			if pt, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, nil); err != nil || string(pt) != "retried" {
				t.Fatalf("Decrypt: %q %v", pt, err)
			}
		})
	}
}
