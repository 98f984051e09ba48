package xkshandler_test

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// Ciphertext fixtures: Encrypt answers written by a released proxy, kept in
// testdata, that every later proxy must decrypt. KMS stores a ciphertext for
// as long as its owner keeps the data, so a change to how the proxy frames
// the AAD or reads ciphertextMetadata that broke one of these would make
// customers' data undecryptable.
//
// The key is imported with a value fixed here, so that a fresh token of any
// later test holds the same key. Regenerate (only to add settings, never to
// replace what a released proxy wrote) with
//
//	XKS_WRITE_CIPHERTEXT_FIXTURES=testdata/ciphertexts-<name>.json go test -run TestWriteCiphertextFixtures ./xkshandler

// fixtureKeyLabel is the external key id of the fixtures.
const fixtureKeyLabel = "fixture"

// fixtureKeyValue is the fixtures' AES-256 key: a test value, public.
func fixtureKeyValue() []byte {
	sum := sha256.Sum256([]byte("caddy-xks ciphertext fixtures"))
	return sum[:]
}

// fixtureSetting is one way a key store could be configured: its AAD framing
// and static ciphertext_metadata.
type fixtureSetting struct {
	Name               string `json:"name"`
	AADFraming         string `json:"aad_framing,omitempty"`
	CiphertextMetadata string `json:"ciphertext_metadata,omitempty"`
}

var fixtureSettings = []fixtureSetting{
	{Name: "spec"},
	{Name: "spec-metadata", CiphertextMetadata: "a2V5X3ZlcnNpb249MQ=="},
	{Name: "spec-metadata-20", CiphertextMetadata: "MDEyMzQ1Njc4OTAxMjM0NTY3ODk="},
	{Name: "aws-sample", AADFraming: "aws_sample"},
	{Name: "aws-sample-metadata", AADFraming: "aws_sample", CiphertextMetadata: "dGVzdC12MQ=="},
}

// ciphertextFixture is one Encrypt answer and what it was asked.
type ciphertextFixture struct {
	Setting            string `json:"setting"`
	Plaintext          []byte `json:"plaintext"`
	AAD                []byte `json:"aad,omitempty"`
	Ciphertext         []byte `json:"ciphertext"`
	CiphertextMetadata []byte `json:"ciphertext_metadata,omitempty"`
	IV                 []byte `json:"iv"`
	Tag                []byte `json:"tag"`
}

type ciphertextFixtures struct {
	Written string `json:"written"`
	// Commit is the proxy's commit that wrote them.
	Commit   string              `json:"commit,omitempty"`
	Settings []fixtureSetting    `json:"settings"`
	Fixtures []ciphertextFixture `json:"fixtures"`
}

// fixtureProxy runs a proxy with one key store per fixture setting, at
// /<setting name>, over a fresh token holding the fixture key. more, when
// set, adds lines to every key_store block, and xks to the xks block.
type fixtureProxy struct {
	*fixture
	more func(s fixtureSetting) string
	xks  string
	// backend replaces the backend "main" on the token, when set.
	backend *proxytest.Backend
	// keys replaces the key stores' keys (the fixture key), when set.
	keys string
}

func newFixtureProxy(t *testing.T, more func(s fixtureSetting) string) *fixtureProxy {
	t.Helper()
	return newFixtureProxyWith(t, func(fp *fixtureProxy) { fp.more = more })
}

// newFixtureProxyWith is newFixtureProxy with changes made before the first
// load.
func newFixtureProxyWith(t *testing.T, change func(*fixtureProxy)) *fixtureProxy {
	t.Helper()
	f := &fixture{t: t, token: hsmtest.NewToken(t), dir: t.TempDir()}
	f.token.ImportKey(t, fixtureKeyLabel, fixtureKeyValue())
	f.newProxy()
	t.Setenv("XKS_TEST_SECRET_2", f.ks2.secret)
	fp := &fixtureProxy{fixture: f}
	change(fp)
	fp.load(nil)
	return fp
}

// config is the proxy's Caddyfile for the current more and xks.
func (fp *fixtureProxy) config() string {
	f := fp.fixture
	keys := fixtureKeyLabel
	if fp.keys != "" {
		keys = fp.keys
	}
	var stores strings.Builder
	for _, s := range fixtureSettings {
		fmt.Fprintf(&stores, "\t\tkey_store /%s {\n\t\t\thsm main\n\t\t\tregion %s\n\t\t\tcredential %s {env.XKS_TEST_SECRET_2}\n\t\t\tkeys %s\n%s",
			s.Name, region, f.ks2.akid, keys, proxytest.KeyStoreDefaults(""))
		if s.AADFraming != "" {
			fmt.Fprintf(&stores, "\t\t\taad_framing %s\n", s.AADFraming)
		}
		if s.CiphertextMetadata != "" {
			fmt.Fprintf(&stores, "\t\t\tciphertext_metadata %s\n", s.CiphertextMetadata)
		}
		if fp.more != nil {
			stores.WriteString(fp.more(s))
		}
		stores.WriteString("\t\t}\n")
	}
	hsm := proxytest.Backend{Name: "main", Module: f.token.Module, Token: f.token.Label, PINEnv: "XKS_TEST_PIN"}
	if fp.backend != nil {
		hsm = *fp.backend
	}
	return f.proxy.Global("\thsm {\n"+hsm.Block()+"\t}\n") + fmt.Sprintf("\nlocalhost:%d {\n\ttls %s %s\n\txks {\n%s%s\t}\n}\n",
		f.proxy.HTTPSPort, f.cert, f.key, fp.xks, stores.String())
}

// load (re)loads the config with the client's idle connections dropped
// before and after, then waits until ready passes (by default: the last
// key store answers health).
func (fp *fixtureProxy) load(ready func() error) {
	fp.t.Helper()
	fp.proxy.Client.CloseIdleConnections()
	fp.reload(ready)
	fp.proxy.Client.CloseIdleConnections()
}

// reload is load keeping the connections that clients use.
func (fp *fixtureProxy) reload(ready func() error) {
	fp.t.Helper()
	if ready == nil {
		last := "/" + fixtureSettings[len(fixtureSettings)-1].Name
		ready = func() error {
			r, err := fp.try(fp.ks2, last+"/kms/xks/v1/health", healthBody)
			if err == nil && r.status != http.StatusOK {
				err = fmt.Errorf("health: %d %s", r.status, r.raw)
			}
			return err
		}
	}
	fp.proxy.Ready = ready
	fp.proxy.Load(fp.config())
}

// TestWriteCiphertextFixtures writes the fixtures file named by
// XKS_WRITE_CIPHERTEXT_FIXTURES; without it, it does nothing.
func TestWriteCiphertextFixtures(t *testing.T) {
	out := os.Getenv("XKS_WRITE_CIPHERTEXT_FIXTURES")
	if out == "" {
		t.Skip("XKS_WRITE_CIPHERTEXT_FIXTURES is not set: the fixtures are only written on purpose")
	}
	fp := newFixtureProxy(t, nil)
	file := ciphertextFixtures{Written: time.Now().UTC().Format(time.RFC3339), Commit: os.Getenv("XKS_FIXTURES_COMMIT"), Settings: fixtureSettings}
	inputs := []struct{ plaintext, aad []byte }{
		{[]byte("a data key of thirty-two bytes!!"), nil},
		{[]byte("a data key of thirty-two bytes!!"), []byte("kms encryption context")},
		{[]byte{0}, []byte{}},
		{make([]byte, 4096), []byte("a longer plaintext")},
	}
	for _, s := range fixtureSettings {
		for _, in := range inputs {
			sealed := fp.encrypt(fp.ks2, "/"+s.Name, fixtureKeyLabel, in.plaintext, in.aad)
			file.Fixtures = append(file.Fixtures, ciphertextFixture{
				Setting: s.Name, Plaintext: in.plaintext, AAD: in.aad,
				Ciphertext: sealed.ciphertext, CiphertextMetadata: sealed.metadata, IV: sealed.iv, Tag: sealed.tag,
			})
		}
	}
	raw, err := json.MarshalIndent(file, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil { //nolint:gosec // the path is the developer's own, from the environment
		t.Fatal(err)
	}
	if err := os.WriteFile(out, append(raw, '\n'), 0o644); err != nil { //nolint:gosec // test data, public
		t.Fatal(err)
	}
}
