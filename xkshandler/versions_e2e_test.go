package xkshandler_test

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/internal/vendorshim"
)

// The key version tests run a real Caddy in front of a SoftHSM2 token that
// holds the fixture key (version 1, with the value the committed fixtures
// were written with) and more versions made per test.

func enc64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func unb64(t testing.TB, s string) []byte {
	t.Helper()
	if s == "" {
		return nil
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatalf("%q: %v", s, err)
	}
	return b
}

// v2Metadata is the ciphertextMetadata of a version 2 ciphertext (format 1).
var v2Metadata = []byte{0, 'x', 'k', 1, 0, 0, 0, 2}

// loadFixtures reads the ciphertexts a released proxy wrote.
func loadFixtures(t *testing.T, file string) ciphertextFixtures {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var fx ciphertextFixtures
	if err := json.Unmarshal(raw, &fx); err != nil {
		t.Fatal(err)
	}
	if len(fx.Fixtures) == 0 {
		t.Fatalf("%s holds no fixtures", file)
	}
	return fx
}

// decryptFixture asks the proxy to decrypt one fixture through its setting's
// key store.
func (fp *fixtureProxy) decryptFixture(x ciphertextFixture) response {
	fp.t.Helper()
	s := sealed{ciphertext: x.Ciphertext, iv: x.IV, tag: x.Tag, metadata: x.CiphertextMetadata}
	return fp.call(fp.ks2, "/"+x.Setting+"/kms/xks/v1/keys/"+fixtureKeyLabel+"/decrypt", decryptBody(s, x.AAD))
}

// checkFixtures decrypts every fixture and fails the test for each that
// does not give back its plaintext.
func (fp *fixtureProxy) checkFixtures(fx ciphertextFixtures, when string) {
	fp.t.Helper()
	for i, x := range fx.Fixtures {
		r := fp.decryptFixture(x)
		if r.status != http.StatusOK || !bytes.Equal(r.bytes(fp.t, "plaintext"), x.Plaintext) {
			fp.t.Errorf("%s: fixture %d (%s) does not decrypt: %d %s", when, i, x.Setting, r.status, r.raw)
		}
	}
}

// versionsOf is a versions block for the fixture key.
func versionsOf(lines ...string) func(fixtureSetting) string {
	return func(fixtureSetting) string {
		return "\t\t\tversions " + fixtureKeyLabel + " {\n\t\t\t\t" + strings.Join(lines, "\n\t\t\t\t") + "\n\t\t\t}\n"
	}
}

// encryptsWith returns a readiness check: an Encrypt through every key
// store answers with the metadata of version (nil for version 1: each
// setting's own static metadata).
func (fp *fixtureProxy) encryptsWith(version []byte) func() error {
	return func() error {
		for _, s := range fixtureSettings {
			r, err := fp.try(fp.ks2, "/"+s.Name+"/kms/xks/v1/keys/"+fixtureKeyLabel+"/encrypt", encryptBody([]byte("probe"), nil, false))
			if err != nil {
				return err
			}
			want := s.CiphertextMetadata
			if version != nil {
				want = enc64(version)
			}
			if r.status != http.StatusOK || r.str("ciphertextMetadata") != want {
				return fmt.Errorf("%s: %d %s, want ciphertextMetadata %q", s.Name, r.status, r.raw, want)
			}
		}
		return nil
	}
}

// TestReleasedCiphertextsDecrypt: ciphertexts written by the proxy at the
// commit the fixtures name decrypt with every supported ciphertext_metadata
// and aad_framing setting, before and after key versions are added and
// promoted; a version 1 ciphertext keeps decrypting until version 1 is
// disabled, and disabling it says what the fleet counted for it.
func TestReleasedCiphertextsDecrypt(t *testing.T) {
	fx := loadFixtures(t, "testdata/ciphertexts-v0.json")
	fp := newFixtureProxy(t, nil)
	fp.checkFixtures(fx, "without versions")

	fp.token.CreateKey(t, fixtureKeyLabel+"-v2")
	fp.more = versionsOf("version 2 "+fixtureKeyLabel+"-v2", "current 1")
	fp.load(fp.encryptsWith(nil))
	fp.checkFixtures(fx, "version 2 added, version 1 current")

	fp.more = versionsOf("version 2 "+fixtureKeyLabel+"-v2", "current 2")
	fp.load(fp.encryptsWith(v2Metadata))
	fp.checkFixtures(fx, "version 2 current")

	// A version 2 ciphertext, through every setting.
	for _, s := range fixtureSettings {
		aad := []byte("context of " + s.Name)
		sealed := fp.encrypt(fp.ks2, "/"+s.Name, fixtureKeyLabel, []byte("sealed under version 2"), aad)
		if !bytes.Equal(sealed.metadata, v2Metadata) {
			t.Fatalf("%s: version 2 ciphertext has metadata %x, want %x", s.Name, sealed.metadata, v2Metadata)
		}
		path := "/" + s.Name + "/kms/xks/v1/keys/" + fixtureKeyLabel + "/decrypt"
		if r := fp.call(fp.ks2, path, decryptBody(sealed, aad)); r.status != http.StatusOK || string(r.bytes(t, "plaintext")) != "sealed under version 2" {
			t.Fatalf("%s: version 2 ciphertext: %d %s", s.Name, r.status, r.raw)
		}
		// The version is bound into the AAD: another version's metadata,
		// or version 1's (none or the static value), fails the tag.
		other := sealed
		other.metadata = []byte{0, 'x', 'k', 1, 0, 0, 0, 3}
		expectError(t, fp.call(fp.ks2, path, decryptBody(other, aad)), http.StatusNotFound, "KeyNotFoundException")
		other.metadata = nil
		if s.CiphertextMetadata != "" {
			other.metadata = unb64(t, s.CiphertextMetadata)
		}
		expectError(t, fp.call(fp.ks2, path, decryptBody(other, aad)), http.StatusBadRequest, "InvalidCiphertextException")
		other.metadata = []byte{0, 'x', 'k', 2, 0, 0, 0, 2}
		expectError(t, fp.call(fp.ks2, path, decryptBody(other, aad)), http.StatusBadRequest, "InvalidCiphertextException")
	}

	// Disabled, version 1 refuses its ciphertexts, and the load says how
	// many it decrypted.
	fp.more = versionsOf("version 1 disabled", "version 2 "+fixtureKeyLabel+"-v2", "current 2")
	fp.load(func() error {
		r, err := fp.try(fp.ks2, "/spec/kms/xks/v1/keys/"+fixtureKeyLabel+"/decrypt", decryptBody(sealed{ciphertext: fx.Fixtures[0].Ciphertext, iv: fx.Fixtures[0].IV, tag: fx.Fixtures[0].Tag}, fx.Fixtures[0].AAD))
		if err == nil && r.str("errorName") != "InvalidStateException" {
			err = fmt.Errorf("version 1 not disabled yet: %d %s", r.status, r.raw)
		}
		return err
	})
	for _, x := range fx.Fixtures {
		expectError(t, fp.decryptFixture(x), http.StatusBadRequest, "InvalidStateException")
	}
	disabled := fp.countLog(func(e logEntry) bool {
		return e.str("msg") == "key version disabled: Decrypt of its ciphertexts is refused" && e.str("label") == fixtureKeyLabel &&
			e.str("key_store") == "/spec/kms/xks/v1" && e.str("fleet_decryptions") != "0" && e.str("fleet_decryptions") != "<nil>"
	})
	if disabled == 0 {
		t.Error("no log line says what the fleet decrypted with the disabled version")
	}
}

// TestKeyRotationUnderLoad adds a version and promotes it, by two reloads
// as the runbook does them, while clients encrypt, decrypt what they just
// encrypted and decrypt the released fixtures without pause: no request
// fails, and both versions' ciphertexts decrypt after.
func TestKeyRotationUnderLoad(t *testing.T) {
	fx := loadFixtures(t, "testdata/ciphertexts-v0.json")
	fp := newFixtureProxy(t, nil)
	fp.token.CreateKey(t, fixtureKeyLabel+"-v2")
	const setting = "spec-metadata"
	var old []ciphertextFixture
	for _, x := range fx.Fixtures {
		if x.Setting == setting {
			old = append(old, x)
		}
	}
	var (
		stop     atomic.Bool
		done     atomic.Int64
		failures atomic.Int64
		v2Seen   atomic.Int64
		firstErr atomic.Value
		wg       sync.WaitGroup
		mu       sync.Mutex
		written  []ciphertextFixture
	)
	fail := func(err error) {
		failures.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
	}
	for w := range 4 {
		wg.Go(func() {
			for i := 0; !stop.Load(); i++ {
				pt := make([]byte, 32)
				_, _ = rand.Read(pt)
				aad := []byte(fmt.Sprintf("worker %d call %d", w, i))
				r, err := fp.try(fp.ks2, "/"+setting+"/kms/xks/v1/keys/"+fixtureKeyLabel+"/encrypt", encryptBody(pt, aad, false))
				if err != nil || r.status != http.StatusOK {
					fail(fmt.Errorf("encrypt: %d %s %v", r.status, r.raw, err))
					continue
				}
				x := ciphertextFixture{Setting: setting, Plaintext: pt, AAD: aad}
				for field, dst := range map[string]*[]byte{"ciphertext": &x.Ciphertext, "initializationVector": &x.IV, "authenticationTag": &x.Tag, "ciphertextMetadata": &x.CiphertextMetadata} {
					*dst = unb64(t, r.str(field))
				}
				if bytes.Equal(x.CiphertextMetadata, v2Metadata) {
					v2Seen.Add(1)
				}
				mu.Lock()
				written = append(written, x)
				mu.Unlock()
				for _, y := range []ciphertextFixture{x, old[i%len(old)]} {
					s := sealed{ciphertext: y.Ciphertext, iv: y.IV, tag: y.Tag, metadata: y.CiphertextMetadata}
					r, err := fp.try(fp.ks2, "/"+setting+"/kms/xks/v1/keys/"+fixtureKeyLabel+"/decrypt", decryptBody(s, y.AAD))
					if err != nil || r.status != http.StatusOK || r.str("plaintext") != enc64(y.Plaintext) {
						fail(fmt.Errorf("decrypt: %d %s %v", r.status, r.raw, err))
					}
				}
				done.Add(1)
			}
		})
	}
	defer func() { stop.Store(true); wg.Wait() }()
	awaitRoundTrips := func(n int64) { awaitCount(t, &done, n) }
	awaitRoundTrips(10)
	// Step 1: every instance learns version 2 (here, one); version 1 stays
	// current. Step 2: version 2 becomes current.
	fp.more = versionsOf("version 2 "+fixtureKeyLabel+"-v2", "current 1")
	fp.reload(fp.encryptsWith(nil))
	awaitRoundTrips(done.Load() + 10)
	fp.more = versionsOf("version 2 "+fixtureKeyLabel+"-v2", "current 2")
	fp.reload(fp.encryptsWith(v2Metadata))
	awaitRoundTrips(done.Load() + 10)
	for v2Seen.Load() == 0 {
		awaitRoundTrips(done.Load() + 1)
	}
	stop.Store(true)
	wg.Wait()
	if failures.Load() > 0 {
		t.Fatalf("%d requests failed across the rotation (of %d round trips); first: %v", failures.Load(), done.Load(), firstErr.Load())
	}
	// Every ciphertext of the run, of either version, still decrypts.
	for _, x := range written {
		s := sealed{ciphertext: x.Ciphertext, iv: x.IV, tag: x.Tag, metadata: x.CiphertextMetadata}
		r := fp.call(fp.ks2, "/"+setting+"/kms/xks/v1/keys/"+fixtureKeyLabel+"/decrypt", decryptBody(s, x.AAD))
		if r.status != http.StatusOK || !bytes.Equal(r.bytes(t, "plaintext"), x.Plaintext) {
			t.Fatalf("after the rotation: %d %s", r.status, r.raw)
		}
	}
	t.Logf("%d round trips, none failed, %d ciphertexts of version 2", done.Load(), v2Seen.Load())
}

// TestEncryptLimit: with a limit of 5 encryptions (injected; the default
// is 2^32) in the caller IV mode, the 6th Encrypt moves to version 2 by
// itself, logged; past version 2's limit Encrypt is refused with a clear
// error, and both versions still decrypt. Warnings come at 50% and 90%,
// and the metrics show each version's count and share of its limit.
func TestEncryptLimit(t *testing.T) {
	fp := newFixtureProxy(t, nil)
	fp.token.CreateKey(t, fixtureKeyLabel+"-v2")
	fp.more = func(s fixtureSetting) string {
		if s.Name != "spec" {
			return ""
		}
		return "\t\t\tencrypt_limit 5\n" + versionsOf("version 2 "+fixtureKeyLabel+"-v2", "current 1")(s)
	}
	fp.load(nil)
	sealedAll := make([]sealed, 0, 10)
	for i := range 10 {
		s := fp.encrypt(fp.ks2, "/spec", fixtureKeyLabel, []byte("limited"), nil)
		wantV2 := i >= 5
		if got := bytes.Equal(s.metadata, v2Metadata); got != wantV2 {
			t.Fatalf("encrypt %d: metadata %x, want version 2: %v", i+1, s.metadata, wantV2)
		}
		sealedAll = append(sealedAll, s)
	}
	r := fp.call(fp.ks2, "/spec/kms/xks/v1/keys/"+fixtureKeyLabel+"/encrypt", encryptBody([]byte("one too many"), nil, false))
	expectError(t, r, http.StatusBadRequest, "InvalidStateException")
	if !strings.Contains(r.str("errorMessage"), "encryption limit") {
		t.Errorf("the refusal does not say why: %s", r.raw)
	}
	for i, s := range sealedAll {
		if d := fp.call(fp.ks2, "/spec/kms/xks/v1/keys/"+fixtureKeyLabel+"/decrypt", decryptBody(s, nil)); d.status != http.StatusOK {
			t.Fatalf("decrypt %d at the limit: %d %s", i, d.status, d.raw)
		}
	}
	if m := fp.metrics(); proxytest.MetricValue(t, m, `caddy_xks_key_version_encryptions{key="fixture",key_store="/spec/kms/xks/v1",label="fixture",version="1"}`) != 5 ||
		proxytest.MetricValue(t, m, `caddy_xks_key_version_encryptions{key="fixture",key_store="/spec/kms/xks/v1",label="fixture-v2",version="2"}`) != 5 ||
		proxytest.MetricValue(t, m, `caddy_xks_key_version_limit_used_ratio{key="fixture",key_store="/spec/kms/xks/v1",label="fixture-v2",version="2"}`) != 1 ||
		proxytest.MetricValue(t, m, `caddy_xks_key_current_version{key="fixture",key_store="/spec/kms/xks/v1"}`) != 2 {
		t.Errorf("usage metrics:\n%s", grepLines(m, "caddy_xks_key_"))
	}
	promoted := fp.countLog(func(e logEntry) bool {
		return strings.Contains(e.str("msg"), "reached its encryption limit; the next version is now current") && e.str("current") == "2"
	})
	refused := fp.countLog(func(e logEntry) bool {
		return e.str("logger") == "http.handlers.xks.audit" && e.str("operation") == "Encrypt" &&
			strings.Contains(e.str("reason"), "limit 5")
	})
	warned := map[string]int{}
	for _, e := range fp.logEntries() {
		if strings.Contains(e.str("msg"), "large part of its encryption limit") {
			warned[e.str("label")+" "+e.str("used")]++
		}
	}
	if promoted != 1 || refused != 1 {
		t.Errorf("%d log lines of the move to version 2 (want 1), %d audit lines of the refusal naming the limit (want 1)", promoted, refused)
	}
	if warned["fixture 60.0%"] != 1 || warned["fixture 100.0%"] != 1 || warned["fixture-v2 60.0%"] != 1 || warned["fixture-v2 100.0%"] != 1 || len(warned) != 4 {
		t.Errorf("warnings at 50%% and 90%% of each version, once each: %v", warned)
	}
}

// TestEncryptLimitWithHSMIVs: when the HSM makes the IVs (here the
// CloudHSM personality of the vendor shim, which writes its IV back as
// CloudHSM documents; see internal/vendorshim), the limit is the HSM's:
// Encrypts past encrypt_limit are counted and reported, never refused.
func TestEncryptLimitWithHSMIVs(t *testing.T) {
	fp := newFixtureProxyWith(t, func(fp *fixtureProxy) {
		shim := vendorshim.New(t, vendorshim.CloudHSM, fp.token.Module, fp.token.Label)
		fp.backend = &proxytest.Backend{Name: "main", Module: shim.Path, Token: shim.TokenLabel(fp.token.Label), PINEnv: "XKS_TEST_PIN",
			IV: shim.IVMode, Extra: "\t\t\tprivate_keys true\n"}
		fp.more = func(s fixtureSetting) string {
			if s.Name != "spec" {
				return ""
			}
			return "\t\t\tencrypt_limit 3\n"
		}
	})
	for i := range 5 {
		if r := fp.call(fp.ks2, "/spec/kms/xks/v1/keys/"+fixtureKeyLabel+"/encrypt", encryptBody([]byte("hsm ivs"), nil, false)); r.status != http.StatusOK {
			t.Fatalf("encrypt %d past the limit with HSM-made IVs: %d %s", i+1, r.status, r.raw)
		}
	}
	m := fp.metrics()
	if v := proxytest.MetricValue(t, m, `caddy_xks_key_version_limit_used_ratio{key="fixture",key_store="/spec/kms/xks/v1",label="fixture",version="1"}`); v != 5.0/3 {
		t.Errorf("limit used %v, want 5/3:\n%s", v, grepLines(m, "caddy_xks_key_"))
	}
	warnings := fp.countLog(func(e logEntry) bool {
		return strings.Contains(e.str("msg"), "large part of its encryption limit") && e.str("refused_at_limit") == "false"
	})
	if warnings != 2 {
		t.Errorf("%d warnings saying the limit is not enforced, want 2 (50%% and 90%%)", warnings)
	}
}

// TestKeyCheckProvesVersions: a configured version whose HSM key no
// backend holds fails the load, saying which and what to do; one that
// disappears later (destroyed on the HSM) makes health DEGRADED, naming it.
func TestKeyCheckProvesVersions(t *testing.T) {
	fp := newFixtureProxyWith(t, func(fp *fixtureProxy) {
		fp.backend = &proxytest.Backend{Name: "main", Module: fp.token.Module, Token: fp.token.Label, PINEnv: "XKS_TEST_PIN",
			Extra: "\t\t\thealth_ttl 100ms\n"}
	})
	fp.more = versionsOf("version 2 "+fixtureKeyLabel+"-v2", "current 1")
	err := fp.proxy.TryLoad(fp.config())
	if err == nil || !strings.Contains(err.Error(), `version 2 of key fixture, the HSM key labelled "fixture-v2", is on no backend`) ||
		!strings.Contains(err.Error(), "caddy xks keygen --label fixture-v2") {
		t.Fatalf("loading a version that no backend holds: %v", err)
	}
	fp.token.CreateKey(t, fixtureKeyLabel+"-v2")
	fp.load(nil)
	fp.token.DestroyKeys(t, fixtureKeyLabel+"-v2")
	deadline := time.Now().Add(2 * time.Minute)
	for {
		// The key check runs again once the last one is older than the
		// backend's health_ttl: wait for it, however long that takes.
		r := fp.call(fp.ks2, "/spec/kms/xks/v1/health", healthBody)
		if strings.Contains(r.raw, `"healthStatus":"DEGRADED"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("health after a version's key was destroyed: %d %s", r.status, r.raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
	found := fp.countLog(func(e logEntry) bool {
		return e.str("level") == "error" && strings.Contains(e.str("msg"), `key check: version 2 of key fixture, the HSM key labelled "fixture-v2", is on no backend`)
	})
	if found == 0 {
		t.Error("no error log line names the missing version")
	}
}

// TestUsageOfAnyKey: a key store with keys "*" counts each key on the token
// that is used, and makes no counter or storage record for an id that is
// on no backend, whatever ids a caller sends.
func TestUsageOfAnyKey(t *testing.T) {
	fp := newFixtureProxyWith(t, func(fp *fixtureProxy) { fp.keys = "*" })
	fp.encrypt(fp.ks2, "/spec", fixtureKeyLabel, []byte("any key"), nil)
	for i := range 20 {
		r := fp.call(fp.ks2, fmt.Sprintf("/spec/kms/xks/v1/keys/no-such-key-%d/encrypt", i), encryptBody([]byte("x"), nil, false))
		expectError(t, r, http.StatusNotFound, "KeyNotFoundException")
	}
	m := fp.metrics()
	if v := proxytest.MetricValue(t, m, `caddy_xks_key_version_encryptions{key="fixture",key_store="/spec/kms/xks/v1",label="fixture",version="1"}`); v != 1 {
		t.Errorf("the fixture key's count is %v, want 1:\n%s", v, grepLines(m, "caddy_xks_key_"))
	}
	if strings.Contains(m, "no-such-key") {
		t.Errorf("ids on no backend have counters:\n%s", grepLines(m, "no-such-key"))
	}
	records, err := os.ReadDir(fp.proxy.Storage + "/xks/usage")
	if err != nil {
		t.Fatal(err)
	}
	if len(records) != 1 || records[0].Name() != fixtureKeyLabel {
		t.Errorf("usage records for %v, want only %s", records, fixtureKeyLabel)
	}
}

// TestVersionLabelIsNoKeyID: a key's version 2 or later is reached through
// the key's id only. Called by its own HSM label, in a key store with keys
// "*", it escaped the key's disable, its own disabled state and the rules
// on the key's id, and KMS could have bound a key to it.
func TestVersionLabelIsNoKeyID(t *testing.T) {
	f := newFixtureWith(t, func(f *fixture) {
		for _, k := range []string{"rot", "rot-v2", "old", "old-v2"} {
			f.token.CreateKey(t, k)
		}
		f.xksExtra = fmt.Sprintf(`		key_store /any {
			hsm main
			region %s
			credential %s {env.XKS_TEST_SECRET_2}
			keys *
			disable rot
			versions rot {
				version 2 rot-v2
				current 2
			}
			versions old {
				version 2 old-v2 disabled
				current 1
			}
			authorize {
				deny no-old-metadata `+"`key_id == \"old\" && operation == \"GetKeyMetadata\"`"+`
			}
%s		}
`, region, f.ks2.akid, proxytest.KeyStoreDefaults(""))
	})
	tests := []struct {
		name, key, op string
		status        int
		errorName     string
	}{
		{"a disabled key", "rot", "encrypt", http.StatusBadRequest, "InvalidStateException"},
		{"the disabled key's current version, by its label", "rot-v2", "encrypt", http.StatusNotFound, "KeyNotFoundException"},
		{"its metadata, by its label", "rot-v2", "metadata", http.StatusNotFound, "KeyNotFoundException"},
		{"a key with a disabled version", "old", "encrypt", http.StatusOK, ""},
		{"the disabled version, by its label", "old-v2", "encrypt", http.StatusNotFound, "KeyNotFoundException"},
		{"a rule on the key id denies", "old", "metadata", http.StatusForbidden, "AccessDeniedException"},
		{"the rule's key, by a version's label", "old-v2", "metadata", http.StatusNotFound, "KeyNotFoundException"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := encryptBody([]byte("version label"), nil, false)
			if tt.op == "metadata" {
				body = metaBody
			}
			r := f.call(f.ks2, "/any/kms/xks/v1/keys/"+tt.key+"/"+tt.op, body)
			if tt.errorName == "" {
				if r.status != tt.status {
					t.Fatalf("got %d %s, want %d", r.status, r.raw, tt.status)
				}
				return
			}
			expectError(t, r, tt.status, tt.errorName)
		})
	}
}
