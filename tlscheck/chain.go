package tlscheck

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"
)

// Rule names a requirement that AWS KMS places on an XKS proxy's server
// certificate chain.
type Rule string

// The rules CheckChain checks.
const (
	// RuleCertificate: a certificate is served for the proxy's hostname.
	RuleCertificate Rule = "certificate"
	// RuleValidity: the leaf certificate is within its validity period.
	RuleValidity Rule = "validity"
	// RuleCommonName: the leaf's subject CN is the proxy's hostname, or a
	// wildcard covering it. KMS checks the CN, not only the SANs.
	RuleCommonName Rule = "common_name"
	// RuleHostname: the hostname is a DNS name, and the leaf's subject
	// alternative names cover it (what every TLS client checks).
	RuleHostname Rule = "hostname"
	// RuleChain: the served chain leads from the leaf to a root.
	RuleChain Rule = "chain"
	// RuleTrustedRoot: a chain leads to a root on KMS's list.
	RuleTrustedRoot Rule = "trusted_root"
	// RuleIPv4: the proxy's hostname resolves to an IPv4 address; KMS
	// cannot reach a proxy over IPv6.
	RuleIPv4 Rule = "ipv4"
	// RuleRootBeingRemoved: the chain ends in a root that KMS's 2022 list
	// names and its newer list drops: accepted today, not for long.
	RuleRootBeingRemoved Rule = "root_being_removed"
	// RuleRootUnconfirmed: the chain ends in a root that only KMS's newer
	// list names, or in a listed root whose certificate the check does not
	// carry: KMS likely accepts it, which its connection test confirms.
	RuleRootUnconfirmed Rule = "root_unconfirmed"
)

// Refused reports whether a problem under this rule means KMS refuses the
// chain; the root-list rules only say that it may.
func (r Rule) Refused() bool {
	return r != RuleRootBeingRemoved && r != RuleRootUnconfirmed
}

// Problem is one reason AWS KMS would refuse a server certificate chain.
type Problem struct {
	// Rule is the requirement broken.
	Rule Rule
	// What says what is wrong with the chain.
	What string
	// Fix says what to change.
	Fix string
}

func (p Problem) String() string { return p.What + "; " + p.Fix }

// CheckOptions are what CheckChain checks a chain against. The zero value
// checks against KMS's list, the system's roots and the current time.
type CheckOptions struct {
	// TrustedRoots are the roots a chain must end in. Default: the roots
	// of KMS's lists (KMSRoots), where a root on the 2022 list only or on
	// the 2024 list only is reported as such rather than refused.
	TrustedRoots RootList

	// Lists are KMS's lists of roots, used when TrustedRoots is nil.
	// Default: KMSRoots().
	Lists map[Fingerprint]KMSRoot

	// Roots are the root certificates in which a served chain that stops
	// at an intermediate may end, used to find out which root that is.
	// Default: the certificates of KMS's listed roots that this package
	// carries; never the host's CA bundle, so that the verdict does not
	// depend on the image the proxy runs on.
	Roots *x509.CertPool

	// Now is the time at which the chain is checked. Default: time.Now().
	Now time.Time
}

// CheckChain returns the reasons for which AWS KMS would refuse chain as the
// server certificate chain of an XKS proxy at hostname, or nil if there are
// none. chain is the chain as served: the leaf first, then the
// intermediates, possibly the root. A cross-signed chain passes if any path
// through it ends in a trusted root.
func CheckChain(hostname string, chain []*x509.Certificate, opts CheckOptions) []Problem {
	if opts.Now.IsZero() {
		opts.Now = time.Now()
	}
	if opts.Lists == nil {
		opts.Lists = KMSRoots()
	}
	hostname = strings.TrimSuffix(strings.ToLower(hostname), ".")
	if len(chain) == 0 || chain[0] == nil {
		return []Problem{{
			Rule: RuleCertificate,
			What: fmt.Sprintf("no certificate is served for %s", hostname),
			Fix:  "configure a certificate for the proxy's hostname",
		}}
	}
	leaf := chain[0]
	var problems []Problem
	add := func(rule Rule, fix, what string, args ...any) {
		problems = append(problems, Problem{Rule: rule, What: fmt.Sprintf(what, args...), Fix: fix})
	}

	switch {
	case opts.Now.After(leaf.NotAfter):
		add(RuleValidity, "renew the certificate", "the certificate expired at %s", leaf.NotAfter.UTC().Format(time.RFC3339))
	case opts.Now.Before(leaf.NotBefore):
		add(RuleValidity, "check the system clock, or wait", "the certificate is not valid before %s", leaf.NotBefore.UTC().Format(time.RFC3339))
	}

	if net.ParseIP(hostname) != nil {
		add(RuleHostname, "give the proxy a DNS name and use it in the proxy URI endpoint",
			"%s is an IP address; KMS connects to an XKS proxy by its fully qualified domain name", hostname)
	} else if err := leaf.VerifyHostname(hostname); err != nil {
		add(RuleHostname, fmt.Sprintf("obtain a certificate that includes %s in its DNS names", hostname),
			"the certificate's subject alternative names %v do not cover %s", leaf.DNSNames, hostname)
	}

	switch cn := leaf.Subject.CommonName; {
	case cn == "":
		add(RuleCommonName, fmt.Sprintf("obtain a certificate with subject CN %s (with Let's Encrypt, use the default classic profile, not tlsserver or shortlived)", hostname),
			"the certificate has no subject common name (CN); KMS requires the CN to match the proxy's hostname")
	case !commonNameMatches(cn, hostname):
		add(RuleCommonName, fmt.Sprintf("obtain a certificate whose first name (its subject CN) is %s", hostname),
			"the certificate's subject common name %q does not match %s; KMS checks the CN, not only the subject alternative names", cn, hostname)
	}

	return append(problems, checkRoot(chain, opts)...)
}

// commonNameMatches reports whether a certificate's subject CN names host,
// exactly or as a wildcard for one leftmost label. Both are lower-case
// without a trailing dot.
func commonNameMatches(cn, host string) bool {
	cn = strings.TrimSuffix(strings.ToLower(cn), ".")
	if cn == host {
		return true
	}
	parent, ok := strings.CutPrefix(cn, "*.")
	if !ok || parent == "" {
		return false
	}
	label, rest, ok := strings.Cut(host, ".")
	return ok && label != "" && rest == parent
}

// checkRoot finds the roots that chain leads to and checks that one of them
// is trusted.
func checkRoot(chain []*x509.Certificate, opts CheckOptions) []Problem {
	leaf := chain[0]
	intermediates := x509.NewCertPool()
	for _, c := range chain[1:] {
		intermediates.AddCert(c)
	}
	roots := opts.Roots
	if roots == nil {
		roots = kmsRoots().pool
	}
	// A served root is a root: whether KMS trusts it is decided by its
	// fingerprint, so it may complete a chain here.
	if last := chain[len(chain)-1]; isSelfSigned(last) {
		roots = roots.Clone()
		roots.AddCert(last)
	}
	// Check the path at a time the leaf is valid: an expired leaf is its
	// own problem, and the root it leads to is still worth knowing.
	at := opts.Now
	if at.After(leaf.NotAfter) {
		at = leaf.NotAfter
	}
	if at.Before(leaf.NotBefore) {
		at = leaf.NotBefore
	}
	chains, err := leaf.Verify(x509.VerifyOptions{
		Intermediates: intermediates,
		Roots:         roots,
		CurrentTime:   at,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return []Problem{unverifiedChain(chain, err, opts)}
	}
	var untrusted []string
	var removed, unconfirmed string
	for _, c := range chains {
		root := c[len(c)-1]
		fp := FingerprintOf(root.Raw)
		if opts.TrustedRoots != nil {
			if _, ok := opts.TrustedRoots[fp]; ok {
				return nil
			}
		} else if r, ok := opts.Lists[fp]; ok {
			switch r.Lists {
			case List2022 | List2024:
				return nil
			case List2022:
				removed = root.Subject.String()
			default:
				unconfirmed = root.Subject.String()
			}
			continue
		}
		if name := root.Subject.String(); !slices.Contains(untrusted, name) {
			untrusted = append(untrusted, name)
		}
	}
	switch {
	case removed != "":
		return []Problem{{
			Rule: RuleRootBeingRemoved,
			What: fmt.Sprintf("the chain ends in %s, which KMS's 2022 list of trusted roots names and its newer list drops: KMS accepts it today, but may stop", removed),
			Fix:  "renew the certificate from a CA whose chain ends in a root on both lists (tlscheck/kmsroots.txt)",
		}}
	case unconfirmed != "":
		return []Problem{{
			Rule: RuleRootUnconfirmed,
			What: fmt.Sprintf("the chain ends in %s, which only KMS's newer list of trusted roots (2024) names", unconfirmed),
			Fix:  `KMS likely accepts it: confirm with the external key store's connection test, or use a chain that ends in a root on both lists (for Let's Encrypt, preferred_chains { root_common_name "ISRG Root X1" })`,
		}}
	}
	return []Problem{{
		Rule: RuleTrustedRoot,
		What: fmt.Sprintf("the chain ends in %s, which is not among the roots KMS trusts for an XKS proxy", strings.Join(untrusted, " and in ")),
		Fix:  untrustedRootFix(untrusted),
	}}
}

// unverifiedChain says why no path leads from the leaf to a known root:
// the root above the served chain is unknown (a full chain from a CA KMS
// does not trust, or a listed root whose certificate is not carried), or
// the served chain is incomplete or broken.
func unverifiedChain(chain []*x509.Certificate, err error, opts CheckOptions) Problem {
	last := chain[len(chain)-1]
	if _, ok := errors.AsType[x509.UnknownAuthorityError](err); !ok {
		return Problem{
			Rule: RuleChain,
			What: fmt.Sprintf("the served chain (%s) does not verify: %v", describeChain(chain), err),
			Fix:  "serve the certificate with the intermediates its CA issued it with, all within their validity",
		}
	}
	issuer := last.Issuer.String()
	fix, known := knownRootFix(issuer)
	if !last.IsCA {
		// Only the leaf is served: an intermediate is missing, unless the
		// leaf's issuer is itself a root nobody knows.
		if !known {
			fix = fmt.Sprintf("serve the full chain with its intermediates, from a CA whose root KMS trusts; the leaf was issued by %q", last.Issuer.CommonName)
		}
		return Problem{
			Rule: RuleChain,
			What: fmt.Sprintf("only the leaf certificate is served, and its issuer %s is not a known root", issuer),
			Fix:  fix,
		}
	}
	// The chain is served up to an intermediate, and the root above it is
	// not one this check knows.
	if opts.TrustedRoots == nil {
		if r, ok := listedRootNamed(opts.Lists, last.Issuer.CommonName); ok {
			return Problem{
				Rule: RuleRootUnconfirmed,
				What: fmt.Sprintf("the chain ends under %s, a root that KMS's lists name but whose certificate this check does not carry, so the chain could not be verified", r.Subject),
				Fix:  "confirm with the external key store's connection test",
			}
		}
	}
	if !known {
		fix = untrustedRootFix(nil)
	}
	return Problem{
		Rule: RuleTrustedRoot,
		What: fmt.Sprintf("the served chain (%s) ends under %s, a root that is not among the roots KMS trusts for an XKS proxy", describeChain(chain), issuer),
		Fix:  fix,
	}
}

// listedRootNamed finds a root of KMS's lists whose certificate is not
// carried, by its subject CN.
func listedRootNamed(lists map[Fingerprint]KMSRoot, commonName string) (KMSRoot, bool) {
	if commonName == "" {
		return KMSRoot{}, false
	}
	for _, r := range lists {
		if r.Certificate != nil {
			continue
		}
		if strings.Contains(r.Subject+",", "CN="+commonName+",") {
			return r, true
		}
	}
	return KMSRoot{}, false
}

// untrustedRootFix says what to change for a chain whose roots are all
// missing from KMS's list.
func untrustedRootFix(roots []string) string {
	for _, r := range roots {
		if fix, ok := knownRootFix(r); ok {
			return fix
		}
	}
	return "obtain the certificate from a CA whose chain ends in a root on KMS's list (TrustedCertificateAuthorities in the XKS proxy API specification)"
}

// knownRootFix names the usual way out for a root, given its subject, that
// a Caddy user is likely to meet and KMS does not trust.
func knownRootFix(subject string) (string, bool) {
	switch {
	case strings.Contains(subject, "CN=ISRG Root X2"):
		return "KMS's 2022 list trusts ISRG Root X1 but not ISRG Root X2, which only the 2024 list adds: use Let's Encrypt's default chain (remove preferred_chains smallest or a preferred_chains that picks ISRG Root X2, " +
			`or set preferred_chains { root_common_name "ISRG Root X1" }), or an RSA key (key_type rsa2048)`, true
	case strings.Contains(subject, "O=ISRG"):
		return "KMS's list names ISRG Root X1 but not Let's Encrypt's newer roots: " +
			`select the chain to ISRG Root X1 (preferred_chains { root_common_name "ISRG Root X1" }) or use another CA whose root KMS trusts`, true
	case strings.Contains(subject, "Caddy Local Authority"):
		return "this is Caddy's internal CA (tls internal or local_certs); KMS needs a certificate from a public CA on its list, such as Let's Encrypt or ZeroSSL", true
	}
	return "", false
}

// isSelfSigned reports whether c is signed by its own key, as roots are
// (and leaves made for testing). CheckSignatureFrom would also demand that
// c be a CA.
func isSelfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawIssuer, c.RawSubject) &&
		c.CheckSignature(c.SignatureAlgorithm, c.RawTBSCertificate, c.Signature) == nil
}

// describeChain lists the subject CNs of a chain, leaf first.
func describeChain(chain []*x509.Certificate) string {
	names := make([]string, len(chain))
	for i, c := range chain {
		names[i] = fmt.Sprintf("%q", c.Subject.CommonName)
	}
	return strings.Join(names, " <- ")
}
