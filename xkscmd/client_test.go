package xkscmd

import (
	"os"
	"path/filepath"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/pflag"
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
