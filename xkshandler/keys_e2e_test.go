package xkshandler_test

import (
	"bytes"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// The key tests change what the token holds while the proxy runs, as an
// HSM administrator or another process would, and check what KMS is told.

// TestExportableKeyIsKeyNotFound: a key whose value can be read out of the
// token (pkcs11-tool --extractable, keyClear here) is not served by a
// backend without allow_exportable_keys, although the key store lists it,
// by name (/ks1) or with keys * (/all): GetKeyMetadata, Encrypt and
// Decrypt answer KeyNotFoundException (so that KMS's CreateKey refuses
// it), and the log says why.
func TestExportableKeyIsKeyNotFound(t *testing.T) {
	f := newFixtureWith(t, func(f *fixture) {
		f.xksExtra = fmt.Sprintf("\t\tkey_store /all {\n\t\t\thsm main\n\t\t\tregion %s\n\t\t\tcredential %s {env.XKS_TEST_SECRET_2}\n\t\t\tkeys *\n%s\t\t}\n",
			region, f.ks2.akid, proxytest.KeyStoreDefaults(""))
	})
	for _, ks := range []struct {
		path string
		c    credential
	}{{"/ks1", f.ks1[0]}, {"/all", f.ks2}} {
		base := ks.path + "/kms/xks/v1/keys/" + keyClear
		expectError(t, f.call(ks.c, base+"/metadata", metaBody), http.StatusNotFound, "KeyNotFoundException")
		expectError(t, f.call(ks.c, base+"/encrypt", encryptBody(random(t, 16), nil, false)), http.StatusNotFound, "KeyNotFoundException")
		s := sealed{ciphertext: random(t, 16), iv: random(t, 12), tag: random(t, 16)}
		expectError(t, f.call(ks.c, base+"/decrypt", decryptBody(s, nil)), http.StatusNotFound, "KeyNotFoundException")
	}
	if r := f.call(f.ks2, "/all/kms/xks/v1/keys/"+keyBoth+"/metadata", metaBody); r.status != http.StatusOK {
		t.Errorf("keys * refuses a sensitive, unextractable key: %d %s", r.status, r.raw)
	}

	refusals := f.countLog(func(e logEntry) bool {
		return hsmLine("error", "refusing a key whose value can leave the HSM")(e) && e.str("key") == keyClear &&
			e.str("backend") == "main" && strings.Contains(e.str("why"), "CKA_EXTRACTABLE is true")
	})
	if refusals != 1 {
		t.Errorf("%d log lines say why %s is refused, want 1:\n%s", refusals, keyClear, grepLines(string(mustRead(t, f.logFile)), `"logger":"hsm`))
	}
	audited := f.countLog(func(e logEntry) bool {
		return e.str("logger") == "http.handlers.xks.audit" && e.str("external_key_id") == keyClear &&
			strings.Contains(e.str("reason"), "key value can leave the hsm")
	})
	if audited != 6 {
		t.Errorf("%d audit lines give the reason, want 6", audited)
	}
}

// TestDuplicateLabelIsFoundWithoutARestart: while the proxy serves a key,
// another process gives a second key its label. The proxy notices without
// a restart: health reports the backend DEGRADED and why, and calls with
// the key fail as they would after a restart (KeyNotFoundException), so
// that the fleet's members agree.
func TestDuplicateLabelIsFoundWithoutARestart(t *testing.T) {
	f := newFixtureWith(t, func(f *fixture) { f.hsmExtra = "\t\t\thealth_ttl 1ms" })
	encrypt := func() response {
		return f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false))
	}
	if r := encrypt(); r.status != http.StatusOK {
		t.Fatalf("encrypt before: %d %s", r.status, r.raw)
	}
	f.token.CreateKey(t, keyBoth)

	deadline := time.Now().Add(time.Minute)
	for {
		h := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody)
		r := encrypt()
		if strings.Contains(h.raw, `"healthStatus":"DEGRADED"`) && r.status == http.StatusNotFound {
			expectError(t, r, http.StatusNotFound, "KeyNotFoundException")
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a duplicate label is not noticed: health %s, encrypt %d %s", h.raw, r.status, r.raw)
		}
		time.Sleep(20 * time.Millisecond)
	}
	reasons := f.countLog(func(e logEntry) bool {
		return e.str("logger") == "http.handlers.xks.audit" && e.str("operation") == "GetHealthStatus" &&
			strings.Contains(e.str("reason"), fmt.Sprintf("more than one key is labelled %q", keyBoth))
	})
	if reasons == 0 {
		t.Error("no GetHealthStatus audit line says which label is duplicated")
	}
}

// TestDuplicateLabelAtStartIsReported: a duplicate label that exists when
// the config loads is logged at ERROR by the load and reported by the
// first health check.
func TestDuplicateLabelAtStartIsReported(t *testing.T) {
	f := newFixtureWith(t, func(f *fixture) { f.token.CreateKey(t, keyBoth) })
	if h := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody); !strings.Contains(h.raw, `"healthStatus":"DEGRADED"`) {
		t.Errorf("health with a duplicate label: %s", h.raw)
	}
	logged := f.countLog(func(e logEntry) bool {
		return e.str("level") == "error" && e.str("key_store") == "/ks1/kms/xks/v1" && e.str("backend") == "main" &&
			strings.Contains(e.str("msg"), fmt.Sprintf("more than one key is labelled %q", keyBoth))
	})
	if logged != 1 {
		t.Errorf("%d ERROR lines name the duplicate label, want 1", logged)
	}
	expectError(t, f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false)),
		http.StatusNotFound, "KeyNotFoundException")
}

// pair is a fixture with a second token and backend ("second"), and a key
// store /pair served by main and second, in that order.
type pair struct {
	*fixture
	second hsmtest.Token
}

// Keys of the pair's tokens, each imported with a value the test chose.
const (
	keySame    = "k-same"    // one value on both tokens
	keyDiffers = "k-differs" // another value on each token
	keyLonely  = "k-lonely"  // on the first token only
)

func newPair(t *testing.T, hsmExtra string) *pair {
	t.Helper()
	p := &pair{}
	p.fixture = newFixtureWith(t, func(f *fixture) {
		p.second = hsmtest.NewToken(t)
		same := random(t, 32)
		f.token.ImportKey(t, keySame, same)
		p.second.ImportKey(t, keySame, same)
		f.token.ImportKey(t, keyDiffers, random(t, 32))
		p.second.ImportKey(t, keyDiffers, random(t, 32))
		f.token.ImportKey(t, keyLonely, random(t, 32))
		f.hsmExtra = hsmExtra
		f.backends = []proxytest.Backend{{Name: "second", Module: f.module, Token: p.second.Label, PINEnv: "XKS_TEST_PIN", Extra: hsmExtra}}
		f.xksExtra = pairKeyStores(f, keySame)
	})
	return p
}

// pairKeyStores are the xks lines of /pair (main then second) and /second
// (second alone), with keys.
func pairKeyStores(f *fixture, keys ...string) string {
	var s strings.Builder
	for _, ks := range []struct{ path, hsm string }{{"/pair", "main second"}, {"/second", "second"}} {
		fmt.Fprintf(&s, "\t\tkey_store %s {\n\t\t\thsm %s\n\t\t\tregion %s\n\t\t\tcredential %s {env.XKS_TEST_SECRET_2}\n\t\t\tkeys %s\n%s\t\t}\n",
			ks.path, ks.hsm, region, f.ks2.akid, strings.Join(keys, " "), proxytest.KeyStoreDefaults(""))
	}
	return s.String()
}

// TestBackendsMustHoldTheSameKeys: `hsm main second` falls over from main
// to second, so both must hold the same key under each label. A config
// where they do loads, and a ciphertext of one decrypts on the other; a
// config listing a key the two hold differently, or one that only main
// holds, fails to load with an error naming the key and the backends.
func TestBackendsMustHoldTheSameKeys(t *testing.T) {
	p := newPair(t, "")
	h := p.call(p.ks2, "/pair/kms/xks/v1/health", healthBody)
	if h.status != http.StatusOK || strings.Count(h.raw, `"healthStatus":"ACTIVE"`) != 2 {
		t.Fatalf("health of /pair: %s", h.raw)
	}
	pt := random(t, 32)
	s := p.encrypt(p.ks2, "/pair", keySame, pt, nil) // made by main
	r := p.call(p.ks2, "/second/kms/xks/v1/keys/"+keySame+"/decrypt", decryptBody(s, nil))
	if r.status != http.StatusOK || !bytes.Equal(r.bytes(t, "plaintext"), pt) {
		t.Fatalf("decrypt on second of main's ciphertext: %d %s", r.status, r.raw)
	}

	for _, tc := range []struct {
		key  string
		want []string
	}{
		{keyDiffers, []string{"/pair", "backends main and second hold different keys labelled " + fmt.Sprintf("%q", keyDiffers)}},
		{keyLonely, []string{"/pair", fmt.Sprintf("key %q is on backend main but not on backend second", keyLonely)}},
	} {
		t.Run(tc.key, func(t *testing.T) {
			p.xksExtra = pairKeyStores(p.fixture, keySame, tc.key)
			defer func() { p.xksExtra = pairKeyStores(p.fixture, keySame) }()
			err := p.proxy.TryLoad(p.config(1))
			if err == nil {
				t.Fatalf("a config with %s on backends that differ loaded", tc.key)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("the load's error does not say %q: %v", w, err)
				}
			}
		})
	}
	// The running config stays.
	if r := p.call(p.ks2, "/pair/kms/xks/v1/keys/"+keySame+"/encrypt", encryptBody(pt, nil, false)); r.status != http.StatusOK {
		t.Errorf("encrypt after the refused loads: %d %s", r.status, r.raw)
	}
}

// TestBackendHoldingAnotherKeyIsReported: the key of a running pair is
// replaced on second by another one. The health check proves it, reports
// second DEGRADED and says which key; main keeps serving it.
func TestBackendHoldingAnotherKeyIsReported(t *testing.T) {
	p := newPair(t, "\t\t\thealth_ttl 1ms")
	p.second.DestroyKeys(t, keySame)
	p.second.ImportKey(t, keySame, random(t, 32))
	want := fmt.Sprintf("backends main and second hold different keys labelled %q", keySame)
	deadline := time.Now().Add(time.Minute)
	for {
		h := p.call(p.ks2, "/pair/kms/xks/v1/health", healthBody)
		if strings.Count(h.raw, `"healthStatus":"ACTIVE"`) == 1 && strings.Contains(h.raw, `"healthStatus":"DEGRADED"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("health does not report the backend holding another key: %s", h.raw)
		}
		time.Sleep(20 * time.Millisecond)
	}
	reported := p.countLog(func(e logEntry) bool {
		return e.str("logger") == "http.handlers.xks.audit" && e.str("key_store") == "/pair/kms/xks/v1" &&
			strings.Contains(e.str("reason"), "backend second DEGRADED") && strings.Contains(e.str("reason"), want)
	})
	if reported == 0 {
		t.Error("no GetHealthStatus audit line names the backend and the key")
	}
	if r := p.call(p.ks2, "/pair/kms/xks/v1/keys/"+keySame+"/encrypt", encryptBody([]byte("x"), nil, false)); r.status != http.StatusOK {
		t.Errorf("encrypt on main: %d %s", r.status, r.raw)
	}
}
