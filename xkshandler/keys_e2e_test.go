package xkshandler_test

import (
	"net/http"
	"strings"
	"testing"
)

// The key tests change what the token holds while the proxy runs, as an
// HSM administrator or another process would, and check what KMS is told.

// TestExportableKeyIsKeyNotFound: a key whose value can be read out of the
// token (pkcs11-tool --extractable, keyClear here) is not served by a
// backend without allow_exportable_keys, although the key store lists it:
// GetKeyMetadata, Encrypt and Decrypt answer KeyNotFoundException (so
// that KMS's CreateKey refuses it), and the log says why.
func TestExportableKeyIsKeyNotFound(t *testing.T) {
	f := newFixture(t)
	base := "/ks1/kms/xks/v1/keys/" + keyClear
	expectError(t, f.call(f.ks1[0], base+"/metadata", metaBody), http.StatusNotFound, "KeyNotFoundException")
	expectError(t, f.call(f.ks1[0], base+"/encrypt", encryptBody(random(t, 16), nil, false)), http.StatusNotFound, "KeyNotFoundException")
	s := sealed{ciphertext: random(t, 16), iv: random(t, 12), tag: random(t, 16), metadata: []byte("test-v1")}
	expectError(t, f.call(f.ks1[0], base+"/decrypt", decryptBody(s, nil)), http.StatusNotFound, "KeyNotFoundException")

	refusals := f.countLog(func(e logEntry) bool {
		return hsmLine("error", "refusing a key whose value can leave the HSM")(e) && e.str("key") == keyClear &&
			e.str("backend") == "main" && strings.Contains(e.str("why"), "CKA_EXTRACTABLE is true")
	})
	if refusals != 1 {
		t.Errorf("%d log lines say why %s is refused, want 1:\n%s", refusals, keyClear, grepLines(string(mustRead(t, f.logFile)), `"logger":"hsm`))
	}
	audited := f.countLog(func(e logEntry) bool {
		return e.str("logger") == "http.handlers.xks.audit" && e.str("external_key_id") == keyClear &&
			strings.Contains(e.str("reason"), "key value can leave the hsm")
	})
	if audited != 3 {
		t.Errorf("%d audit lines give the reason, want 3", audited)
	}
}
