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
	"net"
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
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
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
	*proxytest.Instance
	cmd *exec.Cmd
	// dataDir is the process's HOME and data directory, where Caddy keeps
	// its instance id; the instance's own directory when empty.
	dataDir string
}

// startInstance runs a proxy process serving localhost on a port of its
// own, with its certificates in the shared storage directory.
func startInstance(t *testing.T, tk hsmtest.Token, storage string, c credential) *instance {
	t.Helper()
	in := &instance{Instance: proxytest.NewInstance(t)}
	in.Storage = storage
	in.start(t, tk, c, "", "")
	return in
}

// start runs the instance's process, with xksExtra in the xks block and
// ksExtra in the key store's. The instance's directory is its HOME and data
// directory, so that it keeps its instance id across restarts.
func (in *instance) start(t *testing.T, tk hsmtest.Token, c credential, xksExtra, ksExtra string) {
	t.Helper()
	hsm := proxytest.Backend{Name: "main", Module: tk.Module, Token: tk.Label, PINEnv: "XKS_FLEET_PIN"}
	cfg := in.Global("\thsm {\n"+hsm.Block()+"\t}\n") + fmt.Sprintf(`
localhost:%[1]d {
	tls internal
	xks {
%[6]s		key_store /fleet {
			hsm main
			region %[2]s
			credential %[3]s {env.XKS_FLEET_SECRET}
			keys %[4]s
			fleet_size 2
%[5]s%[7]s		}
	}
}
`, in.HTTPSPort, region, c.akid, keyBoth, proxytest.KeyStoreDefaults(""), xksExtra, ksExtra)
	env := []string{"XKS_FLEET_PIN=" + tk.PIN, "XKS_FLEET_SECRET=" + c.secret}
	if in.dataDir != "" {
		env = append(env, "HOME="+in.dataDir, "XDG_DATA_HOME="+in.dataDir)
	}
	in.cmd = caddyCommand(t, in.Instance, cfg, tk, env...)
	if err := in.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	cmd := in.cmd
	t.Cleanup(func() {
		if cmd.ProcessState != nil {
			return // stopped by the test
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
		}
	})
}

// caddyCommand writes cfg as the instance's Caddyfile and returns, not
// started, this test binary run as `caddy run` on it: with tk's SoftHSM2
// configuration, the instance's directory as its HOME and data directory
// (so that it keeps its instance id across restarts), and env added to the
// test's environment.
func caddyCommand(t *testing.T, in *proxytest.Instance, cfg string, tk hsmtest.Token, env ...string) *exec.Cmd {
	t.Helper()
	config := filepath.Join(in.Dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// Not os.Args[0]: it may be a relative path.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), runAsCaddy+"="+config, "SOFTHSM2_CONF="+tk.Conf, "HOME="+in.Dir, "XDG_DATA_HOME="+in.Dir, "XDG_CONFIG_HOME="+in.Dir)
	cmd.Env = append(cmd.Env, env...)
	return cmd
}

// stop ends the instance's process with sig (SIGTERM: a clean stop, as
// systemctl stop does; SIGKILL: a crash) and waits for it to exit.
func (in *instance) stop(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := in.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	_ = in.cmd.Wait()
}

// TestFleetSharesCertificateStorage runs two proxy processes behind one
// name, as behind a load balancer: they share Caddy's certificate storage
// (a file_system directory here; any storage module in production) and the
// HSM token, serve the same certificate and decrypt each other's
// ciphertexts.
func TestFleetSharesCertificateStorage(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, keyBoth)
	storage := t.TempDir()
	c := newCredential(t)

	a := startInstance(t, tk, storage, c)
	root := filepath.Join(storage, "pki", "authorities", "local", "root.crt")
	leafA := waitServing(t, a, root, c)
	b := startInstance(t, tk, storage, c)
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
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if in.cmd.ProcessState != nil {
			t.Fatalf("instance on port %d exited", in.HTTPSPort)
		}
		if _, err := os.Stat(rootFile); err == nil {
			r, leaf, err := fleetTry(in, rootFile, c, "/health", healthBody)
			if err == nil && r.status == http.StatusOK && strings.Contains(r.raw, `"xksProxyFleetSize":2`) {
				return leaf
			}
		}
		if time.Now().After(deadline) {
			logs, _ := os.ReadFile(in.LogFile)
			t.Fatalf("instance on port %d does not serve; its log:\n%s", in.HTTPSPort, logs)
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
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(context.Background(), http.MethodPost,
		in.Origin()+"/fleet/kms/xks/v1"+path, strings.NewReader(body))
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

// TestFleetSumsKeyUsage runs two proxy processes sharing Caddy's storage:
// each counts its own Encrypts, writes them every usage_flush_interval, and
// reports the fleet's sum; the counts survive a clean restart of each, and
// a crash is counted as a whole flush interval at KMS's quota.
func TestFleetSumsKeyUsage(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, keyBoth)
	storage := t.TempDir()
	c := newCredential(t)
	root := filepath.Join(storage, "pki", "authorities", "local", "root.crt")
	const xks = "\t\tusage_flush_interval 100ms\n"
	start := func(in *instance) {
		in.start(t, tk, c, xks, "")
		waitServing(t, in, root, c)
	}
	var a, b instance
	for _, in := range []*instance{&a, &b} {
		in.Instance = proxytest.NewInstance(t)
		in.Storage = storage
		start(in)
	}
	encrypt := func(in *instance, n int) {
		for range n {
			if r := fleetCall(t, in, root, c, "/keys/"+keyBoth+"/encrypt", encryptBody([]byte("counted"), nil, false)); r.status != http.StatusOK {
				t.Fatalf("encrypt: %d %s", r.status, r.raw)
			}
		}
	}
	encrypt(&a, 3)
	encrypt(&b, 4)
	waitUsage(t, &a, 7)
	waitUsage(t, &b, 7)

	a.stop(t, syscall.SIGTERM)
	start(&a)
	waitUsage(t, &a, 7)
	b.stop(t, syscall.SIGTERM)
	start(&b)
	waitUsage(t, &b, 7)
	encrypt(&a, 2)
	waitUsage(t, &b, 9)

	// A crash: b's last record was not written at a stop, so b counts the
	// most one interval can have held (0.1 s at 1,800/s) as used.
	b.stop(t, syscall.SIGKILL)
	start(&b)
	waitUsage(t, &b, 9+180)
	waitUsage(t, &a, 9+180)
}

// TestFleetSharingADataDirectoryCountsExactly: two proxy processes that
// share a data directory, and so Caddy's instance id (as instances cloned
// from one image do), each count their own Encrypts, and both report the
// fleet's exact count, with nothing counted as lost.
func TestFleetSharingADataDirectoryCountsExactly(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, keyBoth)
	storage := t.TempDir()
	data := t.TempDir()
	c := newCredential(t)
	root := filepath.Join(storage, "pki", "authorities", "local", "root.crt")
	var a, b instance
	for _, in := range []*instance{&a, &b} {
		in.Instance = proxytest.NewInstance(t)
		in.Storage, in.dataDir = storage, data
		in.start(t, tk, c, "\t\tusage_flush_interval 100ms\n", "")
		waitServing(t, in, root, c)
	}
	for in, n := range map[*instance]int{&a: 3, &b: 4} {
		for range n {
			if r := fleetCall(t, in, root, c, "/keys/"+keyBoth+"/encrypt", encryptBody([]byte("counted"), nil, false)); r.status != http.StatusOK {
				t.Fatalf("encrypt: %d %s", r.status, r.raw)
			}
		}
	}
	waitUsage(t, &a, 7)
	waitUsage(t, &b, 7)
	// Caddy's file storage writes through temporary files beside the
	// records: only the .json files are records.
	records, err := filepath.Glob(filepath.Join(storage, "xks", "usage", keyBoth, "*.json"))
	if err != nil || len(records) != 2 {
		t.Fatalf("usage records %v (%v), want one per process", records, err)
	}
}

// instanceMetrics fetches an instance's metrics from its admin socket.
func instanceMetrics(t *testing.T, in *instance) string {
	t.Helper()
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", in.AdminSocket)
		},
	}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://admin/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

// waitUsage waits until the instance reports the fleet's count of Encrypts
// with keyBoth as want; the counts of the others arrive at their next write.
func waitUsage(t *testing.T, in *instance, want float64) {
	t.Helper()
	sample := `caddy_xks_key_version_encryptions{key="` + keyBoth + `",key_store="/fleet/kms/xks/v1",label="` + keyBoth + `",version="1"}`
	deadline := time.Now().Add(2 * time.Minute)
	for {
		m := instanceMetrics(t, in)
		got := proxytest.MetricValue(t, m, sample)
		if got == want {
			return
		}
		if got > want || time.Now().After(deadline) {
			t.Fatalf("instance on port %d reports %v encryptions, want %v:\n%s", in.HTTPSPort, got, want, grepLines(m, "caddy_xks_key_"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
