package sigv4auth

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

// TestVerifyAcceptsCurlSignatures has curl --aws-sigv4 sign requests to a
// loopback server that verifies them with the real clock.
func TestVerifyAcceptsCurlSignatures(t *testing.T) {
	curl := testenv.CurlWithSigV4(t)
	v, err := NewVerifier(Config{Region: "us-east-1", Credentials: []Credential{testCredential, rotatedCredential}})
	if err != nil {
		t.Fatal(err)
	}
	seen := make(chan string, 1)
	verify := verifyingServer(v)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.RequestURI
		verify.ServeHTTP(w, r)
	}))
	defer srv.Close()

	tests := []struct {
		name, path string
		cred       Credential
		body       string
		wantStatus string
	}{
		{"health check", "/example/uri/path/prefix/kms/xks/v1/health", testCredential,
			`{"requestMetadata":{"kmsOperation":"KmsHealthCheck","kmsRequestId":"x"}}`, "204"},
		{"encrypt under a prefix with dots dashes underscores", "/xks.proxy-v1_a/kms/xks/v1/keys/key-1.a_b/encrypt", testCredential,
			`{"requestMetadata":{"kmsOperation":"Encrypt","kmsRequestId":"Grüße"},"plaintext":"SGVsbG8="}`, "204"},
		{"empty prefix keeps double slash", "//kms/xks/v1/health", testCredential,
			`{"requestMetadata":{"kmsOperation":"KmsHealthCheck","kmsRequestId":"x"}}`, "204"},
		{"rotated credential with 10 KiB body", "/p/kms/xks/v1/keys/k/decrypt", rotatedCredential,
			strings.Repeat(`{"ciphertext":"AAAA"}`, 512), "204"},
		{"secret not configured", "/p/kms/xks/v1/health",
			Credential{AccessKeyID: testCredential.AccessKeyID, SecretAccessKey: rotatedCredential.SecretAccessKey},
			`{}`, "401"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(curl, "-q", "-sS", "--noproxy", "*",
				"--aws-sigv4", "aws:amz:us-east-1:kms-xks-proxy",
				"--user", tt.cred.AccessKeyID+":"+tt.cred.SecretAccessKey,
				"-H", "Content-Type: application/json",
				"--data-binary", "@-",
				"-w", "\n%{http_code}",
				srv.URL+tt.path)
			cmd.Stdin = strings.NewReader(tt.body)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("curl: %v: %s", err, out)
			}
			if got := <-seen; got != tt.path {
				t.Errorf("server saw path %q, want %q", got, tt.path)
			}
			text := string(bytes.TrimSpace(out))
			i := strings.LastIndexByte(text, '\n')
			msg, status := text[:max(i, 0)], text[i+1:]
			if status != tt.wantStatus {
				t.Fatalf("status %s, want %s: %s", status, tt.wantStatus, msg)
			}
		})
	}
}
