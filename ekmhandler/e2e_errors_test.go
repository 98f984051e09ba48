package ekmhandler_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/internal/kwref"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/internal/testcert"
)

// TestErrorTable runs every error of the API's status table
// (reference/azure-ekm.md §5.1) that a request can cause, through Caddy
// over mutual TLS, and checks the status and the ProxyError code; the HSM's
// own failures (a hung HSM, a saturated pool, a failing device) are
// TestHSMFaults'. The table it logs is what each error was answered.
func TestErrorTable(t *testing.T) {
	var other *testcert.CA
	f := newFixtureWith(t, func(f *fixture) {
		other = testcert.NewCA(t, f.dir, "another client root")
		f.softStore = "\t\t\tauthorize {\n\t\t\t\tdeny test-pool `pool_name == \"denied-pool\"`\n\t\t\t}\n"
		f.moreStores = fmt.Sprintf("\t\tkey_store /limited {\n\t\t\thsm soft\n\t\t\tclient_subjects %s\n\t\t\tclient_roots %s\n\t\t\tkeys %s\n\t\t\trate_limit 0.0001 1\n%s\t\t}\n",
			subject, f.ca.File, kekAES, proxytest.KeyStoreDefaults(""))
	})
	wrongSubject := f.ca.Client(t, "fabrikam.managedhsmclient.azure.net", x509.ExtKeyUsageClientAuth)
	otherRoot := other.Client(t, subject, x509.ExtKeyUsageClientAuth)
	serverUsage := f.ca.Client(t, subject, x509.ExtKeyUsageServerAuth)
	dek := randomBytes(32)
	kw := kwref.KW(f.softKEK, dek)
	tamperedKW := bytes.Clone(kw)
	tamperedKW[10] ^= 1
	oaep, _ := rsa.EncryptOAEP(crypto.SHA1.New(), rand.Reader, &f.pair.PublicKey, dek, nil)
	tamperedOAEP := bytes.Clone(oaep)
	tamperedOAEP[10] ^= 1
	withContext := func(c ekmapi.RequestContext) string { return mustJSON(ekmapi.ContextRequest{RequestContext: &c}) }
	raw := func(alg, value string) string {
		return `{"request_context":` + mustJSON(requestContext) + `,"alg":"` + alg + `","value":"` + value + `"}`
	}
	wrapOf := func(alg string, v []byte) string { return f.wrapBody(alg, v) }
	tests := []struct {
		name   string
		cert   *tls.Certificate
		method string
		path   string
		query  string
		body   string
		status int
		code   string
	}{
		{"no client certificate", nil, "", "/soft/info", query, contextBody, 401, ekmapi.CodeUnauthorized},
		{"a certificate from the right root with another subject", &wrongSubject, "", "/soft/info", query, contextBody, 401, ekmapi.CodeUnauthorized},
		{"the right subject from another root", &otherRoot, "", "/soft/info", query, contextBody, 401, ekmapi.CodeUnauthorized},
		{"the right subject and root, not for client authentication", &serverUsage, "", "/soft/info", query, contextBody, 401, ekmapi.CodeUnauthorized},
		{"no api-version", &f.good, "", "/soft/info", "", contextBody, 400, ekmapi.CodeUnsupportedAPIVersion},
		{"an unknown api-version", &f.good, "", "/soft/info", "api-version=7.5", contextBody, 400, ekmapi.CodeUnsupportedAPIVersion},
		{"api-version twice", &f.good, "", "/soft/info", query + "&" + query, contextBody, 400, ekmapi.CodeUnsupportedAPIVersion},
		{"an unknown path prefix", &f.good, "", "/fabrikam/info", query, contextBody, 404, ekmapi.CodeNotFound},
		{"a trailing slash", &f.good, "", "/soft/info/", query, contextBody, 404, ekmapi.CodeNotFound},
		{"an unknown operation", &f.good, "", "/soft/" + kekAES + "/encrypt", query, contextBody, 404, ekmapi.CodeNotFound},
		{"GET", &f.good, http.MethodGet, "/soft/info", query, "", 405, ekmapi.CodeMethodNotAllowed},
		{"a key name with _", &f.good, "", "/soft/kek_1/metadata", query, contextBody, 400, ekmapi.CodeInvalidRequest},
		{"a key name of 65 characters", &f.good, "", "/soft/" + strings.Repeat("k", 65) + "/metadata", query, contextBody, 400, ekmapi.CodeInvalidRequest},
		{"a key the key store allows and the HSM does not hold", &f.good, "", "/soft/" + kekMissing + "/metadata", query, contextBody, 404, ekmapi.CodeKeyNotFound},
		{"a key the key store does not allow", &f.good, "", "/soft/" + kekHidden + "/metadata", query, contextBody, 404, ekmapi.CodeKeyNotFound},
		{"a key whose value can leave the HSM", &f.good, "", "/soft/" + kekExportable + "/metadata", query, contextBody, 404, ekmapi.CodeKeyNotFound},
		{"metadata of a disabled key", &f.good, "", "/soft/" + kekOff + "/metadata", query, contextBody, 403, ekmapi.CodeKeyDisabled},
		{"wrapping with a disabled key", &f.good, "", "/soft/" + kekOff + "/wrapkey", query, wrapOf(ekmapi.AlgA256KW, dek), 403, ekmapi.CodeKeyDisabled},
		{"metadata of an AES-128 key", &f.good, "", "/soft/" + kekAES128 + "/metadata", query, contextBody, 403, ekmapi.CodeOperationNotAllowed},
		{"wrapping with an AES-128 key", &f.good, "", "/soft/" + kekAES128 + "/wrapkey", query, wrapOf(ekmapi.AlgA256KW, dek), 403, ekmapi.CodeOperationNotAllowed},
		{"metadata of an RSA-1024 key", &f.good, "", "/soft/" + kekRSA1024 + "/metadata", query, contextBody, 403, ekmapi.CodeOperationNotAllowed},
		{"an AES key the token cannot wrap with", &f.good, "", "/soft/" + kekCryptOnly + "/metadata", query, contextBody, 403, ekmapi.CodeOperationNotAllowed},
		{"an RSA algorithm with an AES key", &f.good, "", "/soft/" + kekAES + "/wrapkey", query, wrapOf(ekmapi.AlgRSAOAEP, dek), 400, ekmapi.CodeUnsupportedAlgorithm},
		{"an AES algorithm with an RSA key", &f.good, "", "/soft/" + kekRSA + "/unwrapkey", query, wrapOf(ekmapi.AlgA256KW, kw), 400, ekmapi.CodeUnsupportedAlgorithm},
		{"an algorithm the API does not have", &f.good, "", "/soft/" + kekAES + "/wrapkey", query, wrapOf("A128KW", dek), 400, ekmapi.CodeUnsupportedAlgorithm},
		{"an algorithm the HSM cannot do", &f.good, "", "/soft/" + kekRSA + "/wrapkey", query, wrapOf(ekmapi.AlgRSAOAEP256, dek), 400, ekmapi.CodeUnsupportedAlgorithm},
		{"value with padding", &f.good, "", "/soft/" + kekAES + "/wrapkey", query, raw(ekmapi.AlgA256KW, "AAAAAAAAAAAAAAAAAAAAAA=="), 400, ekmapi.CodeInvalidRequest},
		{"value in the standard alphabet", &f.good, "", "/soft/" + kekAES + "/wrapkey", query, raw(ekmapi.AlgA256KW, "+/AAAAAAAAAAAAAAAAAAAA"), 400, ekmapi.CodeInvalidRequest},
		{"value in PEM", &f.good, "", "/soft/" + kekRSA + "/unwrapkey", query, raw(ekmapi.AlgRSAOAEP, "-----BEGIN RSA-----"), 400, ekmapi.CodeInvalidRequest},
		{"value as hex, which decodes to another length", &f.good, "", "/soft/" + kekRSA + "/unwrapkey", query,
			raw(ekmapi.AlgRSAOAEP, fmt.Sprintf("%x", oaep)), 400, ekmapi.CodeInvalidCiphertext},
		{"an empty value", &f.good, "", "/soft/" + kekAES + "/wrapkey", query, raw(ekmapi.AlgA256KW, ""), 400, ekmapi.CodeInvalidRequest},
		{"A256KW of 20 bytes", &f.good, "", "/soft/" + kekAES + "/wrapkey", query, wrapOf(ekmapi.AlgA256KW, dek[:20]), 400, ekmapi.CodeInvalidRequest},
		{"A256KW of 8 bytes", &f.good, "", "/soft/" + kekAES + "/wrapkey", query, wrapOf(ekmapi.AlgA256KW, dek[:8]), 400, ekmapi.CodeInvalidRequest},
		{"an A256KW ciphertext of 23 bytes", &f.good, "", "/soft/" + kekAES + "/unwrapkey", query, wrapOf(ekmapi.AlgA256KW, kw[:23]), 400, ekmapi.CodeInvalidCiphertext},
		{"an RSA-OAEP key longer than the modulus takes", &f.good, "", "/soft/" + kekRSA + "/wrapkey", query, wrapOf(ekmapi.AlgRSAOAEP, randomBytes(215)), 400, ekmapi.CodeInvalidRequest},
		{"an RSA ciphertext one byte short", &f.good, "", "/soft/" + kekRSA + "/unwrapkey", query, wrapOf(ekmapi.AlgRSAOAEP, oaep[1:]), 400, ekmapi.CodeInvalidCiphertext},
		{"a tampered A256KW ciphertext", &f.good, "", "/soft/" + kekAES + "/unwrapkey", query, wrapOf(ekmapi.AlgA256KW, tamperedKW), 400, ekmapi.CodeInvalidCiphertext},
		{"a tampered RSA-OAEP ciphertext", &f.good, "", "/soft/" + kekRSA + "/unwrapkey", query, wrapOf(ekmapi.AlgRSAOAEP, tamperedOAEP), 400, ekmapi.CodeInvalidCiphertext},
		{"no request_context", &f.good, "", "/soft/info", query, `{}`, 400, ekmapi.CodeInvalidRequest},
		{"no correlation_id", &f.good, "", "/soft/" + kekAES + "/metadata", query,
			withContext(ekmapi.RequestContext{RequestID: "r", PoolName: "p"}), 400, ekmapi.CodeInvalidRequest},
		{"no pool_name", &f.good, "", "/soft/" + kekAES + "/metadata", query,
			withContext(ekmapi.RequestContext{RequestID: "r", CorrelationID: "c"}), 400, ekmapi.CodeInvalidRequest},
		{"no request_id, which is optional", &f.good, "", "/soft/" + kekAES + "/metadata", query,
			withContext(ekmapi.RequestContext{CorrelationID: "c", PoolName: "p"}), 200, ""},
		{"request_context as a string", &f.good, "", "/soft/info", query, `{"request_context":"x"}`, 400, ekmapi.CodeInvalidRequest},
		{"no alg", &f.good, "", "/soft/" + kekAES + "/wrapkey", query, contextBody, 400, ekmapi.CodeInvalidRequest},
		{"not JSON", &f.good, "", "/soft/info", query, `{"request_context":`, 400, ekmapi.CodeInvalidRequest},
		{"a field twice", &f.good, "", "/soft/info", query, `{"request_context":{},"request_context":{}}`, 400, ekmapi.CodeInvalidRequest},
		{"a body over max_request_body", &f.good, "", "/soft/info", query, `{"x":"` + strings.Repeat("a", 9000) + `"}`, 400, ekmapi.CodeInvalidRequest},
		{"a call the key store's policy denies", &f.good, "", "/soft/" + kekAES + "/metadata", query,
			withContext(ekmapi.RequestContext{CorrelationID: "c", PoolName: "denied-pool"}), 403, ekmapi.CodeForbidden},
		{"the first call of a key store's quota", &f.good, "", "/limited/" + kekAES + "/metadata", query, contextBody, 200, ""},
		{"the key store's quota exceeded", &f.good, "", "/limited/" + kekAES + "/metadata", query, contextBody, 429, ekmapi.CodeThrottled},
	}
	var table []string
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			method := tt.method
			if method == "" {
				method = http.MethodPost
			}
			r := f.do(tt.cert, method, tt.path, tt.query, tt.body)
			if tt.status == http.StatusOK {
				if r.status != http.StatusOK {
					t.Fatalf("%d %s", r.status, r.raw)
				}
			} else {
				expectError(t, r, tt.status, tt.code)
			}
			switch tt.code {
			case ekmapi.CodeThrottled:
				if r.header.Get("Retry-After") != "1" {
					t.Errorf("Retry-After %q, want 1", r.header.Get("Retry-After"))
				}
			case ekmapi.CodeMethodNotAllowed:
				if r.header.Get("Allow") != http.MethodPost {
					t.Errorf("Allow %q, want POST", r.header.Get("Allow"))
				}
			case ekmapi.CodeUnsupportedAPIVersion:
				if !strings.Contains(r.raw, "supported: 0.1-preview") {
					t.Errorf("the answer does not name the supported versions: %s", r.raw)
				}
			}
			table = append(table, fmt.Sprintf("%-62s %d %s", tt.name, r.status, r.raw))
		})
	}
	t.Logf("the status table as answered:\n%s", strings.Join(table, "\n"))
}
