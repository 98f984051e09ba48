package tlscheck

import (
	"crypto/x509"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// preflightProbe is an HTTP handler that does what the XKS handler does
// with Preflight, and hands the reports to the test.
type preflightProbe struct {
	Hostnames []string `json:"hostnames,omitempty"`
}

var probeReports = make(chan Report, 16)

func init() { caddy.RegisterModule(new(preflightProbe)) }

func (*preflightProbe) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.tlscheck_preflight_probe",
		New: func() caddy.Module { return new(preflightProbe) },
	}
}

func (p *preflightProbe) Provision(ctx caddy.Context) error {
	_, err := Preflight(ctx, p.Hostnames, ctx.Logger(), func(r Report) {
		select {
		case probeReports <- r:
		default: // a report must never block Caddy
		}
	})
	return err
}

func (p *preflightProbe) ServeHTTP(w http.ResponseWriter, _ *http.Request, _ caddyhttp.Handler) error {
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// preflightConfig serves localhost on the proxy's ports with the probe;
// %[5]s is the tls app.
const preflightConfig = `{
	"admin": {"listen": "unix/%[1]s", "config": {"persist": false}},
	"storage": {"module": "file_system", "root": %[4]q},
	"apps": {
		"http": {
			"http_port": %[2]d,
			"https_port": %[3]d,
			"servers": {
				"srv0": {
					"listen": [":%[3]d"],
					"routes": [{
						"match": [{"host": ["localhost"]}],
						"handle": [{"handler": "tlscheck_preflight_probe", "hostnames": ["localhost"]}]
					}]
				}
			}
		},
		"pki": {"certificate_authorities": {"local": {"install_trust": false}}},
		"tls": %[5]s
	}
}`

// awaitReport waits for a report on a chain whose leaf matches.
func awaitReport(t *testing.T, match func(leaf *x509.Certificate) bool) Report {
	t.Helper()
	timeout := time.After(2 * time.Minute)
	for {
		select {
		case r := <-probeReports:
			if match(r.Chain[0]) {
				return r
			}
		case <-timeout:
			t.Fatal("no preflight report within 2 minutes")
		}
	}
}

// TestPreflightInCaddy runs Preflight in a real Caddy: for a certificate
// loaded from files when the configuration starts, and for one that Caddy
// obtains (from its internal CA) while running.
func TestPreflightInCaddy(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Caddy server")
	}
	dir := t.TempDir()
	p := proxytest.New(t)
	load := func(tlsApp string) {
		p.LoadJSON([]byte(fmt.Sprintf(preflightConfig, p.AdminSocket, p.HTTPPort, p.HTTPSPort, p.Storage, tlsApp)))
	}

	t.Run("a loaded certificate is checked at start", func(t *testing.T) {
		root := newRootCA(t, "XKS test private root")
		leaf, key := root.leaf(t, leafSpec{cn: "localhost", dnsNames: []string{"localhost"}, usage: x509.ExtKeyUsageServerAuth})
		certFile := writePEM(t, dir, "loaded.pem", []*x509.Certificate{leaf, root.cert}, nil)
		keyFile := writePEM(t, dir, "loaded-key.pem", nil, key)
		tlsApp := fmt.Sprintf(`{"certificates": {"load_files": [{"certificate": %q, "key": %q}]}}`, certFile, keyFile)
		load(tlsApp)

		r := awaitReport(t, leaf.Equal)
		if r.Hostname != "localhost" || !slices.ContainsFunc(r.Problems, func(p Problem) bool {
			return p.Rule == RuleTrustedRoot && strings.Contains(p.What, "XKS test private root")
		}) {
			t.Fatalf("report %+v, want the private root named as untrusted", r)
		}
	})

	t.Run("an obtained certificate is checked", func(t *testing.T) {
		tlsApp := `{"automation": {"policies": [{"subjects": ["localhost"], "issuers": [{"module": "internal"}]}]}}`
		load(tlsApp)

		r := awaitReport(t, func(leaf *x509.Certificate) bool {
			return strings.Contains(leaf.Issuer.CommonName, "Caddy Local Authority")
		})
		// Caddy's internal CA issues leaves without a CN, and its root is
		// on none of KMS's lists: the full chain is served, so the problem is
		// the root (rule trusted_root), not the chain.
		rules := make([]Rule, 0, len(r.Problems))
		for _, p := range r.Problems {
			rules = append(rules, p.Rule)
		}
		if !slices.Equal(rules, []Rule{RuleCommonName, RuleTrustedRoot}) || !strings.Contains(r.Problems[1].Fix, "Caddy's internal CA") {
			t.Fatalf("report %+v, want the missing CN and Caddy's internal CA refused with advice", r)
		}
	})
}
