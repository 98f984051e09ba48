package ekmhandler_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	_ "github.com/caddy-xks/caddy-xks/caddyfile"
	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/internal/testcert"
)

// The end-to-end tests run a real Caddy (in this process) with the plugin,
// on loopback, over mutual TLS 1.3 and HTTP/1.1 as Managed HSM calls, in
// front of a real SoftHSM2 token and NSS softokn, and check every answer
// against independent software: crypto/rsa for RSA-OAEP and an RFC 3394 and
// RFC 5649 implementation written here for AES key wrap.

func TestMain(m *testing.M) { os.Exit(hsmtest.Main(m)) }

// subject is the name of Managed HSM's client certificate that the key
// stores accept, as `az keyvault ekm-connection certificate show` gives it.
const subject = "contoso.managedhsmclient.azure.net"

// Keys of the SoftHSM2 token, all in /soft's allow-list but kekHidden.
const (
	kekAES        = "kek-aes"        // AES-256, both paths permitted
	kekRSA        = "kek-rsa"        // RSA-2048, the test's own key pair
	kekAES128     = "kek-128"        // the wrong size
	kekRSA1024    = "kek-rsa1024"    // the wrong size
	kekCryptOnly  = "kek-crypt-only" // AES-256 that SoftHSM2 cannot wrap with: CKA_WRAP false
	kekOff        = "kek-off"        // disabled in the key store's config
	kekMissing    = "kek-missing"    // allowed, not on the token
	kekExportable = "kek-exportable" // its value can leave the HSM
	kekHidden     = "kek-hidden"     // on the token, in no allow-list
)

// fixture is one running proxy and what it was configured with.
type fixture struct {
	t     *testing.T
	proxy *proxytest.Proxy
	dir   string
	cert  string // the server's certificate
	key   string
	soft  hsmtest.Token
	nss   hsmtest.Token
	ca    *testcert.CA // the client certificates' root: Microsoft's, in production
	good  tls.Certificate

	softKEK, nssKEK []byte
	pair            *rsa.PrivateKey
	nssAES, nssRSA  string // NSS labels, of this test's own

	module string // the module of backend soft: SoftHSM2, or a shim in front of it
	// keysNotPrivate makes the keys of the SoftHSM2 token CKA_PRIVATE false.
	keysNotPrivate bool
	softToken      string // the token label backend soft names: SoftHSM2's, or a shim's
	softExtra      string // more lines for backend soft's pkcs11 block
	nssExtra       string // more lines for backend nss's pkcs11 block
	softStore      string // more lines for key store /soft
	moreStores     string // more key_store blocks

	mu        sync.Mutex
	clients   map[*tls.Certificate]*http.Client
	sensitive [][]byte // data keys sent or received, to look for in the log
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	return newFixtureWith(t, func(*fixture) {})
}

// newFixtureWith is newFixture with changes made before the first load.
func newFixtureWith(t *testing.T, change func(*fixture)) *fixture {
	t.Helper()
	f := prepareFixture(t, change)
	f.load()
	return f
}

// prepareFixture is newFixtureWith without the load: nothing runs yet.
func prepareFixture(t *testing.T, change func(*fixture)) *fixture {
	t.Helper()
	f := &fixture{t: t, dir: t.TempDir(), soft: hsmtest.NewToken(t), nss: hsmtest.NSS(t), clients: map[*tls.Certificate]*http.Client{}}
	f.module, f.softToken = f.soft.Module, f.soft.Label
	f.cert, f.key = testcert.Localhost(t, f.dir)
	f.ca = testcert.NewCA(t, f.dir, "Managed HSM client root (test)")
	f.good = f.ca.Client(t, subject, x509.ExtKeyUsageClientAuth)
	f.proxy = proxytest.New(t)
	t.Setenv("EKM_TEST_PIN", f.soft.PIN)
	f.proxy.Ready = func() error {
		r := f.call(&f.good, "/soft/info", query, contextBody)
		if r.status != http.StatusOK {
			return fmt.Errorf("info: %d %s", r.status, r.raw)
		}
		return nil
	}
	change(f)
	f.importKeys()
	t.Cleanup(f.checkLog)
	return f
}

// importKeys puts the test's keys on the tokens, private unless
// keysNotPrivate (a token that cannot hold private objects shows no
// private key).
func (f *fixture) importKeys() {
	t := f.t
	t.Helper()
	private := hsmtest.Private(!f.keysNotPrivate)
	f.softKEK, f.nssKEK = randomBytes(32), randomBytes(32)
	f.pair = hsmtest.RSAKey(t, 2048)
	f.soft.ImportKey(t, kekAES, f.softKEK, hsmtest.KeyWrapping(), private)
	f.soft.ImportRSAKey(t, kekRSA, f.pair, true, private)
	f.soft.ImportKey(t, kekAES128, randomBytes(16), hsmtest.KeyWrapping(), private)
	f.soft.ImportRSAKey(t, kekRSA1024, hsmtest.RSAKey(t, 1024), true, private)
	f.soft.ImportKey(t, kekCryptOnly, randomBytes(32), hsmtest.Usage(pkcs11.CKA_WRAP, false), hsmtest.Usage(pkcs11.CKA_UNWRAP, false), private)
	f.soft.ImportKey(t, kekOff, randomBytes(32), hsmtest.KeyWrapping(), private)
	f.soft.ImportKey(t, kekExportable, randomBytes(32), hsmtest.KeyWrapping(), hsmtest.Protection(false, true), private)
	f.soft.ImportKey(t, kekHidden, randomBytes(32), hsmtest.KeyWrapping(), private)
	// NSS softokn's database lives as long as the process: labels of this
	// test's own.
	suffix := strings.ToLower(rand.Text()[:8])
	f.nssAES, f.nssRSA = "nss-aes-"+suffix, "nss-rsa-"+suffix
	f.nss.ImportKey(t, f.nssAES, f.nssKEK, hsmtest.KeyWrapping())
	f.nss.ImportRSAKey(t, f.nssRSA, f.pair, true)
}

// config is the proxy's Caddyfile: backends soft (SoftHSM2, or a shim) and
// nss (NSS softokn), and a key store on each, over mutual TLS 1.3 that
// requests a client certificate and leaves its check to the handler.
func (f *fixture) config() string {
	backends := proxytest.Backend{Name: "soft", Module: f.module, Token: f.softToken, PINEnv: "EKM_TEST_PIN", Extra: f.softExtra}.Block() +
		proxytest.Backend{Name: "nss", Module: f.nss.Module, Token: f.nss.Label, PINEnv: "EKM_TEST_PIN",
			Extra: fmt.Sprintf("\t\t\tinit_args %q\n", f.nss.InitArgs) + f.nssExtra}.Block()
	stores := fmt.Sprintf(`		key_store /soft {
			hsm soft
			client_subjects %[1]s
			client_roots %[2]s
			keys %[3]s
			disable %[4]s
%[5]s		}
		key_store /nss/prod {
			hsm nss
			client_subjects %[1]s
			client_roots %[2]s
			keys %[6]s %[7]s
%[8]s		}
%[9]s`, subject, f.ca.File, strings.Join([]string{kekAES, kekRSA, kekAES128, kekRSA1024, kekCryptOnly, kekOff, kekMissing, kekExportable}, " "),
		kekOff, proxytest.KeyStoreDefaults(f.softStore)+f.softStore, f.nssAES, f.nssRSA, proxytest.KeyStoreDefaults(""), f.moreStores)
	return f.proxy.Global("\thsm {\n"+backends+"\t}\n") + fmt.Sprintf(`
localhost:%d {
	tls %s %s {
		protocols tls1.3
		client_auth {
			mode request
		}
	}
	azure_ekm {
%s	}
}
`, f.proxy.HTTPSPort, f.cert, f.key, stores)
}

// load (re)loads the proxy's config and waits until it answers.
func (f *fixture) load() {
	f.t.Helper()
	f.closeIdle()
	f.proxy.Load(f.config())
	f.closeIdle()
}

func (f *fixture) closeIdle() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.clients {
		c.CloseIdleConnections()
	}
}

// client is an HTTP/1.1 client over TLS 1.3 that trusts the proxy's
// certificate and presents cert (none when nil), as Managed HSM does.
func (f *fixture) client(cert *tls.Certificate) *http.Client {
	f.mu.Lock()
	defer f.mu.Unlock()
	if c, ok := f.clients[cert]; ok {
		return c
	}
	pem, err := os.ReadFile(f.cert)
	if err != nil {
		f.t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	dialer := &net.Dialer{Timeout: 30 * time.Second}
	c := &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				_, port, _ := net.SplitHostPort(addr)
				return dialer.DialContext(ctx, network, net.JoinHostPort("127.0.0.1", port))
			},
			TLSClientConfig:     cfg,
			TLSHandshakeTimeout: 30 * time.Second,
			// Managed HSM speaks HTTP/1.1 with keep-alive.
			ForceAttemptHTTP2: false,
			TLSNextProto:      map[string]func(string, *tls.Conn) http.RoundTripper{},
		},
	}
	f.clients[cert] = c
	return c
}

// query is the api-version every call carries.
const query = "api-version=" + ekmapi.APIVersion

// response is an answer of the proxy.
type response struct {
	status int
	header http.Header
	raw    string
	err    error // the connection's, when there was no answer
}

// call POSTs body to path?query with cert, and returns the answer.
func (f *fixture) call(cert *tls.Certificate, path, query, body string) response {
	f.t.Helper()
	return f.do(cert, http.MethodPost, path, query, body)
}

func (f *fixture) do(cert *tls.Certificate, method, path, query, body string) response {
	f.t.Helper()
	url := f.proxy.Origin() + path
	if query != "" {
		url += "?" + query
	}
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		f.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := f.client(cert).Do(req)
	if err != nil {
		return response{err: err}
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		f.t.Fatal(err)
	}
	return response{status: resp.StatusCode, header: resp.Header, raw: string(raw)}
}

// requestContext is the request_context of the tests' calls: what Managed
// HSM sends, UUIDs and a pool name.
var requestContext = ekmapi.RequestContext{
	RequestID:     "3f1e2d4c-5b6a-4978-8a9b-0c1d2e3f4a5b",
	CorrelationID: "9a8b7c6d-5e4f-4321-9876-fedcba987654",
	PoolName:      "contoso-pool",
}

var contextBody = mustJSON(ekmapi.ContextRequest{RequestContext: &requestContext})

func mustJSON(v any) string {
	out, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(out)
}

// wrapBody is the body of wrapkey and unwrapkey.
func (f *fixture) wrapBody(alg string, value []byte) string {
	f.mu.Lock()
	f.sensitive = append(f.sensitive, value)
	f.mu.Unlock()
	v := ekmapi.Value(value)
	return mustJSON(ekmapi.WrapRequest{RequestContext: &requestContext, Alg: alg, Value: &v})
}

// value reads the value of a WrapResult; a data key is remembered, to
// look for in the log.
func (f *fixture) value(r response, dataKey bool) []byte {
	f.t.Helper()
	var res ekmapi.WrapResult
	if r.status != http.StatusOK || json.Unmarshal([]byte(r.raw), &res) != nil {
		f.t.Fatalf("%d %s", r.status, r.raw)
	}
	if dataKey {
		f.mu.Lock()
		f.sensitive = append(f.sensitive, res.Value)
		f.mu.Unlock()
	}
	return res.Value
}

// wrap and unwrap call /{store}/{key}/wrapkey and unwrapkey.
func (f *fixture) wrap(store, key, alg string, dek []byte) response {
	f.t.Helper()
	return f.call(&f.good, store+"/"+key+"/wrapkey", query, f.wrapBody(alg, dek))
}

func (f *fixture) unwrap(store, key, alg string, wrapped []byte) response {
	f.t.Helper()
	return f.call(&f.good, store+"/"+key+"/unwrapkey", query, f.wrapBody(alg, wrapped))
}

// expectError checks an answer's status and ProxyError code, and that its
// body is a ProxyError with a message.
func expectError(t *testing.T, r response, status int, code string) {
	t.Helper()
	var pe ekmapi.ProxyError
	if r.status != status || json.Unmarshal([]byte(r.raw), &pe) != nil || pe.Code != code || pe.Message == "" {
		t.Fatalf("answer %d %s (%v), want %d with code %s", r.status, r.raw, r.err, status, code)
	}
}

// checkLog fails the test if the proxy's log holds the PIN or a data key
// the test sent or received, raw, in base64url or base64, or in hex.
// Values under 12 bytes are skipped: they could match by chance.
func (f *fixture) checkLog() {
	logs, err := os.ReadFile(f.proxy.LogFile)
	if err != nil {
		f.t.Errorf("reading the proxy's log: %v", err)
		return
	}
	values := map[string][]byte{"HSM PIN": []byte(f.soft.PIN)}
	f.mu.Lock()
	for i, v := range f.sensitive {
		if len(v) >= 12 {
			values[fmt.Sprintf("value %d", i)] = v
		}
	}
	f.mu.Unlock()
	for name, v := range values {
		for _, form := range []string{string(v), ekmapi.EncodeValue(v), base64.StdEncoding.EncodeToString(v), hex.EncodeToString(v)} {
			if bytes.Contains(logs, []byte(form)) {
				f.t.Errorf("the proxy's log holds the %s", name)
				break
			}
		}
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}
