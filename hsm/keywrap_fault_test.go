package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha1" //nolint:gosec // crypto.SHA1: RSA-OAEP with SHA-1 is one of the algorithms under test
	"errors"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/miekg/pkcs11"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/faultshim"
	"github.com/caddy-xks/caddy-xks/internal/kwref"
)

// TestObjectPathDestroysDataKeys checks the rule of the object path: a
// data key becomes a session object for the length of one call, never a
// token object, and is destroyed on every way out of the call. The count of
// session objects is proven to see the pool's sessions first, with an
// object left on purpose; then every operation, those that fail included,
// must leave none. Where a failure closes the session (which takes its
// objects with it), the fault shim's call log shows C_DestroyObject was
// called all the same.
func TestObjectPathDestroysDataKeys(t *testing.T) {
	tk := hsmtest.NewToken(t)
	kek := randomBytes(32)
	tk.ImportKey(t, "kek", kek, hsmtest.KeyWrapping())
	pair := hsmtest.RSAKey(t, 2048)
	// Unwrap only: OAEP through C_UnwrapKey, the object path of RSA.
	tk.ImportRSAKey(t, "rsa-unwrap", pair, true, hsmtest.Usage(pkcs11.CKA_DECRYPT, false))
	shim := faultshim.New(t, tk.Module)
	cfg := configFor(tk)
	cfg.Module = shim.Path
	b := open(t, "objects", cfg)
	t.Cleanup(func() {
		shim.Set()
		waitFor(t, settle, func() bool { return !b.tok.lib.down.Load() })
	})

	if err := b.run(bg, "test", "", b.callTimeout, func(cs *callSession) error {
		_, err := cs.ctx.CreateObject(cs.h, dekTemplate([]byte("left on purpose!"), true))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if n := tk.SessionKeys(t); n != 1 {
		t.Fatalf("the count sees %d session objects of the pool's sessions, want the 1 left on purpose", n)
	}
	for _, s := range b.tok.pool.drain() {
		_ = b.tok.lib.ctx.CloseSession(s.h)
	}
	if n := tk.SessionKeys(t); n != 0 {
		t.Fatalf("%d session objects after closing their session", n)
	}

	dek := randomBytes(32)
	oaep, _ := rsa.EncryptOAEP(crypto.SHA1.New(), rand.Reader, &pair.PublicKey, dek, nil)
	tampered := bytes.Clone(oaep)
	tampered[9] ^= 1
	steps := []struct {
		name string
		// rules are the fault shim's for the step; call runs it.
		rules []string
		call  func() error
		// want is the error kind; destroys is how many C_DestroyObject
		// calls the step makes at least.
		want     error
		destroys int
	}{
		{"A256KW wraps", nil, func() error { _, err := b.WrapKey(bg, "kek", AESKeyWrap, dek); return err }, nil, 1},
		{"A256KWP unwraps", nil, func() error { _, err := b.UnwrapKey(bg, "kek", AESKeyWrapPad, kwref.KWP(kek, dek)); return err }, nil, 1},
		{"a tampered A256KW is refused", nil, func() error {
			_, err := b.UnwrapKey(bg, "kek", AESKeyWrap, kwref.KW(kek, randomBytes(24))[:24])
			return err
		}, ErrInvalidCiphertext, 0},
		{"RSA-OAEP unwraps through C_UnwrapKey", nil, func() error { _, err := b.UnwrapKey(bg, "rsa-unwrap", RSAOAEP, oaep); return err }, nil, 1},
		{"a tampered RSA-OAEP is refused", nil, func() error { _, err := b.UnwrapKey(bg, "rsa-unwrap", RSAOAEP, tampered); return err }, ErrInvalidCiphertext, 0},
		{"C_WrapKey fails", []string{"C_WrapKey=0x21"}, func() error { _, err := b.WrapKey(bg, "kek", AESKeyWrap, dek); return err }, ErrInternal, 1},
		// The wrap succeeded but its data key stays: the session goes, and
		// the object with it.
		{"destroying the data key fails", []string{"C_DestroyObject=0x5*1"}, func() error { _, err := b.WrapKey(bg, "kek", AESKeyWrap, dek); return err }, nil, 1},
		{"reading the unwrapped value fails", []string{"C_GetAttributeValue=0x21*1"}, func() error {
			_, err := b.UnwrapKey(bg, "kek", AESKeyWrap, kwref.KW(kek, dek))
			return err
		}, ErrInternal, 1},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			before := shim.Calls("C_DestroyObject")
			shim.Set(st.rules...)
			err := st.call()
			shim.Set()
			if st.want == nil && err != nil || st.want != nil && !errors.Is(err, st.want) {
				t.Fatalf("%v, want %v", err, st.want)
			}
			if got := shim.Calls("C_DestroyObject") - before; got < st.destroys {
				t.Fatalf("%d C_DestroyObject calls, want %d", got, st.destroys)
			}
			if n := tk.SessionKeys(t); n != 0 {
				t.Fatalf("%d data keys left as session objects", n)
			}
			if n := tk.TokenKeys(t); n != 0 {
				t.Fatalf("%d data keys made token objects", n)
			}
		})
	}
}

// TestKeyWrapFaults runs key wrap through the fault shim on both paths:
// SoftHSM2's C_WrapKey and C_UnwrapKey, NSS softokn's C_Encrypt and
// C_Decrypt, and RSA's C_Decrypt. The pool's rules are those of AES-GCM: a
// hung HSM is a timeout at the deadline and its session is closed when the
// call returns, a device error reconnects, a dead session is retried once
// on a new one, and with every session taken the next call is busy.
func TestKeyWrapFaults(t *testing.T) {
	soft := hsmtest.NewToken(t)
	softKEK := randomBytes(32)
	soft.ImportKey(t, "kek", softKEK, hsmtest.KeyWrapping())
	nssCfg, nss := nssConfig(t)
	nssKEK := randomBytes(32)
	nssKEKLabel, nssRSALabel := unique("fault-kek"), unique("fault-rsa")
	nss.ImportKey(t, nssKEKLabel, nssKEK, hsmtest.KeyWrapping())
	pair := hsmtest.RSAKey(t, 2048)
	nss.ImportRSAKey(t, nssRSALabel, pair, true)
	dek := randomBytes(32)
	oaep, _ := rsa.EncryptOAEP(crypto.SHA1.New(), rand.Reader, &pair.PublicKey, dek, nil)

	tokens := []struct {
		name           string
		cfg            Config
		module         string
		wrap, unwrap   func(ctx context.Context, b *Backend) error
		wrapFn, unwrFn string
	}{
		{"SoftHSM2 C_WrapKey", configFor(soft), soft.Module,
			func(ctx context.Context, b *Backend) error {
				_, err := b.WrapKey(ctx, "kek", AESKeyWrap, dek)
				return err
			},
			func(ctx context.Context, b *Backend) error {
				_, err := b.UnwrapKey(ctx, "kek", AESKeyWrapPad, kwref.KWP(softKEK, dek))
				return err
			},
			"C_WrapKey", "C_UnwrapKey"},
		{"NSS softokn C_Encrypt", nssCfg, nss.Module,
			func(ctx context.Context, b *Backend) error {
				_, err := b.WrapKey(ctx, nssKEKLabel, AESKeyWrapPad, dek[:20])
				return err
			},
			func(ctx context.Context, b *Backend) error {
				_, err := b.UnwrapKey(ctx, nssKEKLabel, AESKeyWrap, kwref.KW(nssKEK, dek))
				return err
			},
			"C_Encrypt", "C_Decrypt"},
		// RSA wraps in software once the key pair is proven: only unwrap
		// reaches the HSM, so it stands for both.
		{"NSS softokn RSA-OAEP", nssCfg, nss.Module,
			func(ctx context.Context, b *Backend) error {
				_, err := b.UnwrapKey(ctx, nssRSALabel, RSAOAEP, oaep)
				return err
			},
			func(ctx context.Context, b *Backend) error {
				_, err := b.UnwrapKey(ctx, nssRSALabel, RSAOAEP, oaep)
				return err
			},
			"C_Decrypt", "C_Decrypt"},
	}
	for _, tok := range tokens {
		t.Run(tok.name, func(t *testing.T) {
			shim := faultshim.New(t, tok.module)
			cfg := tok.cfg
			cfg.Module = shim.Path
			cfg.MaxSessions = 2
			cfg.SessionWait = caddy.Duration(20 * time.Millisecond)
			// The calls that are not meant to hang keep a deadline no
			// loaded machine reaches (NSS's RSA unwrap is slow under the
			// race detector); the hung ones carry a short one of their
			// own, which the pool honours as it would a request's.
			cfg.CallTimeout = caddy.Duration(30 * time.Second)
			hung := func() context.Context {
				ctx, cancel := context.WithTimeout(bg, 300*time.Millisecond)
				t.Cleanup(cancel)
				return ctx
			}
			b := open(t, "faults", cfg)
			t.Cleanup(func() {
				shim.Set()
				waitFor(t, settle, func() bool { return !b.tok.lib.down.Load() && b.Stats().StuckCalls == 0 })
			})
			for _, op := range []func(context.Context, *Backend) error{tok.wrap, tok.unwrap} {
				if err := op(bg, b); err != nil {
					t.Fatalf("before the faults: %v", err)
				}
			}

			// A hung HSM: a timeout at the deadline, and with both
			// sessions held, busy.
			shim.Set(tok.unwrFn + "=hang")
			for range 2 {
				if err := tok.unwrap(hung(), b); !errors.Is(err, ErrTimeout) {
					t.Fatalf("on a hung HSM: %v, want ErrTimeout", err)
				}
			}
			if err := tok.unwrap(hung(), b); !errors.Is(err, ErrBusy) {
				t.Fatalf("with every session stuck: %v, want ErrBusy", err)
			}
			shim.Set()
			waitFor(t, settle, func() bool { return b.Stats().StuckCalls == 0 })
			if err := tok.unwrap(bg, b); err != nil {
				t.Fatalf("after the HSM came back: %v", err)
			}

			// A session dying once is retried on a new one.
			before := shim.Calls(tok.wrapFn)
			shim.Set(tok.wrapFn + "=0xB3*1")
			if err := tok.wrap(bg, b); err != nil {
				t.Fatalf("with a session dying once: %v", err)
			}
			if shim.Calls(tok.wrapFn)-before < 2 {
				t.Fatalf("%s was not retried", tok.wrapFn)
			}

			// A device error reconnects; the backend serves again after.
			shim.Set(tok.wrapFn+"=0x30", tok.unwrFn+"=0x30")
			if err := tok.wrap(bg, b); !errors.Is(err, ErrUnavailable) {
				t.Fatalf("on a failing device: %v, want ErrUnavailable", err)
			}
			shim.Set()
			waitFor(t, settle, func() bool { return tok.wrap(bg, b) == nil && tok.unwrap(bg, b) == nil })
		})
	}
}
