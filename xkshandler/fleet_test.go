package xkshandler_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
)

// runAsCaddy is set in the environment of a child process of this test
// binary that must run as `caddy run` instead of running tests: the binary
// already holds Caddy and every module of the plugin.
const runAsCaddy = "XKS_TEST_RUN_AS_CADDY"

func init() {
	if config := os.Getenv(runAsCaddy); config != "" {
		os.Args = []string{"caddy", "run", "--config", config, "--adapter", "caddyfile"}
		caddycmd.Main()
		os.Exit(0)
	}
}

// instance is one proxy process of a fleet.
type instance struct {
	port string
	cmd  *exec.Cmd
	log  string
}

// startInstance runs a proxy process serving localhost:port with its
// certificates in the shared storage directory.
func startInstance(t *testing.T, tk hsmtest.Token, dir, storage, port string, c credential) *instance {
	t.Helper()
	in := &instance{port: port, log: filepath.Join(dir, "caddy-"+port+".log")}
	config := filepath.Join(dir, "Caddyfile-"+port)
	cfg := fmt.Sprintf(`{
	admin unix/%[1]s/admin-%[2]s.sock
	persist_config off
	skip_install_trust
	https_port %[2]s
	http_port 1%[2]s
	storage file_system %[3]s
	log {
		output file %[4]s
		format json
	}
	hsm {
		pkcs11 main {
			module %[5]s
			token %[6]s
			pin {env.XKS_FLEET_PIN}
			iv caller
		}
	}
}

localhost:%[2]s {
	tls internal
	xks {
		key_store /fleet {
			hsm main
			region %[7]s
			credential %[8]s {env.XKS_FLEET_SECRET}
			keys %[9]s
			fleet_size 2
		}
	}
}
`, dir, port, storage, in.log, tk.Module, tk.Label, region, c.akid, keyBoth)
	if err := os.WriteFile(config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// Not os.Args[0]: caddytest rewrites os.Args when it starts Caddy.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	in.cmd = exec.Command(self)
	in.cmd.Env = append(os.Environ(), runAsCaddy+"="+config, "SOFTHSM2_CONF="+tk.Conf,
		"XKS_FLEET_PIN="+tk.PIN, "XKS_FLEET_SECRET="+c.secret, "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	if err := in.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = in.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = in.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = in.cmd.Process.Kill()
		}
	})
	return in
}

// TestFleetSharesCertificateStorage runs two proxy processes behind one
// name, as behind a load balancer: they share Caddy's certificate storage
// (a file_system directory here; any storage module in production) and the
// HSM token, serve the same certificate and decrypt each other's
// ciphertexts.
func TestFleetSharesCertificateStorage(t *testing.T) {
	if !hsmtest.Available() {
		t.Skip("SoftHSM2 is not installed")
	}
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, keyBoth)
	dir, storage := t.TempDir(), t.TempDir()
	c := newCredential(t)

	a := startInstance(t, tk, dir, storage, "9461", c)
	root := filepath.Join(storage, "pki", "authorities", "local", "root.crt")
	leafA := waitServing(t, a, root, c)
	b := startInstance(t, tk, dir, storage, "9462", c)
	leafB := waitServing(t, b, root, c)
	if !bytes.Equal(leafA, leafB) {
		t.Error("the second instance serves another certificate: it did not take the first one's from the shared storage")
	}

	pt := random(t, 32)
	enc := fleetCall(t, a, root, c, "/keys/"+keyBoth+"/encrypt", encryptBody(pt, []byte("fleet"), false))
	if enc.status != http.StatusOK {
		t.Fatalf("encrypt on the first instance: %d %s", enc.status, enc.raw)
	}
	s := sealed{enc.bytes(t, "ciphertext"), enc.bytes(t, "initializationVector"), enc.bytes(t, "authenticationTag"), nil}
	dec := fleetCall(t, b, root, c, "/keys/"+keyBoth+"/decrypt", decryptBody(s, []byte("fleet")))
	if dec.status != http.StatusOK || !bytes.Equal(dec.bytes(t, "plaintext"), pt) {
		t.Fatalf("decrypt on the second instance: %d %s", dec.status, dec.raw)
	}
}

// waitServing waits until the instance answers a signed health check over
// TLS verified against the shared local CA, and returns the SHA-256 of the
// leaf certificate it served.
func waitServing(t *testing.T, in *instance, rootFile string, c credential) []byte {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if in.cmd.ProcessState != nil {
			t.Fatalf("instance %s exited", in.port)
		}
		if _, err := os.Stat(rootFile); err == nil {
			r, leaf, err := fleetTry(in, rootFile, c, "/health", healthBody)
			if err == nil && r.status == http.StatusOK && strings.Contains(r.raw, `"xksProxyFleetSize":2`) {
				return leaf
			}
		}
		if time.Now().After(deadline) {
			logs, _ := os.ReadFile(in.log)
			t.Fatalf("instance %s does not serve; its log:\n%s", in.port, logs)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func fleetCall(t *testing.T, in *instance, rootFile string, c credential, path, body string) response {
	t.Helper()
	r, _, err := fleetTry(in, rootFile, c, path, body)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// fleetTry sends one signed call to an instance and returns the answer and
// the served leaf certificate's SHA-256.
func fleetTry(in *instance, rootFile string, c credential, path, body string) (response, []byte, error) {
	pem, err := os.ReadFile(rootFile)
	if err != nil {
		return response{}, nil, err
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(context.Background(), http.MethodPost,
		"https://localhost:"+in.port+"/fleet/kms/xks/v1"+path, strings.NewReader(body))
	if err != nil {
		return response{}, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if err := signRequest(req, c, body, region, time.Now()); err != nil {
		return response{}, nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return response{}, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, nil, err
	}
	r := response{status: resp.StatusCode, raw: string(raw)}
	if err := json.Unmarshal(raw, &r.body); err != nil {
		return r, nil, err
	}
	sum := sha256.Sum256(resp.TLS.PeerCertificates[0].Raw)
	return r, sum[:], nil
}
