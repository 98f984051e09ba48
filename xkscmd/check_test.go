package xkscmd

import (
	"fmt"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/sigv4auth"
)

// checkRows are the rows check prints with --encrypt-only-key.
var checkRows = []string{
	"health", "metadata", "round trip", "round trip with AAD", "CDIV", "largest request",
	"unknown key", "wrong secret", "wrong URI prefix", "tampered ciphertext", "wrong AAD",
	"GET method", "malformed body", "encrypt-only CDIV", "latency",
}

// TestCheckPassesAgainstACorrectProxy runs every check over HTTP/2 and
// over HTTP/1.1, which the spec requires a proxy to fall back to.
func TestCheckPassesAgainstACorrectProxy(t *testing.T) {
	p := startProxy(t)
	for _, tc := range clientProtocols {
		t.Run(tc.name, func(t *testing.T) {
			args := append(p.checkArgs(), tc.args...)
			args = append(args, "--key", keyDemo, "--encrypt-only-key", keyEncryptOnly, "--samples", "20", p.url("/good"))
			out, err := runCommand(t, "check", args...)
			t.Logf("caddy xks check:\n%s", out)
			if err != nil {
				t.Fatalf("check failed: %v", err)
			}
			rows := parseTable(t, out)
			for _, name := range checkRows {
				if rows[name].result != "PASS" {
					t.Errorf("row %q: %+v, want PASS", name, rows[name])
				}
			}
			if len(rows) != len(checkRows) {
				t.Errorf("%d rows, want %d", len(rows), len(checkRows))
			}
			for _, want := range []string{"\nprotocol " + tc.protocol + "\n", "\np50 ", "\np99 "} {
				if !strings.Contains(out, want) {
					t.Errorf("output has no %q line", strings.TrimSpace(want))
				}
			}
		})
	}
}

// TestCheckThroughMTLS checks a site that requires KMS's client certificate:
// with an accepted client certificate every row passes; without one the
// handshake fails and check says so.
func TestCheckThroughMTLS(t *testing.T) {
	p := startProxy(t)
	url := p.mtlsOrigin + "/good/kms/xks/v1"
	args := append(p.checkArgs(), "--key", keyDemo, "--samples", "5")
	out, err := runCommand(t, "check", append(args, "--client-cert", p.clientCert, "--client-key", p.clientKey, url)...)
	if err != nil {
		t.Fatalf("check with a client certificate: %v\n%s", err, out)
	}
	if rows := parseTable(t, out); rows["health"].result != "PASS" || rows["round trip"].result != "PASS" {
		t.Fatalf("rows %+v", rows)
	}
	out, err = runCommand(t, "check", append(args, url)...)
	if err == nil {
		t.Fatalf("check without a client certificate passed:\n%s", out)
	}
	if rows := parseTable(t, out); rows["health"].result != "FAIL" {
		t.Fatalf("health row without a client certificate: %+v", rows["health"])
	}
}

func TestCheckSkipsEncryptOnlyWithoutItsKey(t *testing.T) {
	p := startProxy(t)
	out, err := runCommand(t, "check", append(p.checkArgs(), "--samples", "5", p.url("/good"))...)
	if err != nil {
		t.Fatalf("check failed: %v\n%s", err, out)
	}
	if _, ok := parseTable(t, out)["encrypt-only CDIV"]; ok {
		t.Error("the encrypt-only CDIV check ran without --encrypt-only-key")
	}
}

// expectFailures checks that exactly the rows named fail, each with a
// detail containing its wanted text, and that the error counts them.
func expectFailures(t *testing.T, out string, err error, failing map[string]string) {
	t.Helper()
	if err == nil {
		t.Fatalf("check passed:\n%s", out)
	}
	rows := parseTable(t, out)
	for name, row := range rows {
		want, fails := failing[name]
		switch {
		case fails && row.result != "FAIL":
			t.Errorf("row %q: %+v, want FAIL", name, row)
		case fails && !strings.Contains(row.detail, want):
			t.Errorf("row %q: detail %q, want it to say %q", name, row.detail, want)
		case !fails && row.result != "PASS":
			t.Errorf("row %q: %+v, want PASS", name, row)
		}
	}
	for name := range failing {
		if _, ok := rows[name]; !ok {
			t.Errorf("no row %q", name)
		}
	}
	if msg := err.Error(); !strings.HasPrefix(msg, fmt.Sprintf("%d of ", len(failing))) {
		t.Errorf("error %q does not count %d failed checks", msg, len(failing))
	}
	if t.Failed() {
		t.Logf("caddy xks check:\n%s", out)
	}
}

func TestCheckFailsWithAWrongSecret(t *testing.T) {
	p := startProxy(t)
	other, err := sigv4auth.NewCredential()
	if err != nil {
		t.Fatal(err)
	}
	p.secretFile = writeFile(t, t.TempDir(), "other-secret", other.SecretAccessKey)
	out, err := runCommand(t, "check", append(p.checkArgs(), "--samples", "5", p.url("/good"))...)
	// Only the checks answered before authentication, and the one that
	// expects an authentication failure, pass.
	auth := "401 AuthenticationFailedException"
	expectFailures(t, out, err, map[string]string{
		"health": auth, "metadata": auth, "round trip": auth, "round trip with AAD": auth, "CDIV": auth,
		"largest request": auth, "unknown key": auth, "tampered ciphertext": auth, "wrong AAD": auth,
		"malformed body": auth, "latency": auth,
	})
}

func TestCheckFailsWithAnAES128Key(t *testing.T) {
	p := startProxy(t)
	out, err := runCommand(t, "check", append(p.checkArgs(), "--samples", "5", p.url("/broken"))...)
	// KMS's CreateKey would refuse the key, and the proxy uses only
	// AES-256 keys.
	usage := "InvalidKeyUsageException"
	expectFailures(t, out, err, map[string]string{
		"metadata": "AES_128 ENCRYPT,DECRYPT ENABLED: keySpec must be AES_256", "round trip": usage, "round trip with AAD": usage,
		"CDIV": usage, "largest request": usage, "tampered ciphertext": usage, "wrong AAD": usage, "latency": usage,
	})
}

func TestCheckFailsWithAKeyThatCannotDecrypt(t *testing.T) {
	p := startProxy(t)
	out, err := runCommand(t, "check", append(p.checkArgs(), "--key", keyEncryptOnly, "--samples", "5", p.url("/good"))...)
	noDecrypt := "InvalidKeyUsageException"
	expectFailures(t, out, err, map[string]string{
		"metadata": "keyUsage must contain ENCRYPT and DECRYPT", "round trip": noDecrypt, "round trip with AAD": noDecrypt,
		"CDIV": noDecrypt, "largest request": noDecrypt, "tampered ciphertext": noDecrypt, "wrong AAD": noDecrypt,
	})
}

// TestCheckLatencyLimit: the latency row fails at a p99 of --max-p99 or
// more, and only that row.
func TestCheckLatencyLimit(t *testing.T) {
	p := startProxy(t)
	out, err := runCommand(t, "check", append(p.clientArgs(), "--max-p99", "1ns", "--samples", "2", p.url("/good"))...)
	if err == nil {
		t.Fatalf("check passed with a 1ns latency limit:\n%s", out)
	}
	rows := parseTable(t, out)
	if rows["latency"].result != "FAIL" || !strings.Contains(rows["latency"].detail, "the limit is 1ns") {
		t.Errorf("latency row %+v", rows["latency"])
	}
	if rows["health"].result != "PASS" {
		t.Errorf("health row %+v", rows["health"])
	}
}
