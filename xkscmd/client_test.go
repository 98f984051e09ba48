package xkscmd

import (
	"net/http"
	"os"
	"path/filepath"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/pflag"

	"github.com/caddy-xks/caddy-xks/internal/testcert"
)

func TestClientTargetWithProxyConfig(t *testing.T) {
	file := filepath.Join(t.TempDir(), "proxy-config.json")
	err := os.WriteFile(file, []byte(`{"XksProxyUriPath":"/tenant/kms/xks/v1","XksProxyAuthenticationCredential":{"AccessKeyId":"ABCDEFGHIJKLMNOPQRST","RawSecretAccessKey":"PleaseReplaceThisWithSomeSecretOfLength43To64"}}`), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ target, want string }{
		{"https://xks.example.com", "https://xks.example.com/tenant/kms/xks/v1"},
		{"https://xks.example.com/", "https://xks.example.com/tenant/kms/xks/v1"},
		{"https://xks.example.com/tenant/kms/xks/v1", "https://xks.example.com/tenant/kms/xks/v1"},
		{"https://xks.example.com:8443/bare", "https://xks.example.com:8443/bare"},
	} {
		fs := pflag.NewFlagSet("client", pflag.ContinueOnError)
		clientFlags(fs)
		if err := fs.Parse([]string{"--proxy-config", file}); err != nil {
			t.Fatal(err)
		}
		c, err := clientFromFlags(caddycmd.Flags{FlagSet: fs}, tc.target, 1)
		if err != nil {
			t.Fatal(err)
		}
		if c.base != tc.want || c.credential.AccessKeyID != "ABCDEFGHIJKLMNOPQRST" {
			t.Errorf("target %s: base %s, want %s", tc.target, c.base, tc.want)
		}
	}
}

func TestClientCertificateForMTLS(t *testing.T) {
	cert, key := testcert.Localhost(t, t.TempDir())
	for _, tc := range []struct {
		name  string
		args  []string
		certs int
		ok    bool
	}{
		{"none", nil, 0, true},
		{"pair", []string{"--client-cert", cert, "--client-key", key}, 1, true},
		{"key missing", []string{"--client-cert", cert}, 0, false},
		{"unreadable", []string{"--client-cert", cert, "--client-key", "/nonexistent"}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := pflag.NewFlagSet("client", pflag.ContinueOnError)
			clientFlags(fs)
			secret := filepath.Join(t.TempDir(), "secret")
			if err := os.WriteFile(secret, []byte("PleaseReplaceThisWithSomeSecretOfLength43To64\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := fs.Parse(append([]string{"--access-key-id", "ABCDEFGHIJKLMNOPQRST", "--secret-file", secret}, tc.args...)); err != nil {
				t.Fatal(err)
			}
			c, err := clientFromFlags(caddycmd.Flags{FlagSet: fs}, "https://localhost/kms/xks/v1", 1)
			if (err == nil) != tc.ok {
				t.Fatalf("clientFromFlags: %v", err)
			}
			if err != nil {
				return
			}
			if n := len(c.http.Transport.(*http.Transport).TLSClientConfig.Certificates); n != tc.certs {
				t.Fatalf("%d client certificates, want %d", n, tc.certs)
			}
		})
	}
}
