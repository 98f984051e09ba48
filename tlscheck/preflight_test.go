package tlscheck

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// memStorage is the part of certmagic's storage that the preflight reads.
type memStorage map[string][]byte

func (m memStorage) Load(_ context.Context, key string) ([]byte, error) {
	if b, ok := m[key]; ok {
		return b, nil
	}
	return nil, fs.ErrNotExist
}

func pemChain(chain ...*x509.Certificate) []byte {
	out := make([]byte, 0, 1024*len(chain))
	for _, c := range chain {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// fakeResolver answers every lookup with its addresses.
type fakeResolver []string

func (r fakeResolver) LookupIPAddr(context.Context, string) ([]net.IPAddr, error) {
	if len(r) == 0 {
		return nil, &net.DNSError{Err: "no such host", IsNotFound: true}
	}
	addrs := make([]net.IPAddr, 0, len(r))
	for _, a := range r {
		addrs = append(addrs, net.IPAddr{IP: net.ParseIP(a)})
	}
	return addrs, nil
}

// preflightFixture is a preflight for proxyHost over a fake certificate
// cache, storage and DNS, checking against testPKI's list.
type preflightFixture struct {
	*preflight
	pki     *testPKI
	cache   map[string][][]*x509.Certificate
	store   memStorage
	logs    *observer.ObservedLogs
	reports []Report
}

func newPreflightFixture(t *testing.T) *preflightFixture {
	core, logs := observer.New(zapcore.DebugLevel)
	f := &preflightFixture{pki: newTestPKI(t), cache: map[string][][]*x509.Certificate{}, store: memStorage{}, logs: logs}
	f.preflight = newPreflight([]string{"XKS.example.com."}, zap.New(core), func(r Report) { f.reports = append(f.reports, r) })
	f.opts = CheckOptions{TrustedRoots: f.pki.trusted, Roots: f.pki.roots}
	f.cached = func(host string) [][]*x509.Certificate { return f.cache[host] }
	f.storage = f.store
	f.resolver = fakeResolver{"192.0.2.10", "2001:db8::10"}
	return f
}

func (f *preflightFixture) emit(t *testing.T, name string, data map[string]any) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	e, err := caddy.NewEvent(ctx, name, data)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Handle(ctx, e); err != nil {
		t.Fatalf("Handle(%s) = %v; it must never abort an event", name, err)
	}
}

func (f *preflightFixture) goodChain(t *testing.T) []*x509.Certificate {
	return []*x509.Certificate{f.pki.server(t, f.pki.listedIntermediate, leafSpec{cn: proxyHost, dnsNames: []string{proxyHost}}), f.pki.listedIntermediate.cert}
}

func (f *preflightFixture) x2Chain(t *testing.T) []*x509.Certificate {
	return []*x509.Certificate{f.pki.server(t, f.pki.unlistedIntermediate, leafSpec{cn: proxyHost, dnsNames: []string{proxyHost}}), f.pki.unlistedIntermediate.cert}
}

func TestPreflightAtStart(t *testing.T) {
	f := newPreflightFixture(t)
	f.cache[proxyHost] = [][]*x509.Certificate{f.x2Chain(t)}
	f.emit(t, "started", nil)

	warnings := f.logs.FilterLevelExact(zapcore.WarnLevel).All()
	if len(warnings) != 1 {
		t.Fatalf("%d warnings, want 1 for the chain to ISRG Root X2: %v", len(warnings), f.logs.All())
	}
	w := warnings[0]
	fields := w.ContextMap()
	if !strings.Contains(w.Message, "AWS KMS would refuse") || fields["rule"] != string(RuleTrustedRoot) ||
		!strings.Contains(fields["fix"].(string), "key_type rsa2048") || fields["hostname"] != proxyHost {
		t.Errorf("warning does not say what and how to fix: %s %v", w.Message, fields)
	}
	if len(f.reports) != 1 || len(f.reports[0].Problems) != 1 || f.reports[0].NotAfter.IsZero() {
		t.Fatalf("reports %+v, want one with the problem and the expiry", f.reports)
	}

	// The same chain again (another event, or the cache lookup by a
	// wildcard) is not reported twice.
	f.emit(t, "cached_managed_cert", map[string]any{"sans": []string{proxyHost}})
	if n := f.logs.FilterLevelExact(zapcore.WarnLevel).Len(); n != 1 || len(f.reports) != 1 {
		t.Fatalf("after a second event: %d warnings, %d reports; want the chain checked once", n, len(f.reports))
	}
}

func TestPreflightGoodChain(t *testing.T) {
	f := newPreflightFixture(t)
	f.cache[proxyHost] = [][]*x509.Certificate{f.goodChain(t)}
	f.emit(t, "cached_unmanaged_cert", map[string]any{"sans": []string{proxyHost}})
	if n := f.logs.FilterLevelExact(zapcore.WarnLevel).Len(); n != 0 {
		t.Fatalf("%d warnings for a good chain: %v", n, f.logs.All())
	}
	if n := f.logs.FilterMessageSnippet("meets AWS KMS's requirements").Len(); n != 1 {
		t.Fatalf("%d info lines, want 1", n)
	}
	if len(f.reports) != 1 || f.reports[0].Problems != nil {
		t.Fatalf("reports %+v, want one without problems", f.reports)
	}
}

func TestPreflightAfterRenewal(t *testing.T) {
	f := newPreflightFixture(t)
	f.cache[proxyHost] = [][]*x509.Certificate{f.goodChain(t)}
	f.emit(t, "started", nil)

	// certmagic emits cert_obtained before the renewed certificate is in
	// its cache: the cache still holds the old one, storage the new.
	renewed := f.x2Chain(t)
	f.store["certificates/acme/xks.example.com/xks.example.com.crt"] = pemChain(renewed...)
	other := f.pki.server(t, f.pki.unlistedIntermediate, leafSpec{cn: "www.example.com", dnsNames: []string{"www.example.com"}})
	f.store["certificates/acme/www.example.com/www.example.com.crt"] = pemChain(other, f.pki.unlistedIntermediate.cert)

	f.emit(t, "cert_obtained", map[string]any{"renewal": true, "identifier": "www.example.com",
		"certificate_path": "certificates/acme/www.example.com/www.example.com.crt"})
	f.emit(t, "cert_obtained", map[string]any{"renewal": true, "identifier": proxyHost,
		"certificate_path": "certificates/acme/xks.example.com/xks.example.com.crt"})
	f.emit(t, "cert_obtained", map[string]any{"identifier": proxyHost, "certificate_path": "missing.crt"})

	if len(f.reports) != 2 {
		t.Fatalf("%d reports, want the one at start and the renewed chain's (not another site's)", len(f.reports))
	}
	r := f.reports[1]
	if !r.Chain[0].Equal(renewed[0]) || !slices.ContainsFunc(r.Problems, func(p Problem) bool { return p.Rule == RuleTrustedRoot }) {
		t.Fatalf("report after renewal %+v, want the renewed chain with its root problem", r)
	}
	if n := f.logs.FilterMessageSnippet("reading an obtained certificate").Len(); n != 1 {
		t.Errorf("%d debug lines for the unreadable certificate, want 1", n)
	}
}

func TestWatchAddsHostnames(t *testing.T) {
	f := newPreflightFixture(t)
	f.cache[proxyHost] = [][]*x509.Certificate{f.goodChain(t)}
	w := &Watcher{p: newPreflight(nil, f.preflight.logger, f.preflight.onReport)}
	w.p.cached, w.p.opts, w.p.resolver = f.cached, f.opts, f.resolver
	w.Watch("XKS.example.com")
	w.Watch("xks.example.com.")
	w.Watch("XKS.example.com")
	if got := w.p.names(); len(got) != 1 || got[0] != "xks.example.com" {
		t.Fatalf("watched names %v", got)
	}
	if len(f.reports) != 1 {
		t.Fatalf("%d reports after watching a served name, want 1", len(f.reports))
	}
}

func TestParsePEMChain(t *testing.T) {
	p := newTestPKI(t)
	chain, err := parsePEMChain(append(pemChain(p.listedIntermediate.cert, p.listed.cert), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"...))
	if err != nil || len(chain) != 2 || !chain[0].Equal(p.listedIntermediate.cert) {
		t.Fatalf("chain of %d, %v", len(chain), err)
	}
	if _, err := parsePEMChain([]byte("not PEM")); err == nil {
		t.Fatal("no error for data without certificates")
	}
	bad := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")})
	if _, err := parsePEMChain(bad); err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("error %v for a malformed certificate", err)
	}
}

// TestPreflightIPv6Only: KMS cannot reach a proxy over IPv6, so a name
// with AAAA records only is reported, once; a name with an A record, or
// none yet, is not.
func TestPreflightIPv6Only(t *testing.T) {
	tests := []struct {
		name  string
		addrs fakeResolver
		warn  bool
	}{
		{"IPv4 and IPv6", fakeResolver{"192.0.2.10", "2001:db8::10"}, false},
		{"IPv4 only", fakeResolver{"192.0.2.10"}, false},
		{"IPv6 only", fakeResolver{"2001:db8::10", "2001:db8::11"}, true},
		{"no record yet", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newPreflightFixture(t)
			f.resolver = tt.addrs
			f.cache[proxyHost] = [][]*x509.Certificate{f.goodChain(t)}
			f.emit(t, "started", nil)
			f.cache[proxyHost] = append(f.cache[proxyHost], f.goodChain(t)) // a renewal: the name is not looked up again
			f.emit(t, "cached_managed_cert", nil)
			var rules []Rule
			for _, r := range f.reports {
				for _, p := range r.Problems {
					rules = append(rules, p.Rule)
				}
			}
			if want := tt.warn; slices.Contains(rules, RuleIPv4) != want || len(rules) > 1 {
				t.Fatalf("rules %v; want an ipv4 problem: %v, at most once", rules, want)
			}
		})
	}
}

// TestPreflightCertFailed: a certificate that cannot be obtained leaves a
// watched name without one, which is said once; a failed renewal of a
// served certificate is said too.
func TestPreflightCertFailed(t *testing.T) {
	f := newPreflightFixture(t)
	failed := map[string]any{"renewal": false, "identifier": proxyHost, "error": errors.New("connection refused")}
	f.emit(t, "cert_failed", failed)
	f.emit(t, "cert_failed", failed)
	f.emit(t, "cert_failed", map[string]any{"renewal": false, "identifier": "other.example.com", "error": errors.New("x")})
	if len(f.reports) != 1 || f.reports[0].Chain != nil || len(f.reports[0].Problems) != 1 ||
		f.reports[0].Problems[0].Rule != RuleCertificate || !strings.Contains(f.reports[0].Problems[0].What, "connection refused") {
		t.Fatalf("reports %+v, want one: no certificate for %s, with the reason", f.reports, proxyHost)
	}
	if w := f.logs.FilterLevelExact(zapcore.WarnLevel).FilterMessageSnippet("no certificate is served for xks.example.com").Len(); w != 1 {
		t.Fatalf("%d warnings about the missing certificate, want 1", w)
	}

	f.cache[proxyHost] = [][]*x509.Certificate{f.goodChain(t)}
	f.emit(t, "cert_failed", map[string]any{"renewal": true, "identifier": proxyHost, "remaining": 48 * time.Hour, "error": errors.New("rate limited")})
	last := f.reports[len(f.reports)-1]
	if len(f.reports) != 2 || last.Problems[0].Rule != RuleValidity || !strings.Contains(last.Problems[0].What, "48h0m0s left") {
		t.Fatalf("reports %+v, want the failed renewal with the time left", f.reports)
	}
}

// TestWatchIsBounded: names seen in requests are watched up to
// MaxLearnedHostnames, then no more (one warning says so); names already
// watched, configured ones among them, stay cheap.
func TestWatchIsBounded(t *testing.T) {
	f := newPreflightFixture(t)
	w := &Watcher{p: f.preflight}
	for i := range MaxLearnedHostnames + 8 {
		w.Watch(fmt.Sprintf("h%d.example.com", i))
	}
	w.Watch(proxyHost)
	if got := len(w.p.names()); got != 1+MaxLearnedHostnames {
		t.Fatalf("%d names watched, want the configured one and %d learned", got, MaxLearnedHostnames)
	}
	if n := f.logs.FilterMessageSnippet("not checking the certificates of more server names").Len(); n != 1 {
		t.Fatalf("%d warnings about the cap, want 1", n)
	}
	n := 0
	w.seen.Range(func(any, any) bool { n++; return true })
	if n > 1+MaxLearnedHostnames {
		t.Fatalf("the fast-path map holds %d names: it grows with names that are not watched", n)
	}
}

// TestWatchIsBoundedAcrossSpellings: the spellings of a name (case, a
// trailing dot) are one name, in the names watched and in the fast-path
// map: a client that sends every spelling of two names grows neither.
func TestWatchIsBoundedAcrossSpellings(t *testing.T) {
	f := newPreflightFixture(t)
	w := &Watcher{p: f.preflight}
	names := []string{"xks.example.com", "other.example.com"}
	spellings := 0
	for _, name := range names {
		// Every case of the first 12 letters, with and without the dot.
		for mask := range 1 << 12 {
			b := []byte(name)
			for i := range 12 {
				if mask&(1<<i) != 0 && b[i] >= 'a' && b[i] <= 'z' {
					b[i] -= 'a' - 'A'
				}
			}
			w.Watch(string(b))
			w.Watch(string(b) + ".")
			spellings += 2
		}
	}
	if got := w.p.names(); len(got) != len(names) {
		t.Fatalf("%d spellings of %d names: watched %v", spellings, len(names), got)
	}
	n := 0
	w.seen.Range(func(any, any) bool { n++; return true })
	if n != len(names) {
		t.Fatalf("%d spellings of %d names: the fast-path map holds %d entries, want %d", spellings, len(names), n, len(names))
	}
}
