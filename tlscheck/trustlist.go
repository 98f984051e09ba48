package tlscheck

import (
	"bufio"
	"crypto/sha256"
	"crypto/x509"
	_ "embed"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"strings"
	"sync"
)

// kmsTrustedCAListing is the file TrustedCertificateAuthorities of the XKS
// proxy API specification (github.com/aws/aws-kms-xksproxy-api-spec, added
// with spec v1.0.1; this copy is the November 2022 version, unchanged). It
// is a `keytool -list -v` listing of the root CAs that AWS KMS accepts at
// the end of an XKS proxy's server certificate chain, with each root's
// SHA-1 and SHA-256 fingerprints; it holds no certificates. To update it,
// replace the file with a newer upstream copy: TestKMSTrustedRoots checks
// that it still parses.
//
//go:embed TrustedCertificateAuthorities
var kmsTrustedCAListing string

// Fingerprint is the SHA-256 digest of a certificate's DER encoding.
type Fingerprint [sha256.Size]byte

// FingerprintOf returns the SHA-256 fingerprint of a DER-encoded certificate.
func FingerprintOf(der []byte) Fingerprint { return sha256.Sum256(der) }

// String formats f as upper-case hex with colons, as keytool and openssl
// print fingerprints.
func (f Fingerprint) String() string {
	var b strings.Builder
	for i, c := range f {
		if i > 0 {
			b.WriteByte(':')
		}
		fmt.Fprintf(&b, "%02X", c)
	}
	return b.String()
}

// RootList maps the fingerprints of the root certificates that are accepted
// to their subjects.
type RootList map[Fingerprint]string

// KMSTrustedRoots returns the roots that AWS KMS accepts for an XKS proxy's
// server certificate, according to the specification's November 2022 list.
// The caller must not modify the map. KMSRoots has the newer list too.
func KMSTrustedRoots() RootList { return kmsTrustedRoots() }

// kmsRootsListing and kmsRootsPEM are written by tools/genroots:
// every root on the 2022 list or on the newer one that pull request 22 of
// the specification's repository proposes (June 2024), and the
// certificates of those that Debian's ca-certificates (Mozilla's root
// store) holds, matched by SHA-256 fingerprint. Carrying the certificates
// makes the preflight's verdict independent of the host's CA bundle.
var (
	//go:embed kmsroots.txt
	kmsRootsListing string
	//go:embed kmsroots.pem
	kmsRootsPEM []byte
)

// RootLists says which of KMS's lists name a root.
type RootLists uint8

// The lists.
const (
	// List2022 is the specification's TrustedCertificateAuthorities of
	// November 2022, the one its main branch holds.
	List2022 RootLists = 1 << iota
	// List2024 is that file as pull request 22 of the specification's
	// repository would make it (June 2024, "based on latest keystore").
	List2024
)

// KMSRoot is a root on at least one of KMS's lists.
type KMSRoot struct {
	// Subject is the root's subject as the list gives it.
	Subject string
	// Lists are the lists that name it.
	Lists RootLists
	// Certificate is the root certificate, or nil if it is not carried
	// (Mozilla's store no longer has it, or does not have it yet).
	Certificate *x509.Certificate
}

// KMSRoots returns every root of KMS's 2022 and 2024 lists by fingerprint.
// The caller must not modify the map.
func KMSRoots() map[Fingerprint]KMSRoot { return kmsRoots().byFingerprint }

type carriedRoots struct {
	byFingerprint map[Fingerprint]KMSRoot
	pool          *x509.CertPool // the carried certificates
}

var kmsRoots = sync.OnceValue(func() carriedRoots {
	roots, err := parseRootsListing(kmsRootsListing, kmsRootsPEM)
	if err != nil {
		panic("tlscheck: embedded kmsroots: " + err.Error())
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		if r.Certificate != nil {
			pool.AddCert(r.Certificate)
		}
	}
	return carriedRoots{byFingerprint: roots, pool: pool}
})

// parseRootsListing reads kmsroots.txt ("<SHA-256 hex> <2022|2024|2022,2024>
// <subject>" lines) and attaches the certificates of the PEM bundle whose
// fingerprints it lists.
func parseRootsListing(listing string, certs []byte) (map[Fingerprint]KMSRoot, error) {
	roots := make(map[Fingerprint]KMSRoot)
	sc := bufio.NewScanner(strings.NewReader(listing))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.SplitN(line, " ", 3)
		if len(f) != 3 {
			return nil, fmt.Errorf("line %d: want fingerprint, lists and subject", n)
		}
		raw, err := hex.DecodeString(f[0])
		if err != nil || len(raw) != sha256.Size {
			return nil, fmt.Errorf("line %d: malformed SHA-256 fingerprint %q", n, f[0])
		}
		var fp Fingerprint
		copy(fp[:], raw)
		var lists RootLists
		for l := range strings.SplitSeq(f[1], ",") {
			switch l {
			case "2022":
				lists |= List2022
			case "2024":
				lists |= List2024
			default:
				return nil, fmt.Errorf("line %d: unknown list %q", n, l)
			}
		}
		if _, dup := roots[fp]; dup {
			return nil, fmt.Errorf("line %d: fingerprint listed twice", n)
		}
		roots[fp] = KMSRoot{Subject: f[2], Lists: lists}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for block, rest := pem.Decode(certs); block != nil; block, rest = pem.Decode(rest) {
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing a carried root: %w", err)
		}
		fp := FingerprintOf(c.Raw)
		r, ok := roots[fp]
		if !ok {
			return nil, fmt.Errorf("carried root %q is on no list", c.Subject)
		}
		r.Certificate = c
		roots[fp] = r
	}
	return roots, nil
}

var kmsTrustedRoots = sync.OnceValue(func() RootList {
	roots, err := parseKeytoolListing(kmsTrustedCAListing)
	if err != nil {
		panic("tlscheck: embedded TrustedCertificateAuthorities: " + err.Error())
	}
	return roots
})

// parseKeytoolListing reads the "Owner:" and "SHA256:" lines of each entry
// of a `keytool -list -v` listing.
func parseKeytoolListing(listing string) (RootList, error) {
	roots := make(RootList)
	var owner string
	sc := bufio.NewScanner(strings.NewReader(listing))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "Alias name:"):
			owner = ""
		case strings.HasPrefix(line, "Owner:"):
			owner = strings.TrimSpace(strings.TrimPrefix(line, "Owner:"))
		case strings.HasPrefix(line, "SHA256:"):
			if owner == "" {
				return nil, fmt.Errorf("line %d: SHA256 fingerprint without an Owner line before it", n)
			}
			// The fingerprint is the first field: one upstream line has
			// stray characters after it.
			fields := strings.Fields(strings.TrimPrefix(line, "SHA256:"))
			if len(fields) == 0 {
				return nil, fmt.Errorf("line %d: empty SHA-256 fingerprint", n)
			}
			hexFP := strings.ReplaceAll(fields[0], ":", "")
			raw, err := hex.DecodeString(hexFP)
			if err != nil || len(raw) != sha256.Size {
				return nil, fmt.Errorf("line %d: malformed SHA-256 fingerprint %q", n, hexFP)
			}
			var fp Fingerprint
			copy(fp[:], raw)
			if _, dup := roots[fp]; dup {
				return nil, fmt.Errorf("line %d: fingerprint of %q listed twice", n, owner)
			}
			roots[fp] = owner
			owner = ""
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("no SHA256 fingerprints found")
	}
	return roots, nil
}
