// Package proxytest runs a real Caddy with the caddy-xks modules for
// end-to-end tests, in the test process or in a child process, on loopback
// ports that the kernel handed to this test.
//
// Three rules keep such tests truthful on any machine:
//
//   - No fixed port. Caddy binds with SO_REUSEPORT, so two test processes
//     (two packages of one `go test ./...`, or a demo beside a test run)
//     that listen on the same port silently split each other's
//     connections. Every port here comes from the kernel (listen on :0), and
//     the admin endpoint is a unix socket in the test's own directory.
//   - A load is done when the new config answers: Load returns after Caddy
//     has started the new config and the proxy's Ready probe has passed.
//   - Timeouts are generous. The HSM blocks written here give every call
//     seconds, not the production 200 ms, unless the test sets the value
//     itself (a test of that timeout makes the HSM hang far beyond it).
package proxytest

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile" // the Caddyfile adapter
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// Test timeouts: far above anything a loaded 2-core machine needs for one
// SoftHSM2 call, far below the test binary's own timeout.
const (
	CallTimeout = "30s"
	SessionWait = "10s"
	Deadline    = "30s"
)

// readyTimeout bounds how long Load waits for the new config to answer.
const readyTimeout = 2 * time.Minute

// handedOut holds every port FreePort returned in this process, so that two
// servers of one test never get the same port.
var handedOut sync.Map

// FreePort returns a TCP port that the kernel picked as free on every
// interface, for a server that the test starts right after. It never
// returns a port twice in one process.
func FreePort(t testing.TB) int {
	t.Helper()
	for range 100 {
		// Every interface, as Caddy binds: the port must be free on all.
		l, err := net.Listen("tcp", ":0") //nolint:gosec // closed at once; see above
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		_ = l.Close()
		if _, taken := handedOut.LoadOrStore(port, true); !taken {
			return port
		}
	}
	t.Fatal("the kernel keeps handing out ports this process already uses")
	return 0
}

// Instance is where one proxy lives: its directory, ports, admin socket,
// storage and log. It serves both an in-process Proxy and a proxy that a
// test runs as a child process.
type Instance struct {
	// Dir holds the admin socket, the storage and the log. It is short
	// (unix socket paths are limited to 108 bytes) and removed after the
	// test.
	Dir string
	// HTTPPort and HTTPSPort are Caddy's http_port and https_port.
	HTTPPort, HTTPSPort int
	// AdminSocket is the admin endpoint's unix socket.
	AdminSocket string
	// Storage is Caddy's file_system storage directory.
	Storage string
	// LogFile receives every log line, JSON, at DEBUG, but for the events
	// app's, at INFO. At DEBUG the events app hands every CertMagic event
	// to its origin's CaddyModule, and caddytls's TLS app (Caddy 2.11.9)
	// answers that by copying its whole struct while its Start may still
	// be writing it: the race detector failed TestACMEFailureAtStart on a
	// certificate cached before the TLS app had started. An event someone
	// subscribed to takes the same path at any level; tlscheck's preflight
	// subscribes to the certificate events, which is why that test starts
	// its second proxy, the one with a certificate in storage, as a new
	// process.
	LogFile string
}

// NewInstance makes a directory and takes two free ports.
func NewInstance(t testing.TB) *Instance {
	t.Helper()
	dir, err := os.MkdirTemp("", "xks-proxy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return &Instance{
		Dir:         dir,
		HTTPPort:    FreePort(t),
		HTTPSPort:   FreePort(t),
		AdminSocket: filepath.Join(dir, "admin.sock"),
		Storage:     filepath.Join(dir, "storage"),
		LogFile:     filepath.Join(dir, "caddy.log"),
	}
}

// Global is the Caddyfile's global options block for the instance, with
// extra (more global options, such as an hsm block) inside it.
func (in *Instance) Global(extra string) string {
	return fmt.Sprintf(`{
	admin unix/%s
	http_port %d
	https_port %d
	persist_config off
	skip_install_trust
	storage file_system %s
	log {
		output file %s
		format json
		level DEBUG
		exclude events
	}
	log events {
		output file %s
		format json
		level INFO
		include events
	}
%s}
`, in.AdminSocket, in.HTTPPort, in.HTTPSPort, in.Storage, in.LogFile, in.LogFile, extra)
}

// Origin is the base URL of the instance's HTTPS port on localhost.
func (in *Instance) Origin() string {
	return "https://localhost:" + strconv.Itoa(in.HTTPSPort)
}

// Backend is one pkcs11 backend of the hsm global option.
type Backend struct {
	Name   string
	Module string
	Token  string
	// PINEnv names the environment variable holding the PIN: the config
	// reads it with an {env.*} placeholder, as production does.
	PINEnv string
	// IV is the iv mode; caller (SoftHSM2's) when empty.
	IV string
	// Extra holds more lines of the pkcs11 block. A call_timeout or
	// session_wait among them replaces the generous test default.
	Extra string
}

// Block is the pkcs11 block, for inside an `hsm { }` global option.
func (b Backend) Block() string {
	iv := b.IV
	if iv == "" {
		iv = "caller"
	}
	var s strings.Builder
	// The token label is quoted: nShield's is "loadshared accelerator".
	fmt.Fprintf(&s, "\t\tpkcs11 %s {\n\t\t\tmodule %s\n\t\t\ttoken %q\n\t\t\tpin {env.%s}\n\t\t\tiv %s\n",
		b.Name, b.Module, b.Token, b.PINEnv, iv)
	s.WriteString(defaults(b.Extra, "\t\t\t", "call_timeout", CallTimeout, "session_wait", SessionWait))
	if b.Extra != "" {
		s.WriteString(strings.TrimRight(b.Extra, "\n") + "\n")
	}
	s.WriteString("\t\t}\n")
	return s.String()
}

// KeyStoreDefaults are the lines a key_store block of a test needs so that
// no request depends on the machine's speed: a generous deadline, unless
// extra (the test's own lines for that block) sets one.
func KeyStoreDefaults(extra string) string {
	return defaults(extra, "\t\t\t", "deadline", Deadline)
}

// defaults writes "name value" lines for each pair whose name is not a
// directive in extra.
func defaults(extra, indent string, pairs ...string) string {
	var s strings.Builder
	for i := 0; i+1 < len(pairs); i += 2 {
		if !hasDirective(extra, pairs[i]) {
			fmt.Fprintf(&s, "%s%s %s\n", indent, pairs[i], pairs[i+1])
		}
	}
	return s.String()
}

func hasDirective(lines, name string) bool {
	for line := range strings.SplitSeq(lines, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == name {
			return true
		}
	}
	return false
}

// Proxy is Caddy running in the test process. Caddy's state is global, so
// tests that use a Proxy must not run in parallel with each other.
type Proxy struct {
	*Instance
	t testing.TB
	// Client calls the proxy's sites: every name dials 127.0.0.1, and it
	// trusts the certificates given to Trust.
	Client *http.Client
	// Ready, when set, is retried after each load until it returns nil:
	// the new config then answers. A signed health check is a good probe.
	Ready func() error

	roots *x509.CertPool
}

// New makes an instance for an in-process Caddy. Nothing runs until Load;
// the test's cleanup stops Caddy.
func New(t testing.TB) *Proxy {
	t.Helper()
	p := &Proxy{Instance: NewInstance(t), t: t, roots: x509.NewCertPool()}
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	p.Client = &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				_, port, err := net.SplitHostPort(addr)
				if err != nil {
					return nil, err
				}
				return dialer.DialContext(ctx, network, net.JoinHostPort("127.0.0.1", port))
			},
			ForceAttemptHTTP2:   true,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
			TLSHandshakeTimeout: 30 * time.Second,
			TLSClientConfig:     &tls.Config{RootCAs: p.roots, MinVersion: tls.VersionTLS12},
		},
	}
	t.Cleanup(func() {
		p.Client.CloseIdleConnections()
		if err := caddy.Stop(); err != nil {
			t.Logf("stopping caddy: %v", err)
		}
	})
	return p
}

// Trust adds the PEM certificates of file to the roots the Client trusts.
func (p *Proxy) Trust(file string) {
	p.t.Helper()
	pem, err := os.ReadFile(file)
	if err != nil {
		p.t.Fatal(err)
	}
	if !p.roots.AppendCertsFromPEM(pem) {
		p.t.Fatalf("no certificate in %s", file)
	}
}

// Load adapts the Caddyfile and loads it, as a plain `caddy reload` would
// (a config equal to the running one is left alone; see ForceReload), then
// waits for Ready. A config that fails to load fails the test.
func (p *Proxy) Load(caddyfile string) {
	p.t.Helper()
	cfg, err := p.adapt(caddyfile)
	if err != nil {
		p.t.Fatalf("%v\n%s", err, caddyfile)
	}
	p.LoadJSON(cfg)
}

// LoadJSON loads a JSON config and waits for Ready.
func (p *Proxy) LoadJSON(cfg []byte) {
	p.t.Helper()
	if err := caddy.Load(cfg, false); err != nil {
		p.t.Fatalf("loading the proxy's config: %v\n%s", err, cfg)
	}
	p.waitReady()
}

// waitReady waits until the previous config's servers have closed their
// listening sockets, then until Ready passes, if it is set.
func (p *Proxy) waitReady() {
	p.t.Helper()
	deadline := time.Now().Add(readyTimeout)
	p.waitOldListeners(deadline)
	if p.Ready == nil {
		return
	}
	for {
		err := p.Ready()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("the new config does not answer after %s: %v", readyTimeout, err)
		}
		// An idle connection may lead to the old config's server, which
		// serves what is already open until it closes: ask on a new one.
		p.Client.CloseIdleConnections()
		time.Sleep(20 * time.Millisecond)
	}
}

// waitOldListeners waits until each of the instance's ports has one
// listening socket at most. Caddy binds with SO_REUSEPORT, so during a
// reload the old and the new config each have a socket on the port and the
// kernel hands new connections to either. Caddy returns from a reload once
// the old servers have been told to shut down, which may be before they
// close their sockets: a connection the kernel queued on an old socket is
// then reset when it closes (Caddy's own comment in modules/caddyhttp's
// App.stop says so). Only after that is every new connection the new
// config's. Caddy's own count (caddy.ListenerUsage) drops before the
// socket closes (its deleteListener.Close leaves the pool first), so the
// count asked is the kernel's.
func (p *Proxy) waitOldListeners(deadline time.Time) {
	p.t.Helper()
	for _, port := range []int{p.HTTPSPort, p.HTTPPort} {
		for {
			n, err := listeningSockets(port)
			if err != nil {
				p.t.Fatalf("counting the sockets that listen on port %d: %v", port, err)
			}
			if n <= 1 {
				break
			}
			if time.Now().After(deadline) {
				p.t.Fatalf("the previous config still listens on port %d after %s", port, readyTimeout)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// listeningSockets counts the TCP sockets of this process that listen on
// port, from the kernel's tables (/proc/net/tcp and tcp6), where a socket
// is gone only once its last file descriptor is closed.
func listeningSockets(port int) (int, error) {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0, err
	}
	own := make(map[string]bool, len(fds)) // socket inodes of this process
	for _, fd := range fds {
		link, err := os.Readlink("/proc/self/fd/" + fd.Name())
		if inode, ok := strings.CutPrefix(link, "socket:["); err == nil && ok {
			own[strings.TrimSuffix(inode, "]")] = true
		}
	}
	suffix := fmt.Sprintf(":%04X", port)
	n := 0
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		data, err := os.ReadFile(table)
		if errors.Is(err, fs.ErrNotExist) {
			continue // no IPv6 here
		}
		if err != nil {
			return 0, err
		}
		// sl local_address rem_address st tx_queue:rx_queue tr:tm->when
		// retrnsmt uid timeout inode ...; st 0A is LISTEN.
		for line := range strings.SplitSeq(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) > 9 && f[3] == "0A" && strings.HasSuffix(f[1], suffix) && own[f[9]] {
				n++
			}
		}
	}
	return n, nil
}

// ForceReload adapts the Caddyfile and posts it to the admin endpoint's
// /load with "Cache-Control: must-revalidate", as `caddy reload --force`
// does: Caddy provisions it even if it is the running config, where Load
// (like a plain `caddy reload`) leaves an unchanged config alone. It returns
// the admin endpoint's error, and the running config stays, if the load
// fails; otherwise it waits for Ready.
func (p *Proxy) ForceReload(caddyfile string) error {
	p.t.Helper()
	cfg, err := p.adapt(caddyfile)
	if err != nil {
		return err
	}
	header := http.Header{}
	header.Set("Content-Type", "application/json")
	header.Set("Cache-Control", "must-revalidate")
	code, body := p.adminRequest(http.MethodPost, "/load", header, bytes.NewReader(cfg))
	if code != http.StatusOK {
		return fmt.Errorf("forced reload: %d %s", code, bytes.TrimSpace(body))
	}
	p.waitReady()
	return nil
}

// TryLoad adapts and loads the Caddyfile and returns the error that either
// step failed with. The running config stays when it fails.
func (p *Proxy) TryLoad(caddyfile string) error {
	cfg, err := p.adapt(caddyfile)
	if err != nil {
		return err
	}
	return caddy.Load(cfg, false)
}

func (p *Proxy) adapt(caddyfile string) ([]byte, error) {
	adapter := caddyconfig.GetAdapter("caddyfile")
	cfg, warnings, err := adapter.Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return nil, fmt.Errorf("adapting the Caddyfile: %w", err)
	}
	for _, w := range warnings {
		p.t.Logf("caddyfile: %s", w.String())
	}
	return cfg, nil
}

// Admin sends a request to the admin endpoint over its unix socket.
func (p *Proxy) Admin(method, path, contentType string, body io.Reader) (int, []byte) {
	p.t.Helper()
	header := http.Header{}
	if contentType != "" {
		header.Set("Content-Type", contentType)
	}
	return p.adminRequest(method, path, header, body)
}

func (p *Proxy) adminRequest(method, path string, header http.Header, body io.Reader) (int, []byte) {
	p.t.Helper()
	client := &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", p.AdminSocket)
		}},
	}
	defer client.CloseIdleConnections()
	req, err := http.NewRequest(method, "http://localhost"+path, body)
	if err != nil {
		p.t.Fatal(err)
	}
	req.Header = header
	resp, err := client.Do(req)
	if err != nil {
		p.t.Fatalf("admin %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		p.t.Fatal(err)
	}
	return resp.StatusCode, out
}

// Metrics returns the admin endpoint's Prometheus metrics.
func (p *Proxy) Metrics() string {
	p.t.Helper()
	code, body := p.Admin(http.MethodGet, "/metrics", "", nil)
	if code != http.StatusOK {
		p.t.Fatalf("metrics: %d %s", code, body)
	}
	return string(body)
}

// MetricValue reads one sample's value from Prometheus text, -1 when the
// sample is absent.
func MetricValue(t testing.TB, metrics, sample string) float64 {
	t.Helper()
	for line := range strings.SplitSeq(metrics, "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	return -1
}
