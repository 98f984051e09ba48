package ekmhandler_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha1" //nolint:gosec // crypto.SHA1: RSA-OAEP with SHA-1 is one of the algorithms under test
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"hash"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/internal/kwref"
)

// software is an independent implementation of one algorithm, with the key
// the test made: it wraps what the proxy must unwrap, and unwraps what the
// proxy wrapped.
type software struct {
	wrap   func(dek []byte) []byte
	unwrap func(wrapped []byte) ([]byte, error)
}

func aesSoftware(kek []byte, pad bool) software {
	if pad {
		return software{func(d []byte) []byte { return kwref.KWP(kek, d) }, func(w []byte) ([]byte, error) { return kwref.KWPUnwrap(kek, w) }}
	}
	return software{func(d []byte) []byte { return kwref.KW(kek, d) }, func(w []byte) ([]byte, error) { return kwref.KWUnwrap(kek, w) }}
}

func rsaSoftware(priv *rsa.PrivateKey, h func() hash.Hash) software {
	return software{
		func(d []byte) []byte {
			out, err := rsa.EncryptOAEP(h(), rand.Reader, &priv.PublicKey, d, nil)
			if err != nil {
				panic(err)
			}
			return out
		},
		func(w []byte) ([]byte, error) { return rsa.DecryptOAEP(h(), nil, priv, w, nil) },
	}
}

// TestRoundTripMatrix is the matrix of algorithm × token × direction,
// through Caddy over mutual TLS, each cell cross-checked with independent
// software: "proxy → software" is a data key the proxy wrapped that
// software unwraps (for AES key wrap, which is deterministic, also equal to
// software's wrap), "software → proxy" one software wrapped that the proxy
// unwraps. SoftHSM2 has no RSA-OAEP-256 and wraps RFC 5649 right only for
// whole 8-byte blocks: those cells must be refused both ways, with 400
// UnsupportedAlgorithm and InvalidRequest, never wrapped wrong.
func TestRoundTripMatrix(t *testing.T) {
	f := newFixture(t)
	type cell struct {
		token, store, key, alg string
		sw                     software
		// refused is the code every call of the cell must get, "" when
		// the cell works.
		refused string
		sizes   []int
	}
	whole, anyLength := []int{16, 32, 64}, []int{1, 20, 32, 33}
	cells := []cell{
		{"SoftHSM2", "/soft", kekAES, ekmapi.AlgA256KW, aesSoftware(f.softKEK, false), "", whole},
		{"SoftHSM2", "/soft", kekAES, ekmapi.AlgA256KWP, aesSoftware(f.softKEK, true), "", []int{8, 32, 256}},
		{"SoftHSM2", "/soft", kekAES, ekmapi.AlgA256KWP, aesSoftware(f.softKEK, true), ekmapi.CodeInvalidRequest, []int{1, 20, 33}},
		{"SoftHSM2", "/soft", kekRSA, ekmapi.AlgRSAOAEP, rsaSoftware(f.pair, crypto.SHA1.New), "", []int{32, 214}},
		{"SoftHSM2", "/soft", kekRSA, ekmapi.AlgRSAOAEP256, rsaSoftware(f.pair, sha256.New), ekmapi.CodeUnsupportedAlgorithm, []int{32}},
		{"NSS softokn", "/nss/prod", f.nssAES, ekmapi.AlgA256KW, aesSoftware(f.nssKEK, false), "", whole},
		{"NSS softokn", "/nss/prod", f.nssAES, ekmapi.AlgA256KWP, aesSoftware(f.nssKEK, true), "", anyLength},
		{"NSS softokn", "/nss/prod", f.nssRSA, ekmapi.AlgRSAOAEP, rsaSoftware(f.pair, crypto.SHA1.New), "", []int{32, 214}},
		{"NSS softokn", "/nss/prod", f.nssRSA, ekmapi.AlgRSAOAEP256, rsaSoftware(f.pair, sha256.New), "", []int{32, 190}},
	}
	matrix := make([]string, 0, len(cells))
	for _, c := range cells {
		name := fmt.Sprintf("%s/%s/%v", c.token, c.alg, c.sizes)
		t.Run(name, func(t *testing.T) {
			for _, n := range c.sizes {
				dek := randomBytes(n)
				toSoftware := f.wrap(c.store, c.key, c.alg, dek)
				fromSoftware := f.unwrap(c.store, c.key, c.alg, c.sw.wrap(dek))
				if c.refused != "" {
					expectError(t, toSoftware, http.StatusBadRequest, c.refused)
					expectError(t, fromSoftware, http.StatusBadRequest, c.refused)
					continue
				}
				wrapped := f.value(toSoftware, false)
				back, err := c.sw.unwrap(wrapped)
				if err != nil || !bytes.Equal(back, dek) {
					t.Fatalf("%d bytes: software does not unwrap what the proxy wrapped: %v", n, err)
				}
				if strings.HasPrefix(c.alg, "A256") && !bytes.Equal(wrapped, c.sw.wrap(dek)) {
					t.Fatalf("%d bytes: the proxy's AES key wrap differs from software's", n)
				}
				if got := f.value(fromSoftware, true); !bytes.Equal(got, dek) {
					t.Fatalf("%d bytes: the proxy unwrapped software's to another key", n)
				}
			}
		})
		verdict := "proxy → software ✓, software → proxy ✓"
		if c.refused != "" {
			verdict = "refused both ways: 400 " + c.refused
		}
		matrix = append(matrix, fmt.Sprintf("%-12s %-13s %-16s %s", c.token, c.alg, fmt.Sprint(c.sizes), verdict))
	}
	t.Logf("round trips, each checked against software:\n%s", strings.Join(matrix, "\n"))
}

// TestInfoAndMetadata checks /info and /metadata as Managed HSM reads them
// when it sets up a connection and creates an external key.
func TestInfoAndMetadata(t *testing.T) {
	f := newFixture(t)
	for _, tt := range []struct {
		store, vendor string
	}{{"/soft", "SoftHSM project"}, {"/nss/prod", "Mozilla Foundation"}} {
		r := f.call(&f.good, tt.store+"/info", query, contextBody)
		var info ekmapi.ProxyInfo
		if r.status != http.StatusOK || json.Unmarshal([]byte(r.raw), &info) != nil {
			t.Fatalf("%s info: %d %s", tt.store, r.status, r.raw)
		}
		if info.APIVersion != "0.1-preview" || info.ProxyVendor != "caddy-xks" || !strings.HasPrefix(info.ProxyName, "caddy-xks v") ||
			info.EKMVendor != tt.vendor || info.EKMProduct == "" {
			t.Errorf("%s info: %s", tt.store, r.raw)
		}
	}
	n := ekmapi.EncodeValue(f.pair.N.Bytes())
	for _, tt := range []struct {
		store, key, want string
	}{
		{"/soft", kekAES, `{"key_type":"oct","key_size":256,"key_ops":["wrapKey","unwrapKey"]}`},
		{"/soft", kekRSA, `{"key_type":"RSA","key_size":2048,"key_ops":["wrapKey","unwrapKey"],"n":"` + n + `","e":"AQAB"}`},
		{"/nss/prod", f.nssAES, `{"key_type":"oct","key_size":256,"key_ops":["wrapKey","unwrapKey"]}`},
		{"/nss/prod", f.nssRSA, `{"key_type":"RSA","key_size":2048,"key_ops":["wrapKey","unwrapKey"],"n":"` + n + `","e":"AQAB"}`},
	} {
		r := f.call(&f.good, tt.store+"/"+tt.key+"/metadata", query, contextBody)
		if r.status != http.StatusOK || r.raw != tt.want {
			t.Errorf("%s metadata: %d %s, want %s", tt.key, r.status, r.raw, tt.want)
		}
	}
}

// logEntry is one JSON line of the proxy's log.
type logEntry map[string]any

func (e logEntry) str(field string) string { return fmt.Sprint(e[field]) }

// auditLines reads the handler's audit lines from the proxy's log.
func (f *fixture) auditLines() []logEntry {
	f.t.Helper()
	data, err := os.ReadFile(f.proxy.LogFile)
	if err != nil {
		f.t.Fatal(err)
	}
	var out []logEntry
	for line := range bytes.SplitSeq(data, []byte("\n")) {
		var e logEntry
		if json.Unmarshal(line, &e) == nil && e.str("logger") == "http.handlers.azure_ekm.audit" {
			out = append(out, e)
		}
	}
	return out
}

// TestAuditLine checks what one audit line says of a call: every
// request_context field, so that it can be matched with Managed HSM's
// logs; the client's subject; the algorithm and the value's length, never
// the value; the outcome, the status, and for a refused call why.
func TestAuditLine(t *testing.T) {
	f := newFixture(t)
	wrongSubject := f.ca.Client(t, "fabrikam.managedhsmclient.azure.net", x509.ExtKeyUsageClientAuth)
	f.value(f.wrap("/soft", kekAES, ekmapi.AlgA256KW, randomBytes(32)), false)
	f.call(&wrongSubject, "/soft/info", query, contextBody)
	var wrap, refused logEntry
	for _, e := range f.auditLines() {
		switch {
		case e.str("operation") == "wrapkey":
			wrap = e
		case e.str("outcome") == ekmapi.CodeUnauthorized:
			refused = e
		}
	}
	for field, want := range map[string]string{
		"msg": "ekm request", "outcome": "ok", "status": "200", "key_store": "/soft", "external_key_id": kekAES,
		"client_subject": subject, "request_id": requestContext.RequestID, "correlation_id": requestContext.CorrelationID,
		"pool_name": requestContext.PoolName, "alg": ekmapi.AlgA256KW, "value_bytes": "32",
	} {
		if got := wrap.str(field); got != want {
			t.Errorf("wrapkey's audit line: %s is %q, want %q (%v)", field, got, want, wrap)
		}
	}
	if wrap["hsm_time"] == nil || wrap["total_time"] == nil {
		t.Errorf("wrapkey's audit line has no times: %v", wrap)
	}
	if refused.str("status") != "401" || !strings.Contains(refused.str("reason"), `its subject "fabrikam.managedhsmclient.azure.net" is not one of the key store's client_subjects`) {
		t.Errorf("the refused call's audit line: %v", refused)
	}
}

// TestHTTP3IsWarnedOf: the test proxy's server offers HTTP/3 (Caddy's
// default, which the fixture keeps), which Managed HSM never uses and
// whose 0-RTT requests can be replayed: the load warns of it.
func TestHTTP3IsWarnedOf(t *testing.T) {
	f := newFixture(t)
	data, err := os.ReadFile(f.proxy.LogFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(data, []byte("the server of the Azure EKM key stores offers HTTP/3, which Managed HSM never uses")) {
		t.Fatal("no warning of HTTP/3 in the log")
	}
}
