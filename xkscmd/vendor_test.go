package xkscmd

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/internal/testcert"
	"github.com/caddy-xks/caddy-xks/internal/vendorshim"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
)

// The vendor matrix through a real Caddy: for each personality of the vendor
// shim, and for NSS softokn, `caddy xks keygen` makes the keys through the
// module, a wrong explicit iv mode stops the config from loading with an
// error that names the right one, iv auto picks the right one, and the
// whole `caddy xks check` conformance run passes.

// matrixModule is one column of the matrix: a module, the token a backend
// names, and the backend lines it needs.
type matrixModule struct {
	module, token       string
	tk                  hsmtest.Token
	ivMode, wrongIVMode string
	extra               string
}

// vendorColumn is the column of a vendor shim personality over a new
// SoftHSM2 token.
func vendorColumn(t *testing.T, p vendorshim.Personality) matrixModule {
	t.Helper()
	tk := hsmtest.NewToken(t)
	shim := vendorshim.New(t, p, tk.Module, tk.Label)
	return matrixModule{module: shim.Path, token: shim.TokenLabel(tk.Label), tk: tk,
		ivMode: p.IVMode, wrongIVMode: p.WrongIVMode, extra: fmt.Sprintf("\t\t\tprivate_keys %t\n", p.PrivateKeys)}
}

func TestVendorMatrixThroughCaddy(t *testing.T) {
	hsmtest.Require(t)
	for _, p := range vendorshim.All {
		t.Run(p.Name, func(t *testing.T) { runMatrix(t, vendorColumn(t, p)) })
	}
	// NSS softokn, a real module, configured through init_args.
	t.Run("nss-softokn", func(t *testing.T) {
		tk := hsmtest.NSS(t)
		// The NSS database lives as long as the process: the keys the
		// matrix makes go afterwards, so that another run (go test
		// -count=N) can make them again.
		t.Cleanup(func() {
			if !t.Failed() {
				for _, label := range []string{"demo-key", "demo-encrypt-only"} {
					tk.DestroyKeys(t, label)
				}
			}
		})
		runMatrix(t, matrixModule{module: tk.Module, token: tk.Label, tk: tk, ivMode: "caller", wrongIVMode: "hsm",
			extra: fmt.Sprintf("\t\t\tinit_args %q\n", tk.InitArgs)})
	})
}

func runMatrix(t *testing.T, m matrixModule) {
	dir := t.TempDir()
	cred, err := sigv4auth.NewCredential()
	if err != nil {
		t.Fatal(err)
	}
	secretFile := writeFile(t, dir, "secret", cred.SecretAccessKey+"\n")
	t.Setenv("XKSCMD_TEST_SECRET", cred.SecretAccessKey)
	t.Setenv("XKSCMD_TEST_PIN_MAIN", m.tk.PIN)
	cacert, key := testcert.Localhost(t, dir)
	caddy := proxytest.New(t)
	caddy.Trust(cacert)
	config := func(iv string) string {
		backend := proxytest.Backend{Name: "main", Module: m.module, Token: m.token, PINEnv: "XKSCMD_TEST_PIN_MAIN", IV: iv, Extra: m.extra}
		return caddy.Global("\thsm {\n"+backend.Block()+"\t}\n") + fmt.Sprintf(`
localhost:%d {
	tls %s %s
	xks {
		key_store /matrix {
			hsm main
			region %s
			credential %s {env.XKSCMD_TEST_SECRET}
			keys demo-key demo-encrypt-only
%s		}
	}
}
`, caddy.HTTPSPort, cacert, key, region, cred.AccessKeyID, proxytest.KeyStoreDefaults(""))
	}
	// The keys are made the way an operator makes them, through the module.
	configFile := writeFile(t, dir, "Caddyfile", config("auto"))
	for label, usage := range map[string]string{"demo-key": "encrypt,decrypt", "demo-encrypt-only": "encrypt"} {
		if out, err := runCommand(t, "keygen", "--config", configFile, "--adapter", "caddyfile", "--label", label, "--usage", usage); err != nil {
			t.Fatalf("keygen %s: %v\n%s", label, err, out)
		}
	}

	err = caddy.TryLoad(config(m.wrongIVMode))
	if err == nil || !strings.Contains(err.Error(), "iv mode "+m.wrongIVMode+" does not work") ||
		!strings.Contains(err.Error(), "the self-test passes with iv "+m.ivMode) {
		t.Fatalf("a config with iv %s: %v; want it refused, naming iv %s", m.wrongIVMode, err, m.ivMode)
	}

	url := caddy.Origin() + "/matrix/kms/xks/v1"
	caddy.Ready = unsignedHealthAnswers(caddy.Client, url)
	caddy.Load(config("auto"))
	if want := fmt.Sprintf(`"iv_mode":%q,"iv_mode_detected":true`, m.ivMode); !strings.Contains(readFile(t, caddy.LogFile), want) {
		t.Fatalf("the log has no %s", want)
	}

	out, err := runCommand(t, "check", "--access-key-id", cred.AccessKeyID, "--secret-file", secretFile, "--cacert", cacert,
		"--max-p99", "1m", "--key", "demo-key", "--encrypt-only-key", "demo-encrypt-only", "--samples", "10", url)
	if err != nil {
		t.Fatalf("check failed: %v\n%s", err, out)
	}
	rows := parseTable(t, out)
	for _, name := range checkRows {
		if rows[name].result != "PASS" {
			t.Errorf("row %q: %+v, want PASS", name, rows[name])
		}
	}
	if t.Failed() {
		t.Logf("caddy xks check:\n%s", out)
	}
}

// unsignedHealthAnswers is a readiness probe: the key store answers an
// unsigned call in XKS terms once its handler runs.
func unsignedHealthAnswers(client *http.Client, url string) func() error {
	return func() error {
		resp, err := client.Post(url+"/health", "application/json", strings.NewReader("{}"))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(string(body), "AuthenticationFailedException") {
			return fmt.Errorf("unsigned health: %d %s", resp.StatusCode, body)
		}
		return nil
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// TestCaddyfileExampleServesNShield runs Caddyfile.example itself against
// the nshield personality, changing only the module path and the {$…}
// values the demo sets (scripts/demo.sh), never the production values of
// the token ("loadshared accelerator"), the iv mode (hsm) or private_keys
// (false). Its pin line logs in through CKNFAST_FAKE_ACCELERATOR_LOGIN, as
// its comment says. The keys are made by `caddy xks keygen` and `caddy xks
// ekm-keygen` with the same file; the whole XKS conformance check passes
// over the site's TLS, and the EKM site of the same proxy wraps and unwraps
// over mutual TLS with the example's client subject.
func TestCaddyfileExampleServesNShield(t *testing.T) {
	hsmtest.Require(t)
	exampleFile := filepath.Join("..", "Caddyfile.example")
	example, err := os.ReadFile(exampleFile)
	if err != nil {
		t.Fatal(err)
	}
	tk := hsmtest.NewToken(t)
	shim := vendorshim.New(t, vendorshim.NShield, tk.Module, tk.Label)
	caddy := proxytest.New(t)
	dir := t.TempDir()
	akid := make([]string, 2)
	for i := range akid {
		cred, err := sigv4auth.NewCredential()
		if err != nil {
			t.Fatal(err)
		}
		akid[i] = cred.AccessKeyID
		file := writeFile(t, dir, fmt.Sprintf("sigv4-secret-%d", i+1), cred.SecretAccessKey+"\n")
		t.Setenv(fmt.Sprintf("XKS_AKID_%d", i+1), cred.AccessKeyID)
		t.Setenv(fmt.Sprintf("XKS_SECRET_FILE_%d", i+1), file)
	}
	const uriPath = "/nshield/kms/xks/v1"
	clientCA := testcert.NewCA(t, dir, "Managed HSM client root (test)")
	for k, v := range map[string]string{
		"XKS_HSM_MODULE":       shim.Path,
		"XKS_ADMIN":            "unix/" + caddy.AdminSocket,
		"XKS_HTTPS_PORT":       fmt.Sprint(caddy.HTTPSPort),
		"XKS_HTTP_PORT":        fmt.Sprint(caddy.HTTPPort),
		"XKS_READY_PORT":       fmt.Sprint(proxytest.FreePort(t)),
		"XKS_SHUTDOWN_DELAY":   "0s",
		"XKS_STORAGE":          caddy.Storage,
		"XKS_HSM_PIN_FILE":     writeFile(t, dir, "pin", "discarded-by-the-accelerator-slot\n"),
		"XKS_FQDN":             "localhost",
		"XKS_TLS":              "internal",
		"XKS_URI_PATH":         uriPath,
		"XKS_REGION":           region,
		"XKS_FLEET_SIZE":       "1",
		"XKS_HSM_CALL_TIMEOUT": proxytest.CallTimeout,
		"XKS_HSM_SESSION_WAIT": proxytest.SessionWait,
		"XKS_DEADLINE":         proxytest.Deadline,
		"EKM_FQDN":             "ekm.localhost",
		"EKM_CLIENT_ROOTS":     clientCA.File,
	} {
		t.Setenv(k, v)
	}
	for _, k := range []string{"XKS_HSM_TOKEN", "XKS_HSM_IV", "XKS_HSM_PRIVATE_KEYS", "XKS_KEYS", "EKM_PATH_PREFIX", "EKM_CLIENT_SUBJECT", "EKM_KEYS"} {
		if _, set := os.LookupEnv(k); set {
			t.Setenv(k, "")
			if err := os.Unsetenv(k); err != nil {
				t.Fatal(err)
			}
		}
	}
	out, err := runCommand(t, "keygen", "--config", exampleFile, "--adapter", "caddyfile", "--backend", "primary", "--label", "xks-key-1")
	if err != nil {
		t.Fatalf("keygen with Caddyfile.example: %v\n%s", err, out)
	}
	if got := boolAttribute(t, tk, "xks-key-1", 0x2 /* CKA_PRIVATE */); got {
		t.Fatal("keygen made a private key on the accelerator slot")
	}
	if out, err := runCommand(t, "ekm-keygen", "--config", exampleFile, "--adapter", "caddyfile", "--backend", "primary",
		"--name", "ekm-kek-1", "--type", "aes"); err != nil {
		t.Fatalf("ekm-keygen with Caddyfile.example: %v\n%s", err, out)
	}

	// Caddy's local CA writes its root when the config starts; the probe
	// trusts it from then on.
	root := filepath.Join(caddy.Storage, "pki", "authorities", "local", "root.crt")
	url := "https://localhost:" + fmt.Sprint(caddy.HTTPSPort) + uriPath
	trustingRoot := func() (*http.Client, error) {
		pem, err := os.ReadFile(root)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		client := *caddy.Client
		transport := caddy.Client.Transport.(*http.Transport).Clone()
		transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		client.Transport = transport
		return &client, nil
	}
	caddy.Ready = func() error {
		client, err := trustingRoot()
		if err != nil {
			return err
		}
		defer client.CloseIdleConnections()
		return unsignedHealthAnswers(client, url)()
	}
	// Loading is the proof that the start-up self-test passed with iv hsm,
	// which the example sets.
	caddy.Load(string(example))

	// The example offers KMS's protocols only: no HTTP/3, whose 0-RTT
	// requests can be replayed.
	client, err := trustingRoot()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := client.Post(url+"/health", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	client.CloseIdleConnections()
	if alt := resp.Header.Get("Alt-Svc"); alt != "" || resp.ProtoMajor != 2 {
		t.Errorf("Caddyfile.example answers over %s with Alt-Svc %q; want HTTP/2 and no HTTP/3 offered", resp.Proto, alt)
	}

	ekmRoundTrip(t, caddy, root, clientCA.Client(t, "contoso.managedhsmclient.azure.net", x509.ExtKeyUsageClientAuth))

	for i, n := range []string{"1", "2"} {
		out, err := runCommand(t, "check", "--access-key-id", akid[i], "--secret-file", filepath.Join(dir, "sigv4-secret-"+n),
			"--cacert", root, "--region", region, "--key", "xks-key-1", "--max-p99", "1m", "--samples", "10", "https://localhost:"+fmt.Sprint(caddy.HTTPSPort)+uriPath)
		if err != nil {
			t.Fatalf("check with credential %s: %v\n%s", n, err, out)
		}
		rows := parseTable(t, out)
		for _, name := range checkRows {
			if name == "encrypt-only CDIV" {
				continue
			}
			if rows[name].result != "PASS" {
				t.Errorf("credential %s, row %q: %+v, want PASS", n, name, rows[name])
			}
		}
	}
}

// ekmRoundTrip wraps and unwraps a data key with Caddyfile.example's EKM key
// store, /contoso on ekm.localhost, over mutual TLS 1.3 with cert.
func ekmRoundTrip(t *testing.T, caddy *proxytest.Proxy, root string, cert tls.Certificate) {
	t.Helper()
	pem, err := os.ReadFile(root)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	client := *caddy.Client
	transport := caddy.Client.Transport.(*http.Transport).Clone()
	transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}}
	client.Transport = transport
	defer transport.CloseIdleConnections()
	call := func(op, body string) string {
		url := fmt.Sprintf("https://ekm.localhost:%d/contoso/ekm-kek-1/%s?api-version=%s", caddy.HTTPSPort, op, ekmapi.APIVersion)
		resp, err := client.Post(url, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatalf("EKM %s: %v", op, err)
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("EKM %s: %d %s", op, resp.StatusCode, out)
		}
		var res ekmapi.WrapResult
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("EKM %s: %s", op, out)
		}
		return ekmapi.EncodeValue(res.Value)
	}
	dek := ekmapi.EncodeValue([]byte("a 32-byte data key, for the test"))
	ctx := `"request_context":{"correlation_id":"example-1","pool_name":"contoso"}`
	wrapped := call("wrapkey", `{`+ctx+`,"alg":"A256KW","value":"`+dek+`"}`)
	if back := call("unwrapkey", `{`+ctx+`,"alg":"A256KW","value":"`+wrapped+`"}`); back != dek {
		t.Fatal("the example's EKM key store unwrapped another key")
	}
}
