package xkshandler

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/vendorshim"
)

// openBackend opens a backend on tk with test timeouts.
func openBackend(t *testing.T, name string, tk hsmtest.Token) *hsm.Backend {
	t.Helper()
	b, err := hsm.Open(name, hsm.Config{Module: tk.Module, Token: tk.Label, PIN: tk.PIN,
		CallTimeout: caddy.Duration(30 * time.Second), SessionWait: caddy.Duration(10 * time.Second)}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func randomKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// TestFailoverSkipsABackendHoldingAnotherKey: once the key check has
// proved that backends b and c hold another key than a under a label, a
// call with that key never falls over to them while a is unavailable: their
// ciphertexts would not decrypt on a. That stays so while a cannot answer,
// although b and c agree with each other. Other keys still fall over.
func TestFailoverSkipsABackendHoldingAnotherKey(t *testing.T) {
	tokens := []hsmtest.Token{hsmtest.NewToken(t), hsmtest.NewToken(t), hsmtest.NewToken(t)}
	same := randomKey(t)
	for _, tk := range tokens {
		tk.ImportKey(t, "replaced", same)
		tk.ImportKey(t, "kept", same)
	}
	a, b, c := openBackend(t, "a", tokens[0]), openBackend(t, "b", tokens[1]), openBackend(t, "c", tokens[2])
	ks := &KeyStore{URIPath: "/t/kms/xks/v1", backends: []*hsm.Backend{a, b, c},
		keys: map[string]bool{"replaced": true, "kept": true}, logger: zaptest.NewLogger(t)}
	ctx := context.Background()
	ks.setupKeyCheck()
	check := func() *frontend.KeyReport { return ks.check.Run(ctx) }
	if r := check(); r.Err(ks.URIPath) != nil || len(r.BackendProblems(1)) > 0 || len(r.BackendProblems(2)) > 0 {
		t.Fatalf("backends with the same keys: %v %v", r.Err(ks.URIPath), r)
	}

	other := randomKey(t)
	for _, tk := range tokens[1:] {
		tk.DestroyKeys(t, "replaced")
		tk.ImportKey(t, "replaced", other)
	}
	r := check()
	err := r.Err(ks.URIPath)
	for _, want := range []string{`backends a and b hold different keys labelled "replaced"`, `backends a and c hold different keys labelled "replaced"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("mismatch error %v does not say %q", err, want)
		}
	}
	if len(r.BackendProblems(0)) != 0 || len(r.BackendProblems(1)) != 1 || len(r.BackendProblems(2)) != 1 {
		t.Fatalf("report: %v", r)
	}

	_ = a.Close() // a's token closes: a is unavailable
	r = check()
	if !r.Differing("replaced", 1) || !r.Differing("replaced", 2) || r.Differing("kept", 1) {
		t.Fatalf("with a down, b and c agreeing is taken for proof: %v", r)
	}
	used := map[string][]string{}
	encrypt := func(key string) error {
		return ks.check.WithBackend(key, func(be *hsm.Backend) error {
			used[key] = append(used[key], be.Name())
			_, err := be.Encrypt(ctx, key, []byte("pt"), nil)
			return err
		})
	}
	if err := encrypt("replaced"); !errors.Is(err, hsm.ErrUnavailable) || !strings.Contains(err.Error(), "backends b, c hold another key") {
		t.Errorf("encrypt with the replaced key while a is down: %v", err)
	}
	if got := strings.Join(used["replaced"], ","); got != "a" {
		t.Errorf("the replaced key was tried on %s, want a only", got)
	}
	if err := encrypt("kept"); err != nil || strings.Join(used["kept"], ",") != "a,b" {
		t.Errorf("encrypt with the kept key while a is down: %v, tried on %v, want a then b", err, used["kept"])
	}
}

// TestKeyCheckOfAllKeys: a key store with keys * compares every key the
// backends list.
func TestKeyCheckOfAllKeys(t *testing.T) {
	tkA, tkB := hsmtest.NewToken(t), hsmtest.NewToken(t)
	v := randomKey(t)
	tkA.ImportKey(t, "both", v)
	tkB.ImportKey(t, "both", v)
	tkA.ImportKey(t, "a-only", v)
	tkB.ImportKey(t, "differs", v)
	tkA.ImportKey(t, "differs", bytes.Repeat([]byte{1}, 32))
	tkB.CreateKey(t, "twice")
	tkB.CreateKey(t, "twice")
	tkA.CreateKey(t, "twice")
	a, b := openBackend(t, "a", tkA), openBackend(t, "b", tkB)
	ks := &KeyStore{URIPath: "/t/kms/xks/v1", backends: []*hsm.Backend{a, b}, logger: zaptest.NewLogger(t)}
	ks.setupKeyCheck()
	r := ks.check.Run(context.Background())
	err := r.Err(ks.URIPath)
	for _, want := range []string{`key "a-only" is on backend a but not on backend b`, `backends a and b hold different keys labelled "differs"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("mismatch error %v does not say %q", err, want)
		}
	}
	if err != nil && strings.Contains(err.Error(), `"both"`) {
		t.Errorf("the key both backends hold alike is named: %v", err)
	}
	if got := strings.Join(r.BackendProblems(1), "; "); !strings.Contains(got, `more than one key is labelled "twice"`) {
		t.Errorf("b's problems do not name the duplicate: %s", got)
	}
}

// TestSilentBackendKeepsItsFindings: a backend that does not answer a key
// check keeps what the previous one found, rather than being reported
// resolved.
func TestSilentBackendKeepsItsFindings(t *testing.T) {
	tkA, tkB := hsmtest.NewToken(t), hsmtest.NewToken(t)
	v := randomKey(t)
	tkA.ImportKey(t, "k", v)
	tkB.ImportKey(t, "k", v)
	tkB.ImportKey(t, "k", v)
	a, b := openBackend(t, "a", tkA), openBackend(t, "b", tkB)
	core, logs := observer.New(zapcore.InfoLevel)
	ks := &KeyStore{URIPath: "/t/kms/xks/v1", backends: []*hsm.Backend{a, b}, keys: map[string]bool{"k": true}, logger: zap.New(core)}
	ks.setupKeyCheck()
	check := func() *frontend.KeyReport { return ks.check.Run(context.Background()) }
	duplicate := `more than one key is labelled "k", so calls with it fail`
	if r := check(); strings.Join(r.BackendProblems(1), "; ") != duplicate {
		t.Fatalf("b's problems: %v", r.BackendProblems(1))
	}
	_ = b.Close() // b does not answer
	r := check()
	if !r.Silent(1) || strings.Join(r.BackendProblems(1), "; ") != duplicate {
		t.Errorf("b, silent, lost its finding: silent %v, problems %v", r.Silent(1), r.BackendProblems(1))
	}
	if n := logs.FilterMessageSnippet("resolved").Len(); n != 0 {
		t.Errorf("%d lines call the silent backend's finding resolved", n)
	}
	if n := logs.FilterMessageSnippet("backend b did not answer the key check").Len(); n != 1 {
		t.Errorf("%d lines say that b did not answer, want 1", n)
	}
}

// TestKeyCheckInEveryIVMode: the identity proof is a ciphertext of one
// backend that another decrypts, so it works whatever IV mode each uses.
// Each vendor personality (IVs written back by the HSM, or appended by it)
// is paired with a plain SoftHSM2 backend (IVs from the caller): the same
// imported key is proven the same, another one is refused.
func TestKeyCheckInEveryIVMode(t *testing.T) {
	hsmtest.Require(t)
	for _, p := range vendorshim.All {
		t.Run(p.Name, func(t *testing.T) {
			tkA, tkB := hsmtest.NewToken(t), hsmtest.NewToken(t)
			same, other := randomKey(t), randomKey(t)
			tkA.ImportKey(t, "same", same, hsmtest.Private(p.PrivateKeys))
			tkB.ImportKey(t, "same", same)
			tkA.ImportKey(t, "other", other, hsmtest.Private(p.PrivateKeys))
			tkB.ImportKey(t, "other", randomKey(t))
			shim := vendorshim.New(t, p, tkA.Module, tkA.Label)
			cfg := hsm.Config{Module: shim.Path, Token: shim.TokenLabel(tkA.Label), PIN: tkA.PIN, IVMode: p.IVMode, PrivateKeys: &p.PrivateKeys,
				CallTimeout: caddy.Duration(30 * time.Second), SessionWait: caddy.Duration(10 * time.Second)}
			if shim.FakeLogin {
				cfg.PIN, cfg.NoLogin = "", true
			}
			a, err := hsm.Open(p.Name, cfg, zaptest.NewLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = a.Close() })
			if a.IVMode() != p.IVMode {
				t.Fatalf("iv mode %s, want %s", a.IVMode(), p.IVMode)
			}
			b := openBackend(t, "softhsm2", tkB)
			for _, order := range [][]*hsm.Backend{{a, b}, {b, a}} {
				ks := &KeyStore{URIPath: "/t/kms/xks/v1", backends: order, keys: map[string]bool{"same": true, "other": true}, logger: zaptest.NewLogger(t)}
				ks.setupKeyCheck()
				err := ks.check.Run(context.Background()).Err(ks.URIPath)
				want := fmt.Sprintf("backends %s and %s hold different keys labelled %q", order[0].Name(), order[1].Name(), "other")
				if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), `"same"`) {
					t.Errorf("%s first: %v, want only %q", order[0].Name(), err, want)
				}
			}
		})
	}
}
