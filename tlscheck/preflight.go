package tlscheck

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"go.uber.org/zap"
)

// Report is the outcome of checking one certificate chain served for one
// of the proxy's hostnames.
type Report struct {
	// Hostname is the proxy hostname the chain was checked for.
	Hostname string
	// Chain is the chain as served, leaf first.
	Chain []*x509.Certificate
	// NotAfter is when the leaf certificate expires.
	NotAfter time.Time
	// Problems are the reasons AWS KMS would refuse the chain; none if it
	// would accept it.
	Problems []Problem
}

// Preflight checks, with CheckChain, each certificate chain that Caddy
// serves for hostnames: those loaded when the configuration starts, and
// each one obtained or renewed while it runs. Every problem is logged to
// logger as a warning that says what to change; a chain without problems
// gets one info line. Each distinct chain is checked once per hostname and
// configuration.
//
// Call it from a module's Provision with that module's context: it
// subscribes to Caddy's events (the configuration's "started", and the TLS
// app's "cached_managed_cert", "cached_unmanaged_cert" and "cert_obtained"),
// which must happen before the configuration starts, and needs nothing in
// the user's configuration. The subscriptions end with the configuration.
//
// hostnames may be empty and grow later with Watcher.Watch, for a module
// that learns its names from the requests it serves (their TLS server name).
//
// onReport, if not nil, is called with the outcome of every check, for
// example to export the leaf's expiry as a metric. It is called from Caddy's
// certificate management goroutines (and from Watch) and must not block.
func Preflight(ctx caddy.Context, hostnames []string, logger *zap.Logger, onReport func(Report)) (*Watcher, error) {
	appIface, err := ctx.App("events")
	if err != nil {
		return nil, fmt.Errorf("tlscheck: getting the events app: %w", err)
	}
	events := appIface.(*caddyevents.App)
	p := newPreflight(hostnames, logger, onReport)
	p.storage = ctx.Storage()
	p.done = ctx.Done()
	for _, name := range preflightEvents {
		if err := events.On(name, p); err != nil {
			return nil, fmt.Errorf("tlscheck: subscribing to %s events: %w", name, err)
		}
	}
	return &Watcher{p: p}, nil
}

// Watcher adds hostnames to a running preflight.
type Watcher struct {
	p    *preflight
	seen sync.Map // hostname, lower case without a trailing dot -> struct{}: the fast path of Watch

	learned int  // hostnames added by Watch; guarded by p.mu
	capped  bool // the cap was reached and said so; guarded by p.mu
}

// MaxLearnedHostnames bounds the hostnames Watch adds to those configured:
// each costs a check, log lines and a metric series, so a name given by a
// client must not grow them without end.
const MaxLearnedHostnames = 32

// Watch checks the chains served for hostname now, if it is new, and after
// every renewal from then on. It is cheap for a hostname already watched,
// so it may be called on every request; call it only for requests that
// were authenticated, since the name comes from the client (its TLS server
// name). At most MaxLearnedHostnames names are added.
//
// A name is watched, and remembered, in the form certificates match it in:
// lower case, without a trailing dot. Go keeps the case the client sent,
// so keyed on that, the spellings of one name (XKS.example.com,
// xKs.example.com., ...) each took an entry: 200,000 of them, 30 MiB.
func (w *Watcher) Watch(hostname string) {
	host := strings.TrimSuffix(strings.ToLower(hostname), ".")
	if host == "" {
		return
	}
	if _, ok := w.seen.Load(host); ok {
		return
	}
	w.p.mu.Lock()
	known := slices.Contains(w.p.hostnames, host)
	full := !known && w.learned >= MaxLearnedHostnames
	sayFull := full && !w.capped
	if full {
		w.capped = true
	} else if !known {
		w.p.hostnames = append(w.p.hostnames, host)
		w.learned++
	}
	w.p.mu.Unlock()
	if full {
		if sayFull {
			w.p.logger.Warn("not checking the certificates of more server names seen in requests; list the proxy's names in the xks hostnames option",
				zap.Int("learned", MaxLearnedHostnames))
		}
		return
	}
	w.seen.Store(host, struct{}{})
	if !known {
		for _, chain := range w.p.cached(host) {
			w.p.check(host, chain)
		}
	}
}

// names returns the hostnames watched so far.
func (p *preflight) names() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.hostnames)
}

// preflightEvents are the events after which the served chains may have
// changed. certmagic emits cert_obtained before it swaps a renewed
// certificate into its cache, so that one is read from storage; cert_failed
// says that a certificate could not be obtained or renewed.
var preflightEvents = []string{"started", "cached_managed_cert", "cached_unmanaged_cert", "cert_obtained", "cert_failed"}

// Resolver looks up a hostname's addresses; net.DefaultResolver is one.
type Resolver interface {
	LookupIPAddr(ctx context.Context, host string) ([]net.IPAddr, error)
}

// DefaultResolver is the resolver Preflight looks hostnames up with. Tests
// that run a proxy for names that must not reach a real DNS server replace
// it before Caddy starts.
var DefaultResolver Resolver = net.DefaultResolver

// resolveTimeout bounds the preflight's DNS lookup of a hostname.
const resolveTimeout = 10 * time.Second

// preflight is the events handler behind Preflight.
type preflight struct {
	hostnames []string
	logger    *zap.Logger
	onReport  func(Report)
	opts      CheckOptions

	// cached returns the chains in Caddy's certificate cache for a name.
	cached func(hostname string) [][]*x509.Certificate
	// storage is where certmagic keeps obtained certificates.
	storage interface {
		Load(ctx context.Context, key string) ([]byte, error)
	}
	// resolver looks the hostnames up, once each, to warn of a name that
	// KMS cannot reach.
	resolver Resolver
	// done is closed when the configuration ends: events that certmagic
	// emits after that (a retry that fails while Caddy stops) are ignored.
	done <-chan struct{}

	mu   sync.Mutex
	seen map[string]bool // hostname + leaf fingerprint, or hostname + what was reported
}

func newPreflight(hostnames []string, logger *zap.Logger, onReport func(Report)) *preflight {
	p := &preflight{logger: logger, onReport: onReport, cached: cachedChains, resolver: DefaultResolver, seen: make(map[string]bool)}
	for _, h := range hostnames {
		p.hostnames = append(p.hostnames, strings.TrimSuffix(strings.ToLower(h), "."))
	}
	return p
}

// Handle checks the chains an event may have changed. It never returns an
// error: a warning must not abort certificate management.
func (p *preflight) Handle(ctx context.Context, e caddy.Event) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	switch e.Name() {
	case "cert_failed":
		p.certFailed(e.Data)
		return nil
	case "cert_obtained":
	default:
		p.checkCached()
		return nil
	}
	path, _ := e.Data["certificate_path"].(string)
	if path == "" || p.storage == nil {
		return nil
	}
	pemBytes, err := p.storage.Load(ctx, path)
	if err != nil {
		p.logger.Debug("reading an obtained certificate to check it for AWS KMS", zap.String("path", path), zap.Error(err))
		return nil
	}
	chain, err := parsePEMChain(pemBytes)
	if err != nil {
		p.logger.Warn("cannot check an obtained certificate for AWS KMS", zap.String("path", path), zap.Error(err))
		return nil
	}
	for _, host := range p.names() {
		// The event is for any certificate Caddy manages; check only
		// those meant for the proxy.
		if chain[0].VerifyHostname(host) == nil || commonNameMatches(chain[0].Subject.CommonName, host) {
			p.check(host, chain)
		}
	}
	return nil
}

// certFailed reports a watched hostname whose certificate could not be
// obtained, when none is served for it, or not renewed.
func (p *preflight) certFailed(data map[string]any) {
	identifier, _ := data["identifier"].(string)
	renewal, _ := data["renewal"].(bool)
	cause, _ := data["error"].(error)
	reason := "unknown error"
	if cause != nil {
		reason = cause.Error()
	}
	for _, host := range p.names() {
		if !nameCovers(identifier, host) {
			continue
		}
		chains := p.cached(host)
		var problem Problem
		switch {
		case len(chains) == 0:
			problem = Problem{
				Rule: RuleCertificate,
				What: fmt.Sprintf("no certificate is served for %s: obtaining one failed: %s", host, reason),
				Fix:  "make sure the ACME CA is reachable and that the name resolves to this proxy from the internet (ports 80 and 443 open); Caddy keeps trying",
			}
		case renewal:
			remaining, _ := data["remaining"].(time.Duration)
			problem = Problem{
				Rule: RuleValidity,
				What: fmt.Sprintf("the certificate for %s could not be renewed (%s left): %s", host, remaining.Round(time.Minute), reason),
				Fix:  "make sure the ACME CA is reachable; Caddy keeps trying, and KMS stops connecting when the certificate expires",
			}
		default:
			continue
		}
		if p.firstTime(host + " " + string(problem.Rule) + " failed") {
			p.report(host, nil, []Problem{problem})
		}
	}
}

// nameCovers reports whether a certificate identifier (a name or a
// wildcard) covers host.
func nameCovers(identifier, host string) bool {
	identifier = strings.TrimSuffix(strings.ToLower(identifier), ".")
	return identifier == host || commonNameMatches(identifier, host)
}

// firstTime records key and reports whether it is new.
func (p *preflight) firstTime(key string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.seen[key] {
		return false
	}
	p.seen[key] = true
	return true
}

func (p *preflight) checkCached() {
	for _, host := range p.names() {
		for _, chain := range p.cached(host) {
			p.check(host, chain)
		}
	}
}

// check runs CheckChain on a chain not checked before for host, logs the
// outcome and reports it.
func (p *preflight) check(host string, chain []*x509.Certificate) {
	leaf := chain[0]
	if !p.firstTime(host + " " + FingerprintOf(leaf.Raw).String()) {
		return
	}
	problems := CheckChain(host, chain, p.opts)
	if p.firstTime(host + " resolved") {
		if pr := p.checkAddresses(host); pr != nil {
			problems = append(problems, *pr)
		}
	}
	p.report(host, chain, problems)
}

// report logs the outcome of a check of host (chain is nil when none is
// served) and hands it to onReport.
func (p *preflight) report(host string, chain []*x509.Certificate, problems []Problem) {
	fields := []zap.Field{zap.String("hostname", host)}
	r := Report{Hostname: host, Chain: chain, Problems: problems}
	if len(chain) > 0 {
		leaf := chain[0]
		r.NotAfter = leaf.NotAfter
		fields = append(fields,
			zap.String("subject", leaf.Subject.String()),
			zap.String("issuer", leaf.Issuer.String()),
			zap.Time("not_after", leaf.NotAfter),
		)
		if len(problems) == 0 {
			p.logger.Info("server certificate chain meets AWS KMS's requirements for an XKS proxy", fields...)
		}
	}
	for _, pr := range problems {
		verdict := "AWS KMS would refuse this server certificate: "
		if !pr.Rule.Refused() {
			verdict = "AWS KMS may refuse this server certificate: "
		}
		p.logger.Warn(verdict+pr.What, append(fields, zap.String("rule", string(pr.Rule)), zap.String("fix", pr.Fix))...)
	}
	if p.onReport != nil {
		p.onReport(r)
	}
}

// checkAddresses warns of a hostname that resolves to IPv6 addresses only:
// KMS connects to an XKS proxy over IPv4. A name that does not resolve
// (yet) is not reported: the certificate can come before the DNS record.
func (p *preflight) checkAddresses(host string) *Problem {
	if p.resolver == nil || net.ParseIP(host) != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), resolveTimeout)
	defer cancel()
	addrs, err := p.resolver.LookupIPAddr(ctx, host)
	if err != nil || len(addrs) == 0 {
		p.logger.Debug("looking up the proxy's hostname", zap.String("hostname", host), zap.Error(err))
		return nil
	}
	for _, a := range addrs {
		if a.IP.To4() != nil {
			return nil
		}
	}
	return &Problem{
		Rule: RuleIPv4,
		What: fmt.Sprintf("%s resolves only to IPv6 addresses (%s); KMS connects to an XKS proxy over IPv4", host, addrs[0].IP),
		Fix:  "publish an A record for the name, or put the proxy behind an endpoint with an IPv4 address",
	}
}

// cachedChains returns the chains in Caddy's certificate cache that could be
// served for hostname.
func cachedChains(hostname string) (chains [][]*x509.Certificate) {
	// Once no TLS app runs (Caddy is stopping), Caddy's certificate cache
	// is gone and a lookup in it dereferences nil: there is nothing to
	// check then, and a check must never bring the process down.
	defer func() {
		if recover() != nil {
			chains = nil
		}
	}()
	for _, cert := range caddytls.AllMatchingCertificates(hostname) {
		chain := make([]*x509.Certificate, 0, len(cert.Certificate.Certificate))
		for _, der := range cert.Certificate.Certificate {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				chain = nil
				break
			}
			chain = append(chain, c)
		}
		if len(chain) > 0 {
			chains = append(chains, chain)
		}
	}
	return chains
}

// parsePEMChain parses the certificates of a PEM bundle, in order.
func parsePEMChain(pemBytes []byte) ([]*x509.Certificate, error) {
	var chain []*x509.Certificate
	for block, rest := pem.Decode(pemBytes); block != nil; block, rest = pem.Decode(rest) {
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing certificate %d: %w", len(chain)+1, err)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		return nil, errors.New("no certificate in PEM data")
	}
	return chain, nil
}

// Interface guards
var _ caddyevents.Handler = (*preflight)(nil)
