package tlscheck

import (
	"bufio"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
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
// The caller must not modify the map.
func KMSTrustedRoots() RootList { return kmsTrustedRoots() }

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
