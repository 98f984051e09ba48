package sigv4auth

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// curlWithSigV4 returns the path of a curl that supports --aws-sigv4
// (7.75 or later) or skips the test.
func curlWithSigV4(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not installed; the curl --aws-sigv4 interoperability test needs curl 7.75 or later")
	}
	out, err := exec.Command(path, "--version").Output()
	if err != nil {
		t.Skipf("curl --version failed: %v", err)
	}
	m := regexp.MustCompile(`^curl (\d+)\.(\d+)`).FindSubmatch(out)
	if m == nil {
		t.Skipf("cannot read the curl version from %q", firstLine(out))
	}
	major, _ := strconv.Atoi(string(m[1]))
	minor, _ := strconv.Atoi(string(m[2]))
	if major < 7 || major == 7 && minor < 75 {
		t.Skipf("curl %d.%d has no --aws-sigv4; 7.75 or later is needed", major, minor)
	}
	return path
}

func firstLine(b []byte) string {
	line, _, _ := bytes.Cut(b, []byte("\n"))
	return string(line)
}

// TestVerifyAcceptsCurlSignatures has curl --aws-sigv4 sign requests to a
// loopback server that verifies them with the real clock.
func TestVerifyAcceptsCurlSignatures(t *testing.T) {
	curl := curlWithSigV4(t)
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
