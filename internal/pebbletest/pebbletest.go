// Package pebbletest runs Pebble, the ACME test server Let's Encrypt
// maintains (github.com/letsencrypt/pebble), in the test process, with
// challtestsrv (Let's Encrypt's test DNS server) answering every name with
// 127.0.0.1, so that a Caddy on loopback can obtain and renew real ACME
// certificates for a public-looking name without any network.
//
// Pebble validates HTTP-01 challenges on the name's HTTPPort and TLS-ALPN-01
// on its TLSPort: give it Caddy's http_port and https_port. Its own
// directory is served over HTTPS with a certificate whose CA file (TLSRoot)
// Caddy must trust (acme_ca_root).
package pebbletest

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/letsencrypt/challtestsrv"
	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"

	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/internal/testcert"
)

// Options shape the server.
type Options struct {
	// HTTPPort and TLSPort are where Pebble's validation authority
	// connects to answer HTTP-01 and TLS-ALPN-01 challenges.
	HTTPPort, TLSPort int
	// Validity is the lifetime of the certificates issued; zero is
	// Pebble's default of 90 days.
	Validity time.Duration
	// CommonName puts the first name into the leaf's subject CN, as Let's
	// Encrypt's classic profile does; without it the leaf has no CN, as in
	// the tlsserver and shortlived profiles.
	CommonName bool
	// Listen is the address of the ACME directory; a port of 127.0.0.1
	// that the kernel picks when empty. Its host is in the directory's
	// certificate.
	Listen string
	// Answer is the IPv4 address the test DNS server gives for every
	// name, where the validation authority connects; 127.0.0.1 when
	// empty.
	Answer string
	// NoARI leaves ACME Renewal Info out of the directory. Pebble's
	// window for a certificate that lives less than two days starts at
	// its issuance (core.RenewalInfoSimple), so a client that follows it
	// renews at a random moment of the certificate's life; without it,
	// CertMagic renews once two thirds of the life have passed.
	NoARI bool
}

// Server is a running Pebble.
type Server struct {
	// Directory is the ACME directory URL.
	Directory string
	// TLSRoot is the PEM file of the CA of the directory's own HTTPS
	// certificate (Caddy's acme_ca_root).
	TLSRoot string

	ca        *ca.CAImpl
	srv       *http.Server
	dns       *challtestsrv.ChallSrv
	orders    atomic.Int64
	accounts  atomic.Int64
	finalizes atomic.Int64
	// gate, when set, sees each ACME request before Pebble does.
	gate     atomic.Pointer[func(*http.Request)]
	stopOnce sync.Once
}

// Start runs Pebble until the test ends (or Stop).
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	// Pebble's chaos: random validation sleeps of up to 15 s, 5 % of nonces
	// rejected, reused authorizations. Tests want a plain ACME server.
	t.Setenv("PEBBLE_VA_NOSLEEP", "1")
	t.Setenv("PEBBLE_WFE_NONCEREJECT", "0")
	t.Setenv("PEBBLE_AUTHZREUSE", "0")

	logger := log.New(testWriter{t}, "pebble ", 0)
	dnsAddr := fmt.Sprintf("127.0.0.1:%d", proxytest.FreePort(t))
	dns, err := challtestsrv.New(challtestsrv.Config{DNSAddrs: []string{dnsAddr}, Log: logger})
	if err != nil {
		t.Fatalf("challtestsrv: %v", err)
	}
	answer := opts.Answer
	if answer == "" {
		answer = "127.0.0.1"
	}
	dns.SetDefaultDNSIPv4(answer)
	dns.SetDefaultDNSIPv6("") // KMS and the tests use IPv4
	dns.Run()

	store := db.NewMemoryStore()
	profiles := map[string]ca.Profile{"default": {
		Description:       "the only profile",
		PromoteCommonName: opts.CommonName,
		ValidityPeriod:    uint64(max(opts.Validity, 0) / time.Second), //nolint:gosec // not negative, see max
	}}
	authority := ca.New(logger, store, "", "ecdsa", 0, 1, profiles)
	validator := va.New(logger, opts.HTTPPort, opts.TLSPort, false, dnsAddr, store)
	front := wfe.New(logger, store, validator, authority, []string{"pebble.letsencrypt.org"}, false, false, 3, 5)

	s := &Server{ca: authority, dns: dns}
	dir := t.TempDir()
	listen := opts.Listen
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := testcert.Server(t, dir, "localhost", host)
	s.TLSRoot = certFile
	l, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	handler := front.Handler()
	s.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPost {
				switch {
				case r.URL.Path == "/order-plz":
					s.orders.Add(1)
				case r.URL.Path == "/sign-me-up":
					s.accounts.Add(1)
				case strings.HasPrefix(r.URL.Path, "/finalize-order/"):
					s.finalizes.Add(1)
				}
			}
			if gate := s.gate.Load(); gate != nil {
				(*gate)(r)
			}
			if opts.NoARI && r.URL.Path == wfe.DirectoryPath {
				serveWithoutARI(w, r, handler)
				return
			}
			handler.ServeHTTP(w, r)
		}),
		ErrorLog:          logger,
		ReadHeaderTimeout: time.Minute,
	}
	go func() { _ = s.srv.ServeTLS(l, certFile, keyFile) }()
	s.Directory = "https://" + l.Addr().String() + wfe.DirectoryPath
	t.Cleanup(s.Stop)
	return s
}

// serveWithoutARI serves Pebble's directory less its renewalInfo entry.
func serveWithoutARI(w http.ResponseWriter, r *http.Request, handler http.Handler) {
	rec := httptest.NewRecorder()
	handler.ServeHTTP(rec, r)
	var dir map[string]any
	if rec.Code != http.StatusOK || json.Unmarshal(rec.Body.Bytes(), &dir) != nil {
		http.Error(w, "the directory could not be read", http.StatusInternalServerError)
		return
	}
	delete(dir, "renewalInfo")
	maps.Copy(w.Header(), rec.Header())
	w.Header().Del("Content-Length")
	w.WriteHeader(http.StatusOK)
	_ = json.NewEncoder(w).Encode(dir)
}

// Stop ends the server: the directory refuses connections from then on.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		_ = s.srv.Close()
		s.dns.Shutdown()
	})
}

// Orders counts the new-order requests Pebble has received.
func (s *Server) Orders() int { return int(s.orders.Load()) }

// Accounts counts the new-account requests Pebble has received.
func (s *Server) Accounts() int { return int(s.accounts.Load()) }

// Finalizes counts the finalize requests Pebble has received: one per
// certificate issued, or attempted.
func (s *Server) Finalizes() int { return int(s.finalizes.Load()) }

// Gate has gate see each ACME request before Pebble answers it, from its
// own goroutine; it may hold the request as long as it likes. nil removes
// it.
func (s *Server) Gate(gate func(*http.Request)) {
	if gate == nil {
		s.gate.Store(nil)
		return
	}
	s.gate.Store(&gate)
}

// Root is the root certificate of the chains Pebble issues.
func (s *Server) Root() *x509.Certificate { return s.ca.GetRootCert(0).Cert }

// WriteRoot writes Root as a PEM file in dir and returns its path.
func (s *Server) WriteRoot(t testing.TB, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "pebble-root.pem")
	data := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Root().Raw})
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// testWriter sends Pebble's log to the test's log, and drops it once the
// test is over (Pebble's goroutines may still log).
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	defer func() { _ = recover() }() // a log line after the test ended
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var _ io.Writer = testWriter{}
