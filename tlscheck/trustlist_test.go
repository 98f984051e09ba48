package tlscheck

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

// Fingerprints checked against the upstream file by hand.
const (
	isrgRootX1SHA256 = "96:BC:EC:06:26:49:76:F3:74:60:77:9A:CF:28:C5:A7:CF:E8:A3:C0:AA:E1:1A:8F:FC:EE:05:C0:BD:DF:08:C6"
	usertrustRSA     = "E7:93:C9:B0:2F:D8:AA:13:E2:1C:31:22:8A:CC:B0:81:19:64:3B:74:9C:89:89:64:B1:74:6D:46:C3:D4:CB:D2"
)

func TestKMSTrustedRoots(t *testing.T) {
	roots := KMSTrustedRoots()
	if len(roots) != 130 {
		t.Errorf("%d roots, want the 130 of the November 2022 list", len(roots))
	}
	bySubject := make(map[string]string, len(roots))
	for fp, subject := range roots {
		bySubject[subject] = fp.String()
	}
	for subject, fp := range map[string]string{
		"CN=ISRG Root X1, O=Internet Security Research Group, C=US":                                             isrgRootX1SHA256,
		"CN=USERTrust RSA Certification Authority, O=The USERTRUST Network, L=Jersey City, ST=New Jersey, C=US": usertrustRSA,
	} {
		if got := bySubject[subject]; got != fp {
			t.Errorf("%s: fingerprint %q, want %q", subject, got, fp)
		}
	}
	for subject := range bySubject {
		if strings.Contains(subject, "ISRG Root X2") {
			t.Errorf("the 2022 list has no ISRG Root X2, but found %q", subject)
		}
	}
}

func TestParseKeytoolListing(t *testing.T) {
	t.Run("text after the fingerprint is ignored", func(t *testing.T) {
		roots, err := parseKeytoolListing("Owner: CN=a\n\t SHA256: " + isrgRootX1SHA256 + "      .7\n")
		if err != nil {
			t.Fatal(err)
		}
		for fp := range roots {
			if fp.String() != isrgRootX1SHA256 {
				t.Fatalf("fingerprint %s", fp)
			}
		}
	})

	tests := []struct {
		name, listing, wantErr string
	}{
		{name: "fingerprint before owner", listing: "Alias name: a\n\t SHA256: 00\n", wantErr: "without an Owner"},
		{name: "short fingerprint", listing: "Owner: CN=a\n\t SHA256: 00:11\n", wantErr: "malformed"},
		{name: "not hex", listing: "Owner: CN=a\n\t SHA256: " + strings.Repeat("ZZ:", 31) + "ZZ\n", wantErr: "malformed"},
		{name: "duplicate", listing: "Owner: CN=a\n SHA256: " + isrgRootX1SHA256 + "\nOwner: CN=b\n SHA256: " + isrgRootX1SHA256 + "\n", wantErr: "listed twice"},
		{name: "no fingerprint", listing: "Owner: CN=a\n\t SHA256:\n", wantErr: "empty SHA-256"},
		{name: "empty", listing: "", wantErr: "no SHA256"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseKeytoolListing(tt.listing)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

// TestKMSTrustedRootsAgainstSystemBundle fingerprints the real root
// certificates of the Debian CA bundle (package ca-certificates): the list
// must recognise exactly the bundle's certificates whose SHA-256, computed
// here and compared as text with the listing's own lines, the listing
// names; ISRG Root X1 must be among them and ISRG Root X2 must not.
func TestKMSTrustedRootsAgainstSystemBundle(t *testing.T) {
	const bundleFile = "/etc/ssl/certs/ca-certificates.crt"
	bundle, err := os.ReadFile(bundleFile)
	if err != nil {
		testenv.Missing(t, "the Debian CA bundle (ca-certificates)", err)
	}
	// The listing's fingerprints as keytool printed them, without the
	// parser under test.
	listed := map[string]bool{}
	for _, m := range regexp.MustCompile(`SHA256: ([0-9A-F:]{95})`).FindAllStringSubmatch(kmsTrustedCAListing, -1) {
		listed[m[1]] = true
	}
	roots := KMSTrustedRoots()
	var certs, want, found int
	names := map[string]bool{}
	for block, rest := pem.Decode(bundle); block != nil; block, rest = pem.Decode(rest) {
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("%s: %v", bundleFile, err)
		}
		certs++
		sum := sha256.Sum256(block.Bytes)
		inListing := listed[strings.ToUpper(strings.Join(splitHex(hex.EncodeToString(sum[:])), ":"))]
		_, inList := roots[FingerprintOf(cert.Raw)]
		if inListing != inList {
			t.Errorf("%s: in the listing %v, found by KMSTrustedRoots %v", cert.Subject, inListing, inList)
		}
		if inListing {
			want++
		}
		if inList {
			found++
			names[cert.Subject.CommonName] = true
		}
	}
	if want == 0 || found != want {
		t.Errorf("%d of the bundle's %d certificates found in KMS's list, want the %d the listing names", found, certs, want)
	}
	if !names["ISRG Root X1"] {
		t.Error("ISRG Root X1 from the system bundle is not found in the list")
	}
	if names["ISRG Root X2"] {
		t.Error("ISRG Root X2 from the system bundle is found in the 2022 list")
	}
	t.Logf("%d of the bundle's %d certificates are in KMS's list", found, certs)
}

// splitHex cuts a hex string into its bytes' pairs of digits.
func splitHex(s string) []string {
	pairs := make([]string, 0, len(s)/2)
	for i := 0; i+1 < len(s); i += 2 {
		pairs = append(pairs, s[i:i+2])
	}
	return pairs
}

// TestKMSRoots checks the carried lists: the 2022 membership is exactly
// the specification's listing, the 2024 list has the size pull request 22
// gives it, and the roots a Caddy user meets most are where they belong,
// with their certificates.
func TestKMSRoots(t *testing.T) {
	roots := KMSRoots()
	var n2022, n2024 int
	for fp, r := range roots {
		if r.Lists&List2022 != 0 {
			n2022++
			if _, ok := KMSTrustedRoots()[fp]; !ok {
				t.Errorf("%s is on the 2022 list in kmsroots.txt but not in TrustedCertificateAuthorities", r.Subject)
			}
		}
		if r.Lists&List2024 != 0 {
			n2024++
		}
		if r.Certificate != nil && FingerprintOf(r.Certificate.Raw) != fp {
			t.Errorf("%s: the carried certificate has another fingerprint", r.Subject)
		}
	}
	if n2022 != len(KMSTrustedRoots()) || n2024 != 145 {
		t.Errorf("%d roots on the 2022 list (want %d) and %d on the 2024 list (want 145)", n2022, len(KMSTrustedRoots()), n2024)
	}
	want := map[string]RootLists{
		"CN=ISRG Root X1,O=Internet Security Research Group,C=US":                                           List2022 | List2024,
		"CN=ISRG Root X2,O=Internet Security Research Group,C=US":                                           List2024,
		"CN=Amazon Root CA 1,O=Amazon,C=US":                                                                 List2022 | List2024,
		"CN=USERTrust ECC Certification Authority,O=The USERTRUST Network,L=Jersey City,ST=New Jersey,C=US": List2022 | List2024,
	}
	found := map[string]bool{}
	for _, r := range roots {
		if r.Certificate == nil {
			continue
		}
		name := r.Certificate.Subject.String()
		if lists, ok := want[name]; ok {
			found[name] = true
			if r.Lists != lists {
				t.Errorf("%s is on lists %b, want %b", name, r.Lists, lists)
			}
		}
	}
	for name := range want {
		if !found[name] {
			t.Errorf("no carried certificate for %s", name)
		}
	}
}
