package fleet_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/pebbletest"
	"github.com/caddy-xks/caddy-xks/internal/testcert"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
)

// caddyBinEnv names, in the isolated test's environment, the caddy binary
// the proxies run: bin/caddy, built from xcaddy.json by the parent test
// (the isolated one has no network to fetch modules with).
const caddyBinEnv = "XKS_FLEET_CADDY"

// The fleet's key store.
const (
	uriPath = "/fleet/kms/xks/v1"
	region  = "eu-west-1"
	keyID   = "fleet-key"
)

// validity is the life of the certificates Pebble issues. CertMagic renews
// one renewAfter (70 s) after its issuance (renewal_window_ratio), and it
// stays valid for minutes after that: longer than T5's storage outage plus
// CertMagic's minute of back-off after the attempt the outage fails, so no
// instance ever serves an expired certificate. (With 90 s, 20 s after the
// renewal's moment, a slow run of T5 had new connections refused with
// "certificate has expired" before the renewal came.)
const validity = 10 * time.Minute

// settle bounds each wait for a condition: far beyond what a loaded 2-core
// machine needs, far below the test's timeout.
const settle = 2 * time.Minute

func TestFleet(t *testing.T) {
	parent := os.Getenv(isolatedEnv)
	if parent == "" {
		runIsolated(t)
		return
	}
	assertIsolated(t, parent)
	run(t, "ip", "link", "set", "lo", "up")
	f := newFleet(t)
	start := time.Now()
	// In this order: each needs the fleet its predecessor leaves; T2 and
	// T5 wait for the certificate's renewal, which comes renewAfter after
	// its issuance (T1b's, then T2's).
	for _, st := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"T1", f.oneOrderForTheFleet},
		{"T1b", f.holderKilledMidOrder},
		{"T3", f.instanceLost},
		{"T4", f.rollingChange},
		{"T2", f.renewalPropagates},
		{"T6", f.crashedLockTakenOver},
		{"T7", f.fleetCountsKeyUsage},
		{"T5", f.storageOutage},
	} {
		if !t.Run(st.name, st.run) {
			break
		}
	}
	t.Logf("the fleet's properties took %s", time.Since(start).Round(time.Second))
}

// fleet is everything the test runs.
type fleet struct {
	t       *testing.T
	net     *network
	dir     string
	caddy   string
	token   hsmtest.Token
	creds   [2]sigv4auth.Credential
	redis   *redisServer
	lb      *balancer
	pebble  *pebbletest.Server
	proxies [3]*proxy
	config  string // the proxies' Caddyfile
	// ekmRoots is the CA file the example's EKM key store trusts.
	ekmRoots string
}

// newFleet sets up the hosts, the HSM token and its key, Redis, Pebble and
// HAProxy; the proxies are started by the subtests.
func newFleet(t *testing.T) *fleet {
	caddy := os.Getenv(caddyBinEnv)
	if caddy == "" {
		t.Fatalf("%s is not set", caddyBinEnv)
	}
	f := &fleet{t: t, caddy: caddy, dir: shortTempDir(t)}
	f.net = newNetwork(t)
	f.token = hsmtest.NewToken(t)
	f.token.CreateKey(t, keyID)
	for i := range f.creds {
		c, err := sigv4auth.NewCredential()
		if err != nil {
			t.Fatal(err)
		}
		f.creds[i] = c
		write(t, filepath.Join(f.dir, fmt.Sprintf("sigv4-secret-%d", i+1)), c.SecretAccessKey)
	}
	write(t, filepath.Join(f.dir, "hsm-pin"), f.token.PIN)
	f.ekmRoots, _, _ = testcert.ClientPKI(t, f.dir, "fleet.managedhsmclient.test")
	f.redis = startRedis(t, f.net, f.dir)
	f.pebble = pebbletest.Start(t, pebbletest.Options{
		Listen: net.JoinHostPort(harnessAddr, strconv.Itoa(pebblePort)), Answer: lbAddr,
		HTTPPort: 80, TLSPort: 443, Validity: validity, NoARI: true,
	})
	f.config = f.proxyConfig()
	for i := range f.proxies {
		f.proxies[i] = f.newProxy(i)
	}
	f.lb = startBalancer(t, f.net, f.dir, f.proxies[:])
	return f
}

// shortTempDir is a temporary directory with a short path: unix socket
// paths are limited to 108 bytes.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "xks-fleet-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// write writes a secret file.
func write(t *testing.T, file, content string) {
	t.Helper()
	if err := os.WriteFile(file, []byte(content), 0o600); err != nil { //nolint:gosec // a file of the test's own directory
		t.Fatal(err)
	}
}

// proxyConfig is Caddyfile.example with its storage line replaced by
// fleet/storage-redis.caddyfile, as docs/operations.md says, and Pebble as
// the ACME CA.
func (f *fleet) proxyConfig() string {
	t := f.t
	example, err := os.ReadFile(filepath.Join("..", "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}
	storage, err := os.ReadFile("storage-redis.caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	const storageLine = "\tstorage file_system {$XKS_STORAGE:/var/lib/caddy}\n"
	if strings.Count(string(example), storageLine) != 1 {
		t.Fatalf("Caddyfile.example has no line %q to replace with fleet/storage-redis.caddyfile, as docs/operations.md says", storageLine)
	}
	cfg := strings.Replace(string(example), storageLine, string(storage), 1)
	// The test's CA, and its renewal checks every second (T2).
	acme := fmt.Sprintf("{\n\tacme_ca https://%s:%d/dir\n\tacme_ca_root %s\n\trenew_interval 1s\n\trenewal_window_ratio %v\n",
		harnessAddr, pebblePort, f.pebble.TLSRoot, renewalRatio)
	i := strings.Index(cfg, "\n{\n")
	if i < 0 {
		t.Fatal("Caddyfile.example has no global options block")
	}
	cfg = cfg[:i+1] + acme + cfg[i+3:]
	file := filepath.Join(f.dir, "Caddyfile")
	write(t, file, cfg)
	return file
}

// proxy is one instance of the fleet.
type proxy struct {
	name, host, addr, dir string
	env                   []string
	proc                  *process
	// startFailures counts the starts that failed and were tried again.
	startFailures int
}

func (f *fleet) newProxy(i int) *proxy {
	p := &proxy{name: fmt.Sprintf("p%d", i+1), addr: proxyAddrs[i]}
	p.host = p.name
	p.dir = filepath.Join(f.dir, p.name)
	if err := os.Mkdir(p.dir, 0o700); err != nil {
		f.t.Fatal(err)
	}
	p.env = append(os.Environ(),
		"HOME="+p.dir, "XDG_DATA_HOME="+p.dir, "XDG_CONFIG_HOME="+p.dir,
		"SOFTHSM2_CONF="+f.copyToken(p.dir),
		"XKS_ADMIN=unix/"+filepath.Join(p.dir, "admin.sock"),
		"XKS_HTTPS_PORT=443", "XKS_HTTP_PORT=80", "XKS_READY_PORT="+strconv.Itoa(readyPort),
		"XKS_SHUTDOWN_DELAY=2s", "XKS_USAGE_FLUSH_INTERVAL=1s",
		"XKS_HSM_MODULE="+f.token.Module, "XKS_HSM_TOKEN="+f.token.Label, "XKS_HSM_PIN_FILE="+filepath.Join(f.dir, "hsm-pin"),
		"XKS_HSM_IV=caller", "XKS_HSM_PRIVATE_KEYS=true",
		// Seconds, not the production 200 ms: the test's machine is busy.
		"XKS_HSM_CALL_TIMEOUT=30s", "XKS_HSM_SESSION_WAIT=10s", "XKS_DEADLINE=30s",
		"XKS_FQDN="+fleetFQDN, "XKS_TLS=security@example.com",
		"XKS_URI_PATH="+uriPath, "XKS_REGION="+region, "XKS_KEYS="+keyID, "XKS_FLEET_SIZE=3",
		"XKS_AKID_1="+f.creds[0].AccessKeyID, "XKS_SECRET_FILE_1="+filepath.Join(f.dir, "sigv4-secret-1"),
		"XKS_AKID_2="+f.creds[1].AccessKeyID, "XKS_SECRET_FILE_2="+filepath.Join(f.dir, "sigv4-secret-2"),
		// The example's Azure EKM site: served, with its certificate, and
		// not called by the test.
		"EKM_FQDN="+ekmFQDN, "EKM_PATH_PREFIX=/fleet-ekm", "EKM_CLIENT_SUBJECT=fleet.managedhsmclient.test",
		"EKM_CLIENT_ROOTS="+f.ekmRoots, "EKM_KEYS="+keyID,
	)
	p.env = append(p.env, f.redis.clientEnv()...)
	return p
}

// copyToken gives an instance its own copy of the SoftHSM2 token, as each
// host of a fleet has its own HSM holding the same keys, and returns its
// SOFTHSM2_CONF. (Processes sharing one SoftHSM2 token directory can see
// it half written while another logs in, and find no token.)
func (f *fleet) copyToken(dir string) string {
	t := f.t
	conf, err := os.ReadFile(f.token.Conf)
	if err != nil {
		t.Fatal(err)
	}
	var tokens string
	for line := range strings.SplitSeq(string(conf), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == "directories.tokendir" {
			tokens = strings.TrimSpace(v)
		}
	}
	if tokens == "" {
		t.Fatalf("%s names no token directory", f.token.Conf)
	}
	own := filepath.Join(dir, "tokens")
	if err := os.CopyFS(own, os.DirFS(tokens)); err != nil {
		t.Fatalf("copying the token: %v", err)
	}
	file := filepath.Join(dir, "softhsm2.conf")
	write(t, file, strings.Replace(string(conf), tokens, own, 1))
	return file
}

// start runs the proxy, until it is stopped or the whole test ends (not
// the subtest that starts it).
func (f *fleet) start(t *testing.T, p *proxy) {
	t.Helper()
	p.proc = f.net.start(f.t, p.host, p.dir, "caddy", p.env, f.caddy, "run", "--config", f.config, "--adapter", "caddyfile")
}

// leaf is the SHA-256 of the certificate p serves for the fleet's name,
// verified against Pebble's root, or an error.
func (f *fleet) leaf(p *proxy) (string, error) {
	roots := x509.NewCertPool()
	roots.AddCert(f.pebble.Root())
	d := &net.Dialer{Timeout: 10 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", net.JoinHostPort(p.addr, "443"), &tls.Config{ServerName: fleetFQDN, RootCAs: roots, MinVersion: tls.VersionTLS12})
	if err != nil {
		return "", err
	}
	defer c.Close()
	sum := sha256.Sum256(c.ConnectionState().PeerCertificates[0].Raw)
	return hex.EncodeToString(sum[:8]), nil
}

// waitServing waits until every proxy serves a certificate that passes
// check, and returns their leaves.
func (f *fleet) waitServing(t *testing.T, check func(leaf string) bool, proxies ...*proxy) map[string]string {
	t.Helper()
	leaves := map[string]string{}
	deadline := time.Now().Add(settle)
	for _, p := range proxies {
		for {
			leaf, err := f.leaf(p)
			if err == nil && check(leaf) {
				leaves[p.name] = leaf
				break
			}
			if !p.proc.running() {
				// As systemd's Restart=on-failure would: an instance whose
				// config fails to load at start exits, and is started
				// again. (Caddy's local CA, which skip_install_trust
				// configures, is written to the shared storage as a
				// certificate, then its key: an instance that starts
				// between the two fails.)
				if p.startFailures >= 2 {
					t.Fatalf("%s exited:\n%s", p.name, tail(p.proc.output(), 40))
				}
				p.startFailures++
				t.Logf("%s exited at start, and is started again: %s", p.name, lastError(p.proc.output()))
				f.start(t, p)
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s serves no acceptable certificate for %s (last: %s %v); its log:\n%s", p.name, fleetFQDN, leaf, err, tail(p.proc.output(), 40))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return leaves
}

// certNames are the names Caddyfile.example obtains certificates for.
var certNames = []string{fleetFQDN, ekmFQDN}

// issued counts the certificates for name that p logged obtaining or
// renewing since.
func (f *fleet) issued(p *proxy, name string, since time.Time) int {
	n := 0
	for _, msg := range []string{"certificate obtained successfully", "certificate renewed successfully"} {
		for _, l := range logLines(p, msg) {
			if l["identifier"] == name {
				n += countSince([]map[string]any{l}, since)
			}
		}
	}
	return n
}

// lastError is the message and error of the last error a Caddy log holds.
func lastError(log string) string {
	for _, line := range slices.Backward(strings.Split(strings.TrimRight(log, "\n"), "\n")) {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["level"] == "error" {
			return fmt.Sprintf("%v %v", m["msg"], m["error"])
		}
	}
	return "(no error logged)"
}

// tail is the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// logLines returns the JSON log lines of p whose message is msg.
func logLines(p *proxy, msg string) []map[string]any {
	var out []map[string]any
	for line := range strings.SplitSeq(p.proc.output(), "\n") {
		if !strings.Contains(line, msg) {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// oneOrderForTheFleet (T1): three proxies that start at once on empty
// storage obtain one certificate between them, with one ACME account, and
// serve the same one; the CA's validation reaches whichever instance the
// balancer chooses.
func (f *fleet) oneOrderForTheFleet(t *testing.T) {
	begin := time.Now()
	for _, p := range f.proxies {
		f.start(t, p)
	}
	leaves := f.waitServing(t, func(string) bool { return true }, f.proxies[:]...)
	f.lb.waitUp(t, "xks_https", "p1", "p2", "p3")
	took := time.Since(begin)
	first := leaves["p1"]
	for name, leaf := range leaves {
		if leaf != first {
			t.Errorf("%s serves leaf %s, p1 %s: the fleet must share one certificate", name, leaf, first)
		}
	}
	// Caddyfile.example serves two names, XKS's and EKM's: one order each.
	if n := f.pebble.Finalizes(); n != len(certNames) {
		t.Errorf("Pebble finalized %d orders, want %d for the fleet, one per name", n, len(certNames))
	}
	if n := f.pebble.Accounts(); n != 1 {
		t.Errorf("Pebble made %d accounts, want 1 for the fleet", n)
	}
	var answered []string
	obtained := map[string][]string{}
	for _, p := range f.proxies {
		for _, name := range certNames {
			if f.issued(p, name, begin) > 0 {
				obtained[name] = append(obtained[name], p.name)
			}
		}
		for _, msg := range []string{"served key authentication certificate", "served key authentication"} {
			for _, l := range logLines(p, msg) {
				answered = append(answered, fmt.Sprintf("%s (%v, from storage: %v)", p.name, l["challenge"], l["distributed"]))
			}
		}
	}
	for _, name := range certNames {
		if len(obtained[name]) != 1 {
			t.Errorf("instances that obtained the certificate for %s: %v, want one", name, obtained[name])
		}
	}
	if len(answered) == 0 {
		t.Error("no instance logged answering the CA's validation")
	}
	t.Logf("T1: 3 instances started at once on empty storage; all serving in %s; leaf %s on p1, p2, p3; Pebble: %d order(s), %d finalizes (one per name), %d account; ordered by %v; validation answered by %v",
		took.Round(100*time.Millisecond), first, f.pebble.Orders(), f.pebble.Finalizes(), f.pebble.Accounts(), obtained, answered)
}

// xksClient signs XKS calls to the balancer with the fleet's credential.
type xksClient struct {
	http *http.Client
	cred sigv4auth.Credential
}

// newXKSClient is a client of the balancer, over HTTP/2 or HTTP/1.1 with
// up to conns keep-alive connections.
func (f *fleet) newXKSClient(h2 bool, conns int) *xksClient {
	roots := x509.NewCertPool()
	roots.AddCert(f.pebble.Root())
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, network, net.JoinHostPort(lbAddr, "443"))
		},
		TLSClientConfig:     &tls.Config{ServerName: fleetFQDN, RootCAs: roots, MinVersion: tls.VersionTLS12},
		MaxIdleConnsPerHost: conns,
		// A connection the client leaves idle is closed after 5 s, so
		// that draining an instance (T4) waits at most that long for the
		// connections the client no longer uses.
		IdleConnTimeout:   5 * time.Second,
		ForceAttemptHTTP2: h2,
	}
	if !h2 {
		tr.MaxConnsPerHost = conns
		tr.TLSClientConfig.NextProtos = []string{"http/1.1"}
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &xksClient{http: &http.Client{Transport: tr, Timeout: time.Minute}, cred: f.creds[0]}
}

// call sends one signed call and returns its status and JSON body.
func (c *xksClient) call(ctx context.Context, path string, body any) (int, map[string]any, error) {
	raw, err := json.Marshal(body)
	if err != nil {
		return 0, nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+fleetFQDN+uriPath+path, bytes.NewReader(raw))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if err := sign(req, c.cred, raw); err != nil {
		return 0, nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, &transportError{err}
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return resp.StatusCode, nil, &transportError{fmt.Errorf("reading the answer: %w", err)}
	}
	return resp.StatusCode, out, nil
}

// requestMetadata is what KMS sends with each call.
var requestMetadata = map[string]any{
	"awsPrincipalArn": "arn:aws:iam::111122223333:role/fleet-test",
	"kmsOperation":    "Encrypt",
	"kmsRequestId":    "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
	"kmsKeyArn":       "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
}

// roundTrip encrypts a random plaintext and decrypts the result, and
// gives each call's outcome to record: an Encrypt that fails ends it.
func (c *xksClient) roundTrip(ctx context.Context, record func(start time.Time, err error)) {
	pt := make([]byte, 32)
	_, _ = rand.Read(pt)
	start := time.Now()
	status, enc, err := c.call(ctx, "/keys/"+keyID+"/encrypt", map[string]any{
		"requestMetadata": requestMetadata, "plaintext": base64.StdEncoding.EncodeToString(pt), "encryptionAlgorithm": "AES_GCM",
	})
	if err == nil && status != http.StatusOK {
		err = fmt.Errorf("encrypt: %d %v", status, enc)
	}
	record(start, err)
	if err != nil {
		return
	}
	start = time.Now()
	status, dec, err := c.call(ctx, "/keys/"+keyID+"/decrypt", map[string]any{
		"requestMetadata": requestMetadata, "encryptionAlgorithm": "AES_GCM",
		"ciphertext": enc["ciphertext"], "initializationVector": enc["initializationVector"],
		"authenticationTag": enc["authenticationTag"], "ciphertextMetadata": enc["ciphertextMetadata"],
	})
	switch {
	case err != nil:
	case status != http.StatusOK:
		err = fmt.Errorf("decrypt: %d %v", status, dec)
	default:
		if got, _ := base64.StdEncoding.DecodeString(fmt.Sprint(dec["plaintext"])); !bytes.Equal(got, pt) {
			err = fmt.Errorf("decrypt gave back another plaintext")
		}
	}
	record(start, err)
}

// buildCaddy builds bin/caddy from xcaddy.json (make caddy: nothing to do
// when it is up to date) and returns its path.
func buildCaddy(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("make", "-C", root, "caddy").CombinedOutput(); err != nil {
		t.Fatalf("make caddy: %v\n%s", err, out)
	}
	return filepath.Join(root, "bin", "caddy")
}

// redisServer is Redis on its own host, as production would run it: TLS
// only, the default user off, an ACL user for the proxies and one for the
// test's own control, and every write in its append-only file before it
// answers, so that a restart loses nothing.
type redisServer struct {
	proc                    *process
	dir, ca, conf           string
	password, adminPassword string
	encryptionKey           string
	admin                   *redis.Client
	net                     *network
	top                     *testing.T // the whole test, which the server lives for
}

func startRedis(t *testing.T, n *network, dir string) *redisServer {
	t.Helper()
	r := &redisServer{dir: filepath.Join(dir, "redis"), net: n, top: t}
	if err := os.Mkdir(r.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	r.password, r.adminPassword, r.encryptionKey = randomSecret(t), randomSecret(t), randomSecret(t)
	write(t, filepath.Join(dir, "redis-password"), r.password)
	write(t, filepath.Join(dir, "redis-encryption-key"), r.encryptionKey)
	cert, key := testcert.Server(t, r.dir, redisAddr)
	r.ca = cert
	hash := func(s string) string { sum := sha256.Sum256([]byte(s)); return hex.EncodeToString(sum[:]) }
	conf := fmt.Sprintf(`bind %s
port 0
tls-port 6379
tls-cert-file %s
tls-key-file %s
tls-ca-cert-file %s
tls-auth-clients no
dir %s
save ""
appendonly yes
appendfsync everysec
protected-mode yes
user default off
user caddy-xks on #%s ~caddy-xks ~caddy-xks/* &* +@all -@dangerous
user fleet-test on #%s ~* &* +@all
`, redisAddr, cert, key, cert, r.dir, hash(r.password), hash(r.adminPassword))
	r.conf = filepath.Join(r.dir, "redis.conf")
	write(t, r.conf, conf)
	r.start()
	roots := x509.NewCertPool()
	pem, err := os.ReadFile(cert)
	if err != nil {
		t.Fatal(err)
	}
	roots.AppendCertsFromPEM(pem)
	r.admin = redis.NewClient(&redis.Options{
		Addr: net.JoinHostPort(redisAddr, "6379"), Username: "fleet-test", Password: r.adminPassword,
		TLSConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}, MaxRetries: -1,
	})
	t.Cleanup(func() { _ = r.admin.Close() })
	r.waitUp(t)
	return r
}

// start runs the server.
// start runs the server, until it is stopped or the whole test ends.
func (r *redisServer) start() {
	r.proc = r.net.start(r.top, "redis", r.dir, "redis", os.Environ(), "redis-server", r.conf)
}

// waitUp waits until the server answers.
func (r *redisServer) waitUp(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(settle)
	for {
		err := r.admin.Ping(context.Background()).Err()
		if err == nil {
			return
		}
		if !r.proc.running() || time.Now().After(deadline) {
			t.Fatalf("redis does not answer: %v\n%s", err, tail(r.proc.output(), 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// clientEnv is what fleet/storage-redis.caddyfile needs to reach it.
func (r *redisServer) clientEnv() []string {
	return []string{
		"XKS_REDIS_ADDRESS=" + net.JoinHostPort(redisAddr, "6379"), "XKS_REDIS_USER=caddy-xks",
		"XKS_REDIS_PASSWORD_FILE=" + filepath.Join(filepath.Dir(r.dir), "redis-password"),
		"XKS_REDIS_KEY_FILE=" + filepath.Join(filepath.Dir(r.dir), "redis-encryption-key"),
		"XKS_REDIS_CA=" + r.ca,
	}
}

// randomSecret is 32 random bytes in hex.
func randomSecret(t *testing.T) string {
	t.Helper()
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// balancer is HAProxy running fleet/haproxy.cfg on the lb host.
type balancer struct {
	proc   *process
	socket string
}

func startBalancer(t *testing.T, n *network, dir string, proxies []*proxy) *balancer {
	t.Helper()
	b := &balancer{socket: filepath.Join(dir, "haproxy.sock")}
	cfg, err := filepath.Abs("haproxy.cfg")
	if err != nil {
		t.Fatal(err)
	}
	env := append(os.Environ(), "XKS_LB_SOCKET="+b.socket,
		"XKS_LB_HTTPS="+net.JoinHostPort(lbAddr, "443"), "XKS_LB_HTTP="+net.JoinHostPort(lbAddr, "80"))
	for i, p := range proxies {
		env = append(env, fmt.Sprintf("XKS_P%d_HTTPS=%s", i+1, net.JoinHostPort(p.addr, "443")),
			fmt.Sprintf("XKS_P%d_HTTP=%s", i+1, net.JoinHostPort(p.addr, "80")),
			fmt.Sprintf("XKS_P%d_READY_PORT=%d", i+1, readyPort))
	}
	b.proc = n.start(t, "lb", dir, "haproxy", env, "haproxy", "-W", "-db", "-f", cfg)
	deadline := time.Now().Add(settle)
	for {
		if _, err := b.command("show info"); err == nil {
			return b
		}
		if !b.proc.running() || time.Now().After(deadline) {
			t.Fatalf("haproxy does not answer on its socket:\n%s", tail(b.proc.output(), 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// command sends one command to HAProxy's runtime API.
func (b *balancer) command(cmd string) (string, error) {
	c, err := net.DialTimeout("unix", b.socket, 10*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if _, err := c.Write([]byte(cmd + "\n")); err != nil {
		return "", err
	}
	var out bytes.Buffer
	_, err = out.ReadFrom(c)
	return out.String(), err
}

// status returns each server's status in backend (UP, DOWN, DRAIN, MAINT,
// with transitions such as "UP 1/2").
func (b *balancer) status(t *testing.T, backend string) map[string]string {
	t.Helper()
	out, err := b.command("show stat")
	if err != nil {
		t.Fatalf("haproxy show stat: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	header := strings.Split(strings.TrimPrefix(lines[0], "# "), ",")
	col := map[string]int{}
	for i, h := range header {
		col[h] = i
	}
	st := map[string]string{}
	for _, l := range lines[1:] {
		f := strings.Split(l, ",")
		if len(f) > col["status"] && f[col["pxname"]] == backend {
			st[f[col["svname"]]] = f[col["status"]]
		}
	}
	return st
}

// waitUp waits until the servers are UP in backend.
func (b *balancer) waitUp(t *testing.T, backend string, servers ...string) {
	t.Helper()
	b.waitStatus(t, backend, "UP", servers...)
}

// waitStatus waits until the servers have status in backend.
func (b *balancer) waitStatus(t *testing.T, backend, status string, servers ...string) {
	t.Helper()
	deadline := time.Now().Add(settle)
	for {
		st := b.status(t, backend)
		ok := true
		for _, s := range servers {
			ok = ok && st[s] == status
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy's %s servers %v are not %s: %v", backend, servers, status, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// sign signs an XKS call with SigV4, as KMS does.
func sign(req *http.Request, c sigv4auth.Credential, body []byte) error {
	sum := sha256.Sum256(body)
	return v4.NewSigner().SignHTTP(context.Background(), aws.Credentials{AccessKeyID: c.AccessKeyID, SecretAccessKey: c.SecretAccessKey},
		req, hex.EncodeToString(sum[:]), "kms-xks-proxy", region, time.Now())
}

var _ = syscall.SIGTERM
