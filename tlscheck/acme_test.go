package tlscheck_test

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
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddy-xks/caddy-xks/caddyfile"
	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/pebbletest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
	"github.com/caddy-xks/caddy-xks/tlscheck"
)

// The ACME tests run the proxy as Caddyfile.example configures it (only its
// FQDN; Caddy obtains the certificate) against Pebble, the ACME test server
// Let's Encrypt maintains, in this process (internal/pebbletest). Pebble's
// DNS answers every name with 127.0.0.1 and its validation authority
// connects to the proxy's ports, so the whole exchange stays on loopback.

// runAsCaddy is set in the environment of a child process of this test
// binary that must run as `caddy run` instead of running tests.
const runAsCaddy = "XKS_TLSCHECK_TEST_RUN_AS_CADDY"

// loopbackResolver answers every name with 127.0.0.1, as Pebble's DNS
// does: the preflight's lookup of the proxy's name stays on this machine.
type loopbackResolver struct{}

func (loopbackResolver) LookupIPAddr(context.Context, string) ([]net.IPAddr, error) {
	return []net.IPAddr{{IP: net.IPv4(127, 0, 0, 1)}}, nil
}

func TestMain(m *testing.M) {
	tlscheck.DefaultResolver = loopbackResolver{}
	if config := os.Getenv(runAsCaddy); config != "" {
		os.Args = []string{"caddy", "run", "--config", config, "--adapter", "caddyfile"}
		caddycmd.Main()
		os.Exit(0)
	}
	os.Exit(hsmtest.Main(m))
}

const (
	acmeHost   = "xks-proxy.example.com"
	acmeRegion = "us-east-1"
	acmeKey    = "k"
	// settle bounds the waits for what Caddy and Pebble do by themselves.
	settle = 3 * time.Minute
)

// acmeProxy is the configuration of one proxy that obtains its certificate
// from Pebble.
type acmeProxy struct {
	in        *proxytest.Instance
	pebble    *pebbletest.Server
	token     hsmtest.Token
	cred      sigv4auth.Credential
	hostnames []string // sites, all served by one key store; default acmeHost
	extra     string   // more global options
}

func newACMEProxy(t *testing.T, in *proxytest.Instance, pebble *pebbletest.Server, token hsmtest.Token, cred sigv4auth.Credential) *acmeProxy {
	t.Helper()
	t.Setenv("XKS_ACME_PIN", token.PIN)
	t.Setenv("XKS_ACME_SECRET", cred.SecretAccessKey)
	return &acmeProxy{in: in, pebble: pebble, token: token, cred: cred, hostnames: []string{acmeHost}}
}

// config is the Caddyfile: Caddyfile.example's shape, with Pebble as the
// ACME CA and Pebble's HTTPS certificate as the CA's trusted root.
func (a *acmeProxy) config() string {
	hsm := proxytest.Backend{Name: "main", Module: a.token.Module, Token: a.token.Label, PINEnv: "XKS_ACME_PIN"}
	global := fmt.Sprintf("\tacme_ca %s\n\tacme_ca_root %s\n\tpreferred_chains {\n\t\troot_common_name \"ISRG Root X1\"\n\t}\n%s\thsm {\n%s\t}\n",
		a.pebble.Directory, a.pebble.TLSRoot, a.extra, hsm.Block())
	var sites strings.Builder
	for _, host := range a.hostnames {
		fmt.Fprintf(&sites, `
%s {
	xks {
		hostnames %s
		key_store /acme {
			hsm main
			region %s
			credential %s {env.XKS_ACME_SECRET}
			keys %s
%s		}
	}
}
`, host, strings.Join(a.hostnames, " "), acmeRegion, a.cred.AccessKeyID, acmeKey, proxytest.KeyStoreDefaults(""))
	}
	return a.in.Global(global) + sites.String()
}

// acmeKeyStore makes what the key store needs: a token with the key and a
// SigV4 credential.
func acmeKeyStore(t *testing.T) (hsmtest.Token, sigv4auth.Credential) {
	t.Helper()
	token := hsmtest.NewToken(t)
	token.CreateKey(t, acmeKey)
	cred, err := sigv4auth.NewCredential()
	if err != nil {
		t.Fatal(err)
	}
	return token, cred
}

// start begins an ACME test: a token with the key, a credential, Pebble
// validating on the instance's ports.
func startACME(t *testing.T, pebbleOpts pebbletest.Options) (*proxytest.Proxy, *acmeProxy) {
	t.Helper()
	token, cred := acmeKeyStore(t)
	p := proxytest.New(t)
	pebbleOpts.HTTPPort, pebbleOpts.TLSPort = p.HTTPPort, p.HTTPSPort
	pebble := pebbletest.Start(t, pebbleOpts)
	return p, newACMEProxy(t, p.Instance, pebble, token, cred)
}

// pebbleRoots is a pool of Pebble's issuing root only.
func pebbleRoots(pebble *pebbletest.Server) *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(pebble.Root())
	return pool
}

// servedChain makes a TLS handshake with the proxy as KMS would, trusting
// only roots, and returns the chain served for host.
func servedChain(port int, host string, roots *x509.CertPool) ([]*x509.Certificate, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: time.Minute}, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		&tls.Config{ServerName: host, RootCAs: roots, MinVersion: tls.VersionTLS12})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates, nil
}

// awaitChain waits until the proxy serves host a chain that ok accepts.
func awaitChain(t *testing.T, port int, host string, roots *x509.CertPool, ok func([]*x509.Certificate) bool) []*x509.Certificate {
	t.Helper()
	deadline := time.Now().Add(settle)
	for {
		chain, err := servedChain(port, host, roots)
		if err == nil && ok(chain) {
			return chain
		}
		if time.Now().After(deadline) {
			t.Fatalf("no acceptable certificate served for %s within %s; last: %v", host, settle, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func anyChain([]*x509.Certificate) bool { return true }

// xksClient calls the proxy's key store over TLS trusting only roots.
type xksClient struct {
	http *http.Client
	base string
	cred sigv4auth.Credential
}

func newXKSClient(port int, host string, roots *x509.CertPool, cred sigv4auth.Credential) *xksClient {
	dialer := &net.Dialer{Timeout: time.Minute}
	return &xksClient{
		http: &http.Client{Timeout: time.Minute, Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return dialer.DialContext(ctx, network, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			},
			TLSClientConfig:     &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
			MaxIdleConnsPerHost: 16,
		}},
		base: fmt.Sprintf("https://%s:%d/acme/kms/xks/v1", host, port),
		cred: cred,
	}
}

// encrypt sends one Encrypt signed with aws-sdk-go-v2's SigV4 signer and
// returns an error unless it was answered 200 with a ciphertext.
func (c *xksClient) encrypt() error {
	pt := make([]byte, 32)
	if _, err := rand.Read(pt); err != nil {
		return err
	}
	body := fmt.Sprintf(`{"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::111122223333:user/acme","kmsKeyArn":"arn:aws:kms:us-east-1:111122223333:key/acme","kmsOperation":"Encrypt","kmsRequestId":"acme"},"plaintext":%q,"encryptionAlgorithm":"AES_GCM"}`,
		base64.StdEncoding.EncodeToString(pt))
	req, err := http.NewRequest(http.MethodPost, c.base+"/keys/"+acmeKey+"/encrypt", strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	sum := sha256.Sum256([]byte(body))
	if err := v4.NewSigner().SignHTTP(context.Background(), aws.Credentials{AccessKeyID: c.cred.AccessKeyID, SecretAccessKey: c.cred.SecretAccessKey},
		req, hex.EncodeToString(sum[:]), "kms-xks-proxy", acmeRegion, time.Now()); err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	var out map[string]any
	if resp.StatusCode != http.StatusOK || json.Unmarshal(raw, &out) != nil || out["ciphertext"] == nil {
		return fmt.Errorf("encrypt: %d %s", resp.StatusCode, raw)
	}
	return nil
}

func describe(chain []*x509.Certificate) string {
	names := make([]string, 0, len(chain))
	for _, c := range chain {
		names = append(names, fmt.Sprintf("%q", c.Subject.CommonName))
	}
	return strings.Join(names, " <- ")
}

// TestACMEObtain: a proxy configured only with its FQDN obtains its
// certificate from Pebble over a real ACME challenge, serves it, and a
// signed Encrypt over it succeeds for a client that trusts only Pebble's
// root. The preflight passes the obtained chain with a trust list that
// holds Pebble's root, and warns with KMS's lists, naming the root and
// the fix; with and without a CN in the leaf.
func TestACMEObtain(t *testing.T) {
	for _, withCN := range []bool{true, false} {
		t.Run(fmt.Sprintf("common name %v", withCN), func(t *testing.T) {
			p, a := startACME(t, pebbletest.Options{CommonName: withCN})
			p.Load(a.config())
			roots := pebbleRoots(a.pebble)
			chain := awaitChain(t, p.HTTPSPort, acmeHost, roots, anyChain)
			leaf := chain[0]
			logs, _ := os.ReadFile(p.LogFile)
			challenge := regexp.MustCompile(`"msg":"trying to solve challenge".*"challenge_type":"([^"]+)"`).FindSubmatch(logs)
			if challenge == nil {
				t.Fatalf("the proxy's log names no ACME challenge:\n%s", regexp.MustCompile(`.*challenge.*`).FindAll(logs, -1))
			}
			t.Logf("obtained over ACME (%s challenge): leaf CN %q, SANs %v, issuer %q, chain %s, root %q; %d order(s) at Pebble",
				challenge[1], leaf.Subject.CommonName, leaf.DNSNames, leaf.Issuer.CommonName, describe(chain), a.pebble.Root().Subject.CommonName, a.pebble.Orders())
			if err := newXKSClient(p.HTTPSPort, acmeHost, roots, a.cred).encrypt(); err != nil {
				t.Fatalf("Encrypt over the obtained certificate: %v", err)
			}
			// Days left on it, as KMS's XksProxyCertificateDaysToExpire
			// counts them (Pebble's certificates live 90 days).
			sample := `caddy_xks_certificate_days_to_expire{hostname="` + acmeHost + `"}`
			days := proxytest.MetricValue(t, p.Metrics(), sample)
			for deadline := time.Now().Add(settle); days < 0 && time.Now().Before(deadline); days = proxytest.MetricValue(t, p.Metrics(), sample) {
				time.Sleep(100 * time.Millisecond) // the preflight's report of the obtained chain is on its way
			}
			if want := float64(int(time.Until(leaf.NotAfter).Hours() / 24)); days != want && days != want-1 {
				t.Errorf("caddy_xks_certificate_days_to_expire = %v, want %v", days, want)
			}

			// The preflight's check, with a trust list holding Pebble's root.
			pebbleList := tlscheck.RootList{tlscheck.FingerprintOf(a.pebble.Root().Raw): a.pebble.Root().Subject.String()}
			problems := tlscheck.CheckChain(acmeHost, chain, tlscheck.CheckOptions{TrustedRoots: pebbleList, Roots: roots})
			rules := make([]tlscheck.Rule, 0, len(problems))
			for _, pr := range problems {
				rules = append(rules, pr.Rule)
			}
			switch {
			case withCN && len(problems) != 0:
				t.Errorf("a trust list with Pebble's root: problems %v", problems)
			case !withCN && (len(rules) != 1 || rules[0] != tlscheck.RuleCommonName):
				t.Errorf("a leaf without a CN: rules %v, want only common_name", rules)
			}

			// The running proxy's preflight, with KMS's lists, refused the
			// root and said why, for the obtained chain.
			want := regexp.MustCompile(`"msg":"AWS KMS would refuse this server certificate: the served chain .* ends under CN=` +
				regexp.QuoteMeta(a.pebble.Root().Subject.CommonName) + `, a root .*"hostname":"` + regexp.QuoteMeta(acmeHost) + `".*"rule":"trusted_root","fix":"[^"]+"`)
			awaitLog(t, p.LogFile, want)
			if logs, _ = os.ReadFile(p.LogFile); strings.Contains(string(logs), `"rule":"common_name"`) == withCN {
				t.Errorf("the proxy's preflight %s a common_name problem for a leaf with CN %v", map[bool]string{true: "reported", false: "missed"}[withCN], withCN)
			}
		})
	}
}

// awaitLog waits until a line of the log matches.
func awaitLog(t *testing.T, file string, re *regexp.Regexp) {
	t.Helper()
	deadline := time.Now().Add(settle)
	for {
		logs, _ := os.ReadFile(file)
		for line := range bytes.SplitSeq(logs, []byte("\n")) {
			if re.Match(line) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line matches %s within %s", re, settle)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestACMERenewalUnderLoad: Pebble issues certificates that live a minute,
// so Caddy renews while a continuous signed load runs. No request fails
// across the renewal, the new certificate is served afterwards, the
// preflight checks it (cert_obtained) and the expiry metric moves to it.
func TestACMERenewalUnderLoad(t *testing.T) {
	p, a := startACME(t, pebbletest.Options{CommonName: true, Validity: time.Minute})
	a.extra = "\trenew_interval 2s\n"
	p.Load(a.config())
	roots := pebbleRoots(a.pebble)
	first := awaitChain(t, p.HTTPSPort, acmeHost, roots, anyChain)[0]
	expiry := func() float64 {
		return proxytest.MetricValue(t, p.Metrics(), `caddy_xks_certificate_expiry_timestamp_seconds{hostname="`+acmeHost+`"}`)
	}

	client := newXKSClient(p.HTTPSPort, acmeHost, roots, a.cred)
	var (
		stop              atomic.Bool
		ok, failed        atomic.Int64
		firstErr          atomic.Value
		wg                sync.WaitGroup
		beforeRenewal     int64
		afterRenewalStart int64
	)
	// Four clients, each pacing itself, as a steady KMS load: the machine
	// must keep time for the renewal too.
	for range 4 {
		wg.Go(func() {
			for !stop.Load() {
				time.Sleep(5 * time.Millisecond)
				if err := client.encrypt(); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				} else {
					ok.Add(1)
				}
			}
		})
	}
	defer func() { stop.Store(true); wg.Wait() }()

	start := time.Now()
	renewed := awaitChain(t, p.HTTPSPort, acmeHost, roots, func(c []*x509.Certificate) bool { return !c[0].Equal(first) })[0]
	beforeRenewal = ok.Load()
	renewedAt := time.Since(start)
	// Go on for another 200 requests, on new connections too (those the
	// clients open from now on get the new certificate).
	client.http.CloseIdleConnections()
	deadline := time.Now().Add(settle)
	for ok.Load() < beforeRenewal+200 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	afterRenewalStart = ok.Load() - beforeRenewal
	stop.Store(true)
	wg.Wait()
	t.Logf("renewal timeline: first leaf serial %s (not after %s); %d requests before the new leaf %s (not after %s) was served %s into the load; %d after; %d failed",
		first.SerialNumber, first.NotAfter.Format(time.RFC3339), beforeRenewal, renewed.SerialNumber, renewed.NotAfter.Format(time.RFC3339),
		renewedAt.Round(time.Second), afterRenewalStart, failed.Load())
	if failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed across the renewal; first: %v", failed.Load(), ok.Load()+failed.Load(), firstErr.Load())
	}
	if afterRenewalStart < 200 {
		t.Fatalf("only %d requests after the renewal", afterRenewalStart)
	}
	// The preflight checked the renewed leaf: its expiry is the metric's.
	deadline = time.Now().Add(settle)
	for expiry() < float64(renewed.NotAfter.Unix()) {
		if time.Now().After(deadline) {
			t.Fatalf("the expiry metric is %v, want the renewed leaf's %d", expiry(), renewed.NotAfter.Unix())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestACMEFleetObtainsOneCertificate: two proxy processes with one shared
// storage, started together, obtain one certificate between them (one
// order at Pebble) and both serve it. Pebble validates on the first
// instance's ports; certmagic keeps the challenge in the shared storage,
// so whichever instance ordered, the first can answer.
func TestACMEFleetObtainsOneCertificate(t *testing.T) {
	token, cred := acmeKeyStore(t)
	storage := t.TempDir()
	first, second := proxytest.NewInstance(t), proxytest.NewInstance(t)
	first.Storage, second.Storage = storage, storage
	pebble := pebbletest.Start(t, pebbletest.Options{HTTPPort: first.HTTPPort, TLSPort: first.HTTPSPort, CommonName: true})
	// The second starts as soon as the first listens, which is where
	// Pebble validates (as a load balancer would send it there): both race
	// for the order, and whichever makes it, the first answers the
	// challenge from the shared storage.
	startChild(t, newACMEProxy(t, first, pebble, token, cred), token)
	awaitListening(t, first.HTTPSPort)
	startChild(t, newACMEProxy(t, second, pebble, token, cred), token)
	roots := pebbleRoots(pebble)
	leafA := awaitChain(t, first.HTTPSPort, acmeHost, roots, anyChain)[0]
	leafB := awaitChain(t, second.HTTPSPort, acmeHost, roots, anyChain)[0]
	t.Logf("fleet of two: %d order(s) at Pebble; first serves serial %s, second %s", pebble.Orders(), leafA.SerialNumber, leafB.SerialNumber)
	if pebble.Orders() != 1 {
		t.Errorf("%d orders at Pebble for a fleet sharing storage, want 1", pebble.Orders())
	}
	if !leafA.Equal(leafB) {
		t.Error("the instances serve different certificates")
	}
	for _, in := range []*proxytest.Instance{first, second} {
		if err := newXKSClient(in.HTTPSPort, acmeHost, roots, cred).encrypt(); err != nil {
			t.Errorf("Encrypt on the instance at %d: %v", in.HTTPSPort, err)
		}
	}
}

// awaitListening waits until something accepts connections on port.
func awaitListening(t *testing.T, port int) {
	t.Helper()
	deadline := time.Now().Add(settle)
	for {
		conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Minute)
		if err == nil {
			_ = conn.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %d within %s: %v", port, settle, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startChild runs the proxy as a child process (this test binary as caddy).
func startChild(t *testing.T, a *acmeProxy, token hsmtest.Token) {
	t.Helper()
	config := filepath.Join(a.in.Dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(a.config()), 0o600); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), runAsCaddy+"="+config, "SOFTHSM2_CONF="+token.Conf,
		"HOME="+a.in.Dir, "XDG_DATA_HOME="+a.in.Dir, "XDG_CONFIG_HOME="+a.in.Dir)
	output, err := os.Create(filepath.Join(a.in.Dir, "output"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = output, output
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(time.Minute):
			_ = cmd.Process.Kill()
		}
		_ = output.Close()
		if t.Failed() {
			logs, _ := os.ReadFile(a.in.LogFile)
			out, _ := os.ReadFile(output.Name())
			t.Logf("log of the instance at %d:\n%s\noutput:\n%s", a.in.HTTPSPort, logs, out)
		}
	})
}

// TestACMEFailureAtStart: with Pebble down when the proxy starts, the proxy
// still starts and serves XKS for the name whose certificate it has in
// storage, logs the failure to obtain the other's, and the preflight says
// that no certificate is served for it.
//
// The proxy that starts with the certificate in storage is a new process,
// as after a restart. In this process, a second Caddy start with the
// certificate in storage failed the race detector, in Caddy 2.11.9: Caddy
// starts its apps in map order, so certmagic may load the certificate
// from storage (the http app's Manage) while the TLS app's Start is
// writing its struct, and the event it emits for it ("cached_managed_cert",
// to which the preflight subscribes) makes the events app copy that struct
// (the TLS app's CaddyModule has a value receiver). Only the race detector
// sees it: the copy is used for the module's name alone.
func TestACMEFailureAtStart(t *testing.T) {
	p, a := startACME(t, pebbletest.Options{CommonName: true})
	p.Load(a.config())
	roots := pebbleRoots(a.pebble)
	awaitChain(t, p.HTTPSPort, acmeHost, roots, anyChain)
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	a.pebble.Stop()

	const other = "xks-proxy-2.example.com"
	a.hostnames = []string{acmeHost, other}
	startChild(t, a, a.token)
	awaitChain(t, p.HTTPSPort, acmeHost, roots, anyChain) // loaded from storage, in the background
	if err := newXKSClient(p.HTTPSPort, acmeHost, roots, a.cred).encrypt(); err != nil {
		t.Fatalf("Encrypt with the certificate from storage while the ACME CA is down: %v", err)
	}
	awaitLog(t, p.LogFile, regexp.MustCompile(`"level":"error".*"identifier":"`+regexp.QuoteMeta(other)+`"`))
	awaitLog(t, p.LogFile, regexp.MustCompile(`"msg":"AWS KMS would refuse this server certificate: no certificate is served for `+
		regexp.QuoteMeta(other)+`: obtaining one failed: [^"]+".*"rule":"certificate"`))
}
