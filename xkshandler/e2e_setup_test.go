package xkshandler_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/miekg/pkcs11"

	_ "github.com/caddy-xks/caddy-xks/caddyfile"
	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/internal/testcert"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// The end-to-end tests run a real Caddy (in this process, through
// caddytest) with the plugin, on loopback, in front of a real SoftHSM2
// token, and sign requests with aws-sdk-go-v2's SigV4 signer or curl.

func TestMain(m *testing.M) { os.Exit(hsmtest.Main(m)) }

const region = "us-east-1"

// credential is a SigV4 credential made fresh for a test, so that a secret
// found in a log can only have come from that test.
type credential struct{ akid, secret string }

func newCredential(t testing.TB) credential {
	t.Helper()
	c, err := sigv4auth.NewCredential()
	if err != nil {
		t.Fatal(err)
	}
	return credential{c.AccessKeyID, c.SecretAccessKey}
}

// fixture is one running proxy and what it was configured with.
type fixture struct {
	t       *testing.T
	proxy   *proxytest.Proxy
	origin  string // https://localhost:<port>
	token   hsmtest.Token
	dir     string
	cert    string
	key     string
	ks1     []credential // credentials of /ks1, in config order
	ks2     credential
	logFile string

	module   string              // the PKCS#11 module Caddy loads: SoftHSM2, or a fault shim in front of it
	hsmExtra string              // more lines for the pkcs11 block
	backends []proxytest.Backend // more backends of the hsm global option
	// exportable adds the backend "exportable" (allow_exportable_keys) on
	// the token, which /legacy and /clear use for keyClear; otherwise they
	// use main, which refuses it. The fault fixtures leave it out: the
	// shim's faults and counts, and the token's pool, are then main's alone.
	exportable bool
	ks1Extra   string // more lines for the /ks1 key_store block
	xksExtra   string // more lines for the xks block

	mu        sync.Mutex
	sensitive [][]byte // plaintexts and AADs sent or received, to look for in the log
}

// Keys of the test token.
const (
	keyBoth     = "k"         // encrypt and decrypt
	keyEncOnly  = "k-enc"     // encrypt only
	keyDecOnly  = "k-dec"     // decrypt only
	keyNone     = "k-none"    // neither
	keyAES128   = "k-128"     // the wrong size
	keyClear    = "k-x"       // extractable, to check the HSM's output against Go's AES-GCM; only backend exportable uses it
	keyMissing  = "k-missing" // allowed by the key store but not on the token
	keyOtherKS  = "k2"        // only in /ks2
	keyNotAllow = "k-secret"  // on the token, in no allow-list
	keyOff      = "k-off"     // disabled in the key store's config
)

func newFixture(t *testing.T) *fixture {
	t.Helper()
	return newFixtureWith(t, func(*fixture) {})
}

// newFixtureWith is newFixture with changes made before the first load,
// such as another module or pool settings.
func newFixtureWith(t *testing.T, change func(*fixture)) *fixture {
	t.Helper()
	f := &fixture{t: t, token: hsmtest.NewToken(t), dir: t.TempDir(), exportable: true}
	f.module = f.token.Module
	f.token.CreateKey(t, keyBoth)
	f.token.CreateKey(t, keyEncOnly, hsmtest.Usage(pkcs11.CKA_DECRYPT, false))
	f.token.CreateKey(t, keyDecOnly, hsmtest.Usage(pkcs11.CKA_ENCRYPT, false))
	f.token.CreateKey(t, keyNone, hsmtest.Usage(pkcs11.CKA_ENCRYPT, false), hsmtest.Usage(pkcs11.CKA_DECRYPT, false))
	f.token.CreateKey(t, keyAES128, hsmtest.Bytes(16))
	f.token.CreateKey(t, keyClear, hsmtest.Extractable())
	f.token.CreateKey(t, keyOtherKS)
	f.token.CreateKey(t, keyNotAllow)
	f.token.CreateKey(t, keyOff)
	f.ks1 = []credential{newCredential(t)}
	f.newProxy()
	change(f)
	f.load(1)
	t.Cleanup(f.checkLog)
	return f
}

// newProxy makes the fixture's certificate, /ks2's credential and the
// proxy instance, which trusts the certificate; nothing runs until a load.
func (f *fixture) newProxy() {
	f.t.Helper()
	f.cert, f.key = testcert.Localhost(f.t, f.dir)
	f.ks2 = newCredential(f.t)
	f.proxy = proxytest.New(f.t)
	f.proxy.Trust(f.cert)
	f.origin = f.proxy.Origin()
	f.logFile = f.proxy.LogFile
	f.t.Setenv("XKS_TEST_PIN", f.token.PIN)
}

// checkLog fails the test if the proxy's log holds a secret, the PIN, or a
// plaintext or AAD (raw, Base64 or hex) that the test sent or received.
// Values under 12 bytes are skipped: they could match by chance.
func (f *fixture) checkLog() {
	logs, err := os.ReadFile(f.logFile)
	if err != nil {
		f.t.Errorf("reading the proxy's log: %v", err)
		return
	}
	values := map[string][]byte{"HSM PIN": []byte(f.token.PIN), "ks2 secret": []byte(f.ks2.secret)}
	for i, c := range f.ks1 {
		values[fmt.Sprintf("ks1 secret %d", i)] = []byte(c.secret)
	}
	f.mu.Lock()
	for i, v := range f.sensitive {
		if len(v) >= 12 {
			values[fmt.Sprintf("plaintext or AAD %d", i)] = v
		}
	}
	f.mu.Unlock()
	for name, v := range values {
		for _, form := range []string{string(v), base64.StdEncoding.EncodeToString(v), hex.EncodeToString(v)} {
			if strings.Contains(string(logs), form) {
				f.t.Errorf("the proxy's log holds the %s", name)
				break
			}
		}
	}
}

// remember records the plaintext and AAD fields of a request or response.
func (f *fixture) remember(body []byte) {
	var fields map[string]any
	if json.Unmarshal(body, &fields) != nil {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, name := range []string{"plaintext", "additionalAuthenticatedData"} {
		if v, ok := fields[name].(string); ok {
			if b, err := base64.StdEncoding.DecodeString(v); err == nil {
				f.sensitive = append(f.sensitive, b)
			}
		}
	}
}

// load (re)loads the proxy's config with the fixture's current credentials;
// fleetSize is reported in health, and changing it makes a reload real.
//
// The client's idle connections are dropped before and after, so that the
// readiness probe and the test's next request open connections to the new
// server: an HTTP/2 connection left open across a reload goes on being
// served by the old config for a while, and can be closed by the old server
// just as a request is written on it (see TestReloadUnderLoad, which
// reloads without this).
func (f *fixture) load(fleetSize int) {
	f.t.Helper()
	f.proxy.Client.CloseIdleConnections()
	f.reload(fleetSize)
	f.proxy.Client.CloseIdleConnections()
}

// reload loads the config for fleetSize and waits until /ks1 answers a
// signed health check that reports it: the new config is then serving.
func (f *fixture) reload(fleetSize int) {
	f.t.Helper()
	f.proxy.Ready = func() error { return f.reports(fleetSize) }
	f.proxy.Load(f.config(fleetSize))
}

// reports checks that /ks1 answers health with the fleet size.
func (f *fixture) reports(fleetSize int) error {
	r, err := f.try(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody)
	if err != nil {
		return err
	}
	if want := fmt.Sprintf(`"xksProxyFleetSize":%d`, fleetSize); r.status != http.StatusOK || !strings.Contains(r.raw, want) {
		return fmt.Errorf("health: %d %s, want %s", r.status, r.raw, want)
	}
	return nil
}

// try sends a POST signed with c and returns the answer, or the error a
// client would see, without failing the test: for readiness probes and
// clients running beside the test.
func (f *fixture) try(c credential, path, body string) (response, error) {
	req, err := http.NewRequest(http.MethodPost, f.origin+path, strings.NewReader(body))
	if err != nil {
		return response{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	if err := signRequest(req, c, body, region, time.Now()); err != nil {
		return response{}, err
	}
	resp, err := f.proxy.Client.Do(req)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, err
	}
	r := response{status: resp.StatusCode, raw: string(raw)}
	if err := json.Unmarshal(raw, &r.body); err != nil {
		return r, fmt.Errorf("%s: %d %q: %w", path, r.status, raw, err)
	}
	return r, nil
}

// config is the proxy's Caddyfile for the fixture's current settings.
func (f *fixture) config(fleetSize int) string {
	f.t.Helper()
	var creds strings.Builder
	for i, c := range f.ks1 {
		env := fmt.Sprintf("XKS_TEST_SECRET_1_%d", i)
		f.t.Setenv(env, c.secret)
		fmt.Fprintf(&creds, "\t\t\tcredential %s {env.%s}\n", c.akid, env)
	}
	f.t.Setenv("XKS_TEST_SECRET_2", f.ks2.secret)
	hsm := proxytest.Backend{Name: "main", Module: f.module, Token: f.token.Label, PINEnv: "XKS_TEST_PIN", Extra: f.hsmExtra}
	// The same token through a backend that uses keyClear, whose value the
	// tests read to check the HSM's output: main refuses it. The same
	// settings, so that the shared token opens alike whichever backend is
	// opened first.
	blocks, clear := hsm.Block(), "main"
	if f.exportable {
		exportable := hsm
		exportable.Name = "exportable"
		exportable.Extra = strings.TrimRight("\t\t\tallow_exportable_keys\n"+f.hsmExtra, "\n")
		blocks, clear = blocks+exportable.Block(), exportable.Name
	}
	for _, b := range f.backends {
		blocks += b.Block()
	}
	ksDefaults := proxytest.KeyStoreDefaults(f.ks1Extra)
	return f.proxy.Global("\thsm {\n"+blocks+"\t}\n") + fmt.Sprintf(`
localhost:%[1]d {
	tls %[2]s %[3]s
	xks {
%[14]s
		key_store /ks1 {
			hsm main
			region %[4]s
%[5]s			keys %[6]s
			disable %[11]s
			ciphertext_metadata dGVzdC12MQ==
			fleet_size %[7]d
%[12]s%[13]s
		}
		key_store /ks2/kms/xks/v1 {
			hsm main
			region %[4]s
			credential %[8]s {env.XKS_TEST_SECRET_2}
			keys %[9]s
%[15]s		}
		key_store /legacy {
			hsm %[16]s
			region %[4]s
			credential %[8]s {env.XKS_TEST_SECRET_2}
			keys %[10]s
			aad_framing aws_sample
%[15]s		}
		key_store /clear {
			hsm %[16]s
			region %[4]s
			credential %[8]s {env.XKS_TEST_SECRET_2}
			keys %[10]s
			ciphertext_metadata dGVzdC12MQ==
%[15]s		}
	}
}
`, f.proxy.HTTPSPort, f.cert, f.key, region, creds.String(),
		strings.Join([]string{keyBoth, keyEncOnly, keyDecOnly, keyNone, keyAES128, keyClear, keyMissing, keyOff}, " "),
		fleetSize, f.ks2.akid, keyOtherKS, keyClear, keyOff, ksDefaults, f.ks1Extra, f.xksExtra, proxytest.KeyStoreDefaults(""), clear)
}

// response is an XKS answer: the status and the decoded JSON body.
type response struct {
	status int
	raw    string
	body   map[string]any
}

func (r response) str(field string) string {
	s, _ := r.body[field].(string)
	return s
}

func (r response) bytes(t testing.TB, field string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(r.str(field))
	if err != nil {
		t.Fatalf("field %s of %s: %v", field, r.raw, err)
	}
	return b
}

// call sends a POST signed with aws-sdk-go-v2's SigV4 signer.
func (f *fixture) call(c credential, path, body string) response {
	f.t.Helper()
	return f.send(c, http.MethodPost, path, body, region, time.Now())
}

func (f *fixture) send(c credential, method, path, body, signRegion string, at time.Time) response {
	f.t.Helper()
	req, err := http.NewRequest(method, f.origin+path, strings.NewReader(body))
	if err != nil {
		f.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if err := signRequest(req, c, body, signRegion, at); err != nil {
		f.t.Fatal(err)
	}
	f.remember([]byte(body))
	return f.do(req)
}

// signRequest signs req with aws-sdk-go-v2's SigV4 signer, as KMS would.
func signRequest(req *http.Request, c credential, body, signRegion string, at time.Time) error {
	sum := sha256.Sum256([]byte(body))
	return v4.NewSigner().SignHTTP(context.Background(), aws.Credentials{AccessKeyID: c.akid, SecretAccessKey: c.secret},
		req, hex.EncodeToString(sum[:]), "kms-xks-proxy", signRegion, at)
}

func (f *fixture) do(req *http.Request) response {
	f.t.Helper()
	resp, err := f.proxy.Client.Do(req)
	if err != nil {
		f.t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		f.t.Fatal(err)
	}
	r := response{status: resp.StatusCode, raw: string(raw)}
	f.remember(raw)
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		f.t.Errorf("%s %s: Content-Type %q", req.Method, req.URL.Path, ct)
	}
	if strings.Contains(r.raw, "\n") {
		f.t.Errorf("%s %s: response is not a single line: %q", req.Method, req.URL.Path, r.raw)
	}
	if err := json.Unmarshal(raw, &r.body); err != nil {
		f.t.Fatalf("%s %s: body %q is not a JSON object: %v", req.Method, req.URL.Path, raw, err)
	}
	return r
}

// expectError checks an XKS error answer. The test's status and name,
// written out as KMS sees them, must also be a row of the spec's table as
// package xksapi holds it (or its 405 for a wrong method).
func expectError(t testing.TB, r response, status int, name string) {
	t.Helper()
	wrongMethod := status == xksapi.StatusWrongMethod && name == xksapi.ValidationException
	if !wrongMethod && xksapi.Status(name) != status {
		t.Fatalf("the test expects %d %s, which is no row of the error table", status, name)
	}
	if r.status != status || r.str("errorName") != name {
		t.Errorf("got %d %s, want %d %s", r.status, r.raw, status, name)
	}
	if msg := r.str("errorMessage"); !xksapi.ValidErrorMessage(msg) {
		t.Errorf("errorMessage %q is not under 512 printable ASCII characters", msg)
	}
}

// Request bodies.
const (
	healthBody = `{"requestMetadata":{"kmsRequestId":"req-health","kmsOperation":"KmsHealthCheck"}}`
	metaBody   = `{"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::111122223333:user/Alice","kmsOperation":"CreateKey","kmsRequestId":"req-meta"}}`
	cryptoMeta = `"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::111122223333:user/Alice","kmsKeyArn":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab","kmsOperation":"Encrypt","kmsRequestId":"req-crypto","kmsViaService":"ebs"}`
)

func encryptBody(plaintext, aad []byte, cdiv bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, `{%s,"plaintext":"%s","encryptionAlgorithm":"AES_GCM"`, cryptoMeta, base64.StdEncoding.EncodeToString(plaintext))
	if aad != nil {
		fmt.Fprintf(&b, `,"additionalAuthenticatedData":"%s"`, base64.StdEncoding.EncodeToString(aad))
	}
	if cdiv {
		b.WriteString(`,"ciphertextDataIntegrityValueAlgorithm":"SHA_256"`)
	}
	b.WriteString("}")
	return b.String()
}

// sealed is an Encrypt answer, to be decrypted.
type sealed struct{ ciphertext, iv, tag, metadata []byte }

func decryptBody(s sealed, aad []byte) string {
	var b strings.Builder
	enc := base64.StdEncoding.EncodeToString
	fmt.Fprintf(&b, `{%s,"ciphertext":"%s","initializationVector":"%s","authenticationTag":"%s","encryptionAlgorithm":"AES_GCM"`,
		cryptoMeta, enc(s.ciphertext), enc(s.iv), enc(s.tag))
	if s.metadata != nil {
		fmt.Fprintf(&b, `,"ciphertextMetadata":"%s"`, enc(s.metadata))
	}
	if aad != nil {
		fmt.Fprintf(&b, `,"additionalAuthenticatedData":"%s"`, enc(aad))
	}
	b.WriteString("}")
	return b.String()
}

func (f *fixture) encrypt(c credential, ks, key string, plaintext, aad []byte) sealed {
	f.t.Helper()
	r := f.call(c, ks+"/kms/xks/v1/keys/"+key+"/encrypt", encryptBody(plaintext, aad, false))
	if r.status != http.StatusOK {
		f.t.Fatalf("encrypt: %d %s", r.status, r.raw)
	}
	s := sealed{ciphertext: r.bytes(f.t, "ciphertext"), iv: r.bytes(f.t, "initializationVector"), tag: r.bytes(f.t, "authenticationTag")}
	if r.str("ciphertextMetadata") != "" {
		s.metadata = r.bytes(f.t, "ciphertextMetadata")
	}
	return s
}
