package tlscheck

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The tests make their own PKI: certificate authorities, cross-signs and
// leaves, with P-256 keys because they are quick to generate.

// testCA is a certificate authority made for a test.
type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

var serial int64

func newKey(t testing.TB) crypto.Signer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// sign issues a certificate for tmpl and pub, signed by parent's key; a nil
// parent makes it self-signed by key.
func sign(t testing.TB, tmpl *x509.Certificate, pub crypto.PublicKey, parent *testCA, key crypto.Signer) *x509.Certificate {
	t.Helper()
	serial++
	tmpl.SerialNumber = big.NewInt(serial)
	issuer, signer := tmpl, key
	if parent != nil {
		issuer, signer = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, pub, signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func caTemplate(cn string) *x509.Certificate {
	return &x509.Certificate{
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"caddy-xks tests"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
}

// newRootCA makes a self-signed root.
func newRootCA(t testing.TB, cn string) *testCA {
	t.Helper()
	key := newKey(t)
	return &testCA{sign(t, caTemplate(cn), key.Public(), nil, key), key}
}

// intermediate makes a CA signed by ca.
func (ca *testCA) intermediate(t testing.TB, cn string) *testCA {
	t.Helper()
	key := newKey(t)
	return &testCA{sign(t, caTemplate(cn), key.Public(), ca, key), key}
}

// crossSign issues other's subject and key again, signed by ca: the same
// CA, reachable from a second root.
func (ca *testCA) crossSign(t testing.TB, other *testCA) *x509.Certificate {
	t.Helper()
	tmpl := caTemplate(other.cert.Subject.CommonName)
	tmpl.Subject = other.cert.Subject
	return sign(t, tmpl, other.key.Public(), ca, nil)
}

// leafSpec describes a leaf certificate; the zero value is valid now, for
// no name and no usage.
type leafSpec struct {
	cn       string
	dnsNames []string
	usage    x509.ExtKeyUsage
	expired  bool
}

func (ca *testCA) leaf(t testing.TB, spec leafSpec) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: spec.cn},
		DNSNames:    spec.dnsNames,
		NotBefore:   time.Now().Add(-time.Hour),
		NotAfter:    time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{spec.usage},
	}
	if spec.expired {
		tmpl.NotBefore = time.Now().Add(-48 * time.Hour)
		tmpl.NotAfter = time.Now().Add(-24 * time.Hour)
	}
	return sign(t, tmpl, key.Public(), ca, nil), key
}

// writePEM writes certificates (and a key, if any) to a .pem file in dir.
func writePEM(t testing.TB, dir, name string, certs []*x509.Certificate, key crypto.Signer) string {
	t.Helper()
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	if key != nil {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})...)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
