package xkscmd

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/caddy-xks/caddy-xks/sigv4auth"
)

// KMS's rules for external key store credentials.
var (
	accessKeyIDSyntax = regexp.MustCompile(`^[A-Z2-7]{20,30}$`)
	secretSyntax      = regexp.MustCompile(`^[A-Za-z0-9/+=]{43,64}$`)
)

func TestCredentialMeetsKMSRules(t *testing.T) {
	seen := make(map[string]bool)
	for range 1000 {
		out, err := runCommand(t, "credential")
		if err != nil {
			t.Fatalf("credential: %v", err)
		}
		var c sigv4auth.Credential
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		if len(lines) != 2 {
			t.Fatalf("credential printed %d lines", len(lines))
		}
		for i, name := range []string{"access_key_id", "secret_access_key"} {
			f := strings.Fields(lines[i])
			if len(f) != 2 || f[0] != name {
				t.Fatalf("line %d of credential's output is not %q and a value", i+1, name)
			}
		}
		c.AccessKeyID, c.SecretAccessKey = strings.Fields(lines[0])[1], strings.Fields(lines[1])[1]
		if !accessKeyIDSyntax.MatchString(c.AccessKeyID) {
			t.Fatalf("access key id %q does not match %s", c.AccessKeyID, accessKeyIDSyntax)
		}
		if !secretSyntax.MatchString(c.SecretAccessKey) {
			t.Fatalf("a secret of %d characters does not match %s", len(c.SecretAccessKey), secretSyntax)
		}
		if err := sigv4auth.ValidateCredential(c); err != nil {
			t.Fatalf("ValidateCredential: %v", err)
		}
		for _, v := range []string{c.AccessKeyID, c.SecretAccessKey} {
			if seen[v] {
				t.Fatal("a value was drawn twice")
			}
			seen[v] = true
		}
	}
}

func TestCredentialSecretFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "secret")
	// An existing file must lose its wider mode.
	if err := os.WriteFile(file, []byte("old\n"), 0o644); err != nil { //nolint:gosec // the wide mode is what the test must see removed
		t.Fatal(err)
	}
	out, err := runCommand(t, "credential", "--secret-file", file)
	if err != nil {
		t.Fatalf("credential --secret-file: %v", err)
	}
	akid := strings.TrimSuffix(out, "\n")
	if !accessKeyIDSyntax.MatchString(akid) {
		t.Errorf("credential --secret-file printed %q, want only the access key id", out)
	}
	ownerOnly(t, file)
	secret, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.TrimSuffix(string(secret), "\n")
	if err := sigv4auth.ValidateCredential(sigv4auth.Credential{AccessKeyID: akid, SecretAccessKey: s}); err != nil {
		t.Errorf("the file does not hold a valid secret: %v", err)
	}
	if strings.Contains(out, s) {
		t.Error("the secret was printed")
	}
}

// TestCredentialSecretFileIsNew: a file or link another user made in
// advance at the path never gets the secret. The path names a new file of
// the proxy's user afterwards; what was there before is left as it was.
func TestCredentialSecretFileIsNew(t *testing.T) {
	dir := t.TempDir()
	t.Run("a file of another user", func(t *testing.T) {
		file := filepath.Join(dir, "secret-1")
		if err := os.WriteFile(file, nil, 0o666); err != nil { //nolint:gosec // the other user's world-writable file is the attack
			t.Fatal(err)
		}
		if os.Geteuid() == 0 {
			if err := os.Chown(file, 65534, 65534); err != nil { // nobody
				t.Fatal(err)
			}
		}
		theirs, err := os.Open(file) //nolint:gosec // the test's own file
		if err != nil {
			t.Fatal(err)
		}
		defer theirs.Close()
		if _, err := runCommand(t, "credential", "--secret-file", file); err != nil {
			t.Fatal(err)
		}
		ownerOnly(t, file)
		if info, err := os.Stat(file); err != nil || !ownedByMe(info) {
			t.Fatalf("the secret file is not the proxy user's own: %v", err)
		}
		if leaked, _ := io.ReadAll(theirs); len(leaked) != 0 {
			t.Fatal("the other user's open file got the secret")
		}
	})
	t.Run("a symlink", func(t *testing.T) {
		victim := filepath.Join(dir, "victim")
		if err := os.WriteFile(victim, []byte("untouched\n"), 0o644); err != nil { //nolint:gosec // a file someone else reads
			t.Fatal(err)
		}
		link := filepath.Join(dir, "secret-2")
		if err := os.Symlink(victim, link); err != nil {
			t.Fatal(err)
		}
		if _, err := runCommand(t, "credential", "--secret-file", link); err != nil {
			t.Fatal(err)
		}
		if info, err := os.Lstat(link); err != nil || !info.Mode().IsRegular() {
			t.Fatalf("the path is not a regular file afterwards: %v %v", info, err)
		}
		if b, _ := os.ReadFile(victim); string(b) != "untouched\n" { //nolint:gosec // the test's own file
			t.Fatalf("the link's target was written: %q", b)
		}
		ownerOnly(t, link)
	})
	if leftovers, _ := filepath.Glob(filepath.Join(dir, ".*.new-*")); len(leftovers) != 0 {
		t.Errorf("temporary files left behind: %v", leftovers)
	}
}

// ownedByMe reports whether the file belongs to the process's user.
func ownedByMe(info os.FileInfo) bool {
	st, ok := info.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Geteuid()
}

// ownerOnly checks that a file that holds a secret has mode 0600.
func ownerOnly(t *testing.T, file string) {
	t.Helper()
	fi, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("%s has mode %v, want 0600", filepath.Base(file), mode)
	}
}

// proxyConfigFixture writes a Caddyfile with two key stores, the first
// with two credentials, and returns it and the credentials.
func proxyConfigFixture(t *testing.T) (config string, creds []sigv4auth.Credential) {
	t.Helper()
	for range 3 {
		c, err := sigv4auth.NewCredential()
		if err != nil {
			t.Fatal(err)
		}
		creds = append(creds, c)
	}
	t.Setenv("XKSCMD_TEST_SECRET_1", creds[0].SecretAccessKey)
	dir := t.TempDir()
	secretFile := writeFile(t, dir, "secret-2", creds[1].SecretAccessKey+"\n")
	t.Setenv("XKSCMD_TEST_SECRET_3", creds[2].SecretAccessKey)
	config = writeFile(t, dir, "Caddyfile", `{
	hsm {
		pkcs11 main {
			module /usr/lib/softhsm/libsofthsm2.so
			token xks
			pin {env.XKSCMD_TEST_PIN}
		}
	}
}

xks.example.com {
	xks {
		key_store /tenant-a {
			hsm main
			region us-east-1
			credential `+creds[0].AccessKeyID+` {env.XKSCMD_TEST_SECRET_1}
			credential `+creds[1].AccessKeyID+` {file.`+secretFile+`}
			keys xks-key-1
		}
		key_store /tenant-b/kms/xks/v1 {
			hsm main
			region us-east-1
			credential `+creds[2].AccessKeyID+` {env.XKSCMD_TEST_SECRET_3}
			keys xks-key-2
		}
	}
}
`)
	return config, creds
}

// consoleFile checks that out is exactly the KMS console's import format
// and returns it decoded.
func consoleFile(t *testing.T, out []byte) consoleProxyConfig {
	t.Helper()
	var top map[string]json.RawMessage
	if err := json.Unmarshal(out, &top); err != nil {
		t.Fatalf("proxy-config output is not JSON: %v", err)
	}
	if keys := mapKeys(top); !slices.Equal(keys, []string{"XksProxyAuthenticationCredential", "XksProxyUriPath"}) {
		t.Errorf("top-level keys %q", keys)
	}
	var cred map[string]json.RawMessage
	if err := json.Unmarshal(top["XksProxyAuthenticationCredential"], &cred); err != nil {
		t.Fatalf("XksProxyAuthenticationCredential: %v", err)
	}
	if keys := mapKeys(cred); !slices.Equal(keys, []string{"AccessKeyId", "RawSecretAccessKey"}) {
		t.Errorf("XksProxyAuthenticationCredential keys %q", keys)
	}
	var pc consoleProxyConfig
	if err := json.Unmarshal(out, &pc); err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(pc.XksProxyURIPath, "/kms/xks/v1") {
		t.Errorf("XksProxyUriPath %q does not end with /kms/xks/v1", pc.XksProxyURIPath)
	}
	return pc
}

func mapKeys(m map[string]json.RawMessage) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func TestProxyConfig(t *testing.T) {
	config, creds := proxyConfigFixture(t)
	for _, tc := range []struct {
		name string
		args []string
		path string
		cred sigv4auth.Credential
	}{
		{"first credential of a key store", []string{"--key-store", "/tenant-a/kms/xks/v1"}, "/tenant-a/kms/xks/v1", creds[0]},
		{"credential chosen by access key id", []string{"--key-store", "/tenant-a/kms/xks/v1", "--access-key-id", creds[1].AccessKeyID}, "/tenant-a/kms/xks/v1", creds[1]},
		{"other key store", []string{"--key-store", "/tenant-b/kms/xks/v1"}, "/tenant-b/kms/xks/v1", creds[2]},
		{"key store path without /kms/xks/v1, as in the Caddyfile", []string{"--key-store", "/tenant-b"}, "/tenant-b/kms/xks/v1", creds[2]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runCommand(t, "proxy-config", append([]string{"--config", config}, tc.args...)...)
			if err != nil {
				t.Fatalf("proxy-config: %v", err)
			}
			pc := consoleFile(t, []byte(out))
			if pc.XksProxyURIPath != tc.path {
				t.Errorf("XksProxyUriPath %q, want %q", pc.XksProxyURIPath, tc.path)
			}
			got := pc.XksProxyAuthenticationCredential
			if got.AccessKeyID != tc.cred.AccessKeyID || got.RawSecretAccessKey != tc.cred.SecretAccessKey {
				t.Errorf("credential %s with the wrong secret or id, want %s and its resolved secret", got.AccessKeyID, tc.cred.AccessKeyID)
			}
		})
	}
}

func TestProxyConfigOutputFile(t *testing.T) {
	config, creds := proxyConfigFixture(t)
	file := filepath.Join(t.TempDir(), "proxy-config.json")
	out, err := runCommand(t, "proxy-config", "--config", config, "--key-store", "/tenant-b/kms/xks/v1", "--output", file)
	if err != nil {
		t.Fatalf("proxy-config --output: %v", err)
	}
	if out != "" {
		t.Error("proxy-config --output printed the file too")
	}
	ownerOnly(t, file)
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if pc := consoleFile(t, raw); pc.XksProxyAuthenticationCredential.RawSecretAccessKey != creds[2].SecretAccessKey {
		t.Error("the file does not hold the resolved secret")
	}
}

func TestProxyConfigErrors(t *testing.T) {
	config, creds := proxyConfigFixture(t)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown access key id", []string{"--key-store", "/tenant-a/kms/xks/v1", "--access-key-id", creds[2].AccessKeyID}, creds[2].AccessKeyID},
		{"unknown key store", []string{"--key-store", "/tenant-c/kms/xks/v1"}, "/tenant-c/kms/xks/v1"},
		{"key store needed among two", nil, "--key-store"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runCommand(t, "proxy-config", append([]string{"--config", config}, tc.args...)...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one naming %s", err, tc.want)
			}
			if out != "" {
				t.Errorf("printed %q", out)
			}
		})
	}
}
