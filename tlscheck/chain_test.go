package tlscheck

import (
	"crypto/x509"
	"slices"
	"strings"
	"testing"
	"time"
)

const proxyHost = "xks.example.com"

// testPKI is a small Web PKI: a root KMS trusts (listed), one it does not
// (unlisted), each with an intermediate, and a pool of both roots standing
// in for the system's roots.
type testPKI struct {
	listed, unlisted                         *testCA
	listedIntermediate, unlistedIntermediate *testCA
	roots                                    *x509.CertPool
	trusted                                  RootList
}

func newTestPKI(t *testing.T) *testPKI {
	p := &testPKI{
		listed:   newRootCA(t, "ISRG Root X1"),
		unlisted: newRootCA(t, "ISRG Root X2"),
	}
	p.listedIntermediate = p.listed.intermediate(t, "R11")
	p.unlistedIntermediate = p.unlisted.intermediate(t, "E6")
	p.roots = x509.NewCertPool()
	p.roots.AddCert(p.listed.cert)
	p.roots.AddCert(p.unlisted.cert)
	p.trusted = RootList{FingerprintOf(p.listed.cert.Raw): "CN=ISRG Root X1"}
	return p
}

func (p *testPKI) server(t *testing.T, ca *testCA, spec leafSpec) *x509.Certificate {
	spec.usage = x509.ExtKeyUsageServerAuth
	c, _ := ca.leaf(t, spec)
	return c
}

func TestCheckChain(t *testing.T) {
	p := newTestPKI(t)
	named := leafSpec{cn: proxyHost, dnsNames: []string{proxyHost}}
	good := p.server(t, p.listedIntermediate, named)
	// The unlisted root's intermediate, cross-signed by the listed root:
	// the same CA, with a second path to a root.
	crossSigned := p.listed.crossSign(t, p.unlistedIntermediate)
	viaUnlisted := p.server(t, p.unlistedIntermediate, named)
	selfSigned := func() *x509.Certificate {
		key := newKey(t)
		tmpl := caTemplate(proxyHost)
		tmpl.DNSNames = []string{proxyHost}
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		return sign(t, tmpl, key.Public(), nil, key)
	}()

	tests := []struct {
		name  string
		host  string // default proxyHost
		chain []*x509.Certificate
		roots *x509.CertPool // default p.roots
		now   time.Time
		want  []Rule
	}{
		{name: "a full chain to a listed root passes", chain: []*x509.Certificate{good, p.listedIntermediate.cert}},
		{name: "a chain that includes its listed root passes without system roots",
			chain: []*x509.Certificate{good, p.listedIntermediate.cert, p.listed.cert}, roots: x509.NewCertPool()},
		{name: "a hostname with a trailing dot and capitals passes", host: "XKS.example.com.",
			chain: []*x509.Certificate{good, p.listedIntermediate.cert}},
		{name: "a wildcard CN for one label passes",
			chain: []*x509.Certificate{p.server(t, p.listedIntermediate, leafSpec{cn: "*.example.com", dnsNames: []string{"*.example.com"}}), p.listedIntermediate.cert}},
		{name: "a cross-signed chain with one path to a listed root passes",
			chain: []*x509.Certificate{viaUnlisted, crossSigned, p.unlistedIntermediate.cert}},
		{name: "a chain to an unlisted root fails",
			chain: []*x509.Certificate{viaUnlisted, p.unlistedIntermediate.cert}, want: []Rule{RuleTrustedRoot}},
		{name: "a chain without its intermediate fails", chain: []*x509.Certificate{good}, want: []Rule{RuleChain}},
		{name: "a full chain to a root known nowhere is the root's problem, not the chain's",
			chain: []*x509.Certificate{viaUnlisted, p.unlistedIntermediate.cert}, roots: x509.NewCertPool(), want: []Rule{RuleTrustedRoot}},
		{name: "a self-signed certificate fails", chain: []*x509.Certificate{selfSigned}, want: []Rule{RuleTrustedRoot}},
		{name: "no certificate fails", want: []Rule{RuleCertificate}},
		{name: "another CN fails",
			chain: []*x509.Certificate{p.server(t, p.listedIntermediate, leafSpec{cn: "www.example.com", dnsNames: []string{"www.example.com", proxyHost}}), p.listedIntermediate.cert},
			want:  []Rule{RuleCommonName}},
		{name: "a missing CN fails",
			chain: []*x509.Certificate{p.server(t, p.listedIntermediate, leafSpec{dnsNames: []string{proxyHost}}), p.listedIntermediate.cert},
			want:  []Rule{RuleCommonName}},
		{name: "a wildcard CN for two labels fails", host: "a." + proxyHost,
			chain: []*x509.Certificate{p.server(t, p.listedIntermediate, leafSpec{cn: "*.example.com", dnsNames: []string{"*.example.com"}}), p.listedIntermediate.cert},
			want:  []Rule{RuleHostname, RuleCommonName}},
		{name: "a CN without the name in the SANs fails",
			chain: []*x509.Certificate{p.server(t, p.listedIntermediate, leafSpec{cn: proxyHost, dnsNames: []string{"www.example.com"}}), p.listedIntermediate.cert},
			want:  []Rule{RuleHostname}},
		{name: "an IP address as hostname fails", host: "192.0.2.1",
			chain: []*x509.Certificate{good, p.listedIntermediate.cert}, want: []Rule{RuleHostname, RuleCommonName}},
		{name: "an expired certificate fails on validity only", now: time.Now().Add(2 * time.Hour),
			chain: []*x509.Certificate{good, p.listedIntermediate.cert}, want: []Rule{RuleValidity}},
		{name: "a certificate not yet valid fails", now: time.Now().Add(-2 * time.Hour),
			chain: []*x509.Certificate{good, p.listedIntermediate.cert}, want: []Rule{RuleValidity}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			host, roots := tt.host, tt.roots
			if host == "" {
				host = proxyHost
			}
			if roots == nil {
				roots = p.roots
			}
			problems := CheckChain(host, tt.chain, CheckOptions{TrustedRoots: p.trusted, Roots: roots, Now: tt.now})
			var got []Rule
			for _, pr := range problems {
				got = append(got, pr.Rule)
				if pr.What == "" || pr.Fix == "" {
					t.Errorf("problem without what or fix: %+v", pr)
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("rules %v, want %v; problems:\n%s", got, tt.want, problemList(problems))
			}
		})
	}
}

// TestCheckChainRootLists: with KMS's two lists (not a single trusted
// list), a chain's verdict depends on which lists name its root.
func TestCheckChainRootLists(t *testing.T) {
	named := leafSpec{cn: proxyHost, dnsNames: []string{proxyHost}}
	roots := x509.NewCertPool()
	lists := map[Fingerprint]KMSRoot{}
	chainTo := func(name string, on RootLists) []*x509.Certificate {
		root := newRootCA(t, name)
		roots.AddCert(root.cert)
		if on != 0 {
			lists[FingerprintOf(root.cert.Raw)] = KMSRoot{Subject: "CN=" + name, Lists: on, Certificate: root.cert}
		}
		inter := root.intermediate(t, name+" intermediate")
		leaf, _ := inter.leaf(t, leafSpec{cn: named.cn, dnsNames: named.dnsNames, usage: x509.ExtKeyUsageServerAuth})
		return []*x509.Certificate{leaf, inter.cert}
	}
	// A root on a list whose certificate is not carried: only its name is
	// known.
	uncarried := newRootCA(t, "Uncarried Root")
	lists[Fingerprint{1}] = KMSRoot{Subject: "CN=Uncarried Root, O=Example", Lists: List2022 | List2024}
	uncarriedInter := uncarried.intermediate(t, "Uncarried intermediate")
	uncarriedLeaf, _ := uncarriedInter.leaf(t, leafSpec{cn: named.cn, dnsNames: named.dnsNames, usage: x509.ExtKeyUsageServerAuth})

	tests := []struct {
		name  string
		chain []*x509.Certificate
		want  []Rule
	}{
		{"a root on both lists is accepted", chainTo("Both Root", List2022|List2024), nil},
		{"a root on the 2022 list only is accepted today, being removed", chainTo("Old Root", List2022), []Rule{RuleRootBeingRemoved}},
		{"a root on the 2024 list only is likely accepted", chainTo("New Root", List2024), []Rule{RuleRootUnconfirmed}},
		{"a root on neither list is refused", chainTo("Private Root", 0), []Rule{RuleTrustedRoot}},
		{"a listed root whose certificate is not carried is unconfirmed", []*x509.Certificate{uncarriedLeaf, uncarriedInter.cert}, []Rule{RuleRootUnconfirmed}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			problems := CheckChain(proxyHost, tt.chain, CheckOptions{Lists: lists, Roots: roots})
			var got []Rule
			for _, pr := range problems {
				got = append(got, pr.Rule)
				if pr.Rule.Refused() != (pr.Rule == RuleTrustedRoot) {
					t.Errorf("rule %s: Refused() = %v", pr.Rule, pr.Rule.Refused())
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("rules %v, want %v; problems:\n%s", got, tt.want, problemList(problems))
			}
		})
	}
}

func problemList(problems []Problem) string {
	var b strings.Builder
	for _, p := range problems {
		b.WriteString("\t" + string(p.Rule) + ": " + p.String() + "\n")
	}
	return b.String()
}

// TestCheckChainAdvice checks that the problems say what to change in the
// words a Caddy user needs.
func TestCheckChainAdvice(t *testing.T) {
	p := newTestPKI(t)
	named := leafSpec{cn: proxyHost, dnsNames: []string{proxyHost}}
	check := func(chain ...*x509.Certificate) string {
		return problemList(CheckChain(proxyHost, chain, CheckOptions{TrustedRoots: p.trusted, Roots: p.roots}))
	}
	tests := []struct {
		name, got string
		want      []string
	}{
		{
			name: "ISRG Root X2",
			got:  check(p.server(t, p.unlistedIntermediate, named), p.unlistedIntermediate.cert),
			want: []string{"CN=ISRG Root X2", "KMS's 2022 list trusts ISRG Root X1 but not ISRG Root X2", "key_type rsa2048", `root_common_name "ISRG Root X1"`},
		},
		{
			name: "missing CN",
			got:  check(p.server(t, p.listedIntermediate, leafSpec{dnsNames: []string{proxyHost}}), p.listedIntermediate.cert),
			want: []string{"no subject common name", "classic profile"},
		},
		{
			name: "missing intermediate",
			got:  check(p.server(t, p.listedIntermediate, named)),
			want: []string{"serve the full chain", `issued by "R11"`},
		},
		{
			name: "full chain to an unknown root names the root, not the chain",
			got: problemList(CheckChain(proxyHost, []*x509.Certificate{p.server(t, p.unlistedIntermediate, named), p.unlistedIntermediate.cert},
				CheckOptions{TrustedRoots: p.trusted, Roots: x509.NewCertPool()})),
			want: []string{"trusted_root", "CN=ISRG Root X2", "a root that is not among the roots KMS trusts"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, w := range tt.want {
				if !strings.Contains(tt.got, w) {
					t.Errorf("problems do not say %q:\n%s", w, tt.got)
				}
			}
		})
	}
}

func TestCommonNameMatches(t *testing.T) {
	tests := []struct {
		cn, host string
		want     bool
	}{
		{"xks.example.com", "xks.example.com", true},
		{"XKS.Example.COM.", "xks.example.com", true},
		{"*.example.com", "xks.example.com", true},
		{"*.example.com", "a.xks.example.com", false},
		{"*.example.com", "example.com", false},
		{"*.", "xks", false},
		{"x*.example.com", "xks.example.com", false},
		{"example.com", "xks.example.com", false},
	}
	for _, tt := range tests {
		if got := commonNameMatches(tt.cn, tt.host); got != tt.want {
			t.Errorf("commonNameMatches(%q, %q) = %v, want %v", tt.cn, tt.host, got, tt.want)
		}
	}
}
