package xkscmd

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/internal/testcert"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// TestKeysShowsVersionUsage: after Encrypts through a running proxy, `caddy
// xks keys` with the same config shows each version of the key, its state,
// and the count the proxy wrote to the config's storage.
func TestKeysShowsVersionUsage(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "uk")
	tk.CreateKey(t, "uk-v2")
	dir := t.TempDir()
	cred, err := sigv4auth.NewCredential()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("XKSCMD_USAGE_SECRET", cred.SecretAccessKey)
	cert, key := testcert.Localhost(t, dir)
	p := proxytest.New(t)
	p.Trust(cert)
	config := p.Global("\thsm {\n"+backendBlock(t, "main", tk)+"\t}\n") + fmt.Sprintf(`
localhost:%d {
	tls %s %s
	xks {
		usage_flush_interval 50ms
		key_store /u {
			hsm main
			region %s
			credential %s {env.XKSCMD_USAGE_SECRET}
			keys uk
			encrypt_limit 1000
			versions uk {
				version 2 uk-v2
				current 2
			}
%s		}
	}
}
`, p.HTTPSPort, cert, key, region, cred.AccessKeyID, proxytest.KeyStoreDefaults(""))
	file := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(file, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &xksClient{base: p.Origin() + "/u/kms/xks/v1", region: region, http: p.Client, signer: v4.NewSigner(), now: time.Now,
		credential: aws.Credentials{AccessKeyID: cred.AccessKeyID, SecretAccessKey: cred.SecretAccessKey}}
	encrypt := func() (result, error) {
		return c.call(context.Background(), http.MethodPost, "/keys/uk/encrypt",
			mustJSON(xksapi.EncryptRequest{RequestMetadata: benchMetadata, Plaintext: []byte("counted"), Algorithm: "AES_GCM"}), nil)
	}
	p.Ready = func() error {
		r, err := c.call(context.Background(), http.MethodPost, "/health", mustJSON(xksapi.MetadataOnlyRequest{RequestMetadata: benchMetadata}), nil)
		if err == nil && r.status != http.StatusOK {
			err = fmt.Errorf("health: %d %s", r.status, r.body)
		}
		return err
	}
	p.Load(config)
	for range 3 {
		if r, err := encrypt(); err != nil || r.status != http.StatusOK {
			t.Fatalf("encrypt: %v %d %s", err, r.status, r.body)
		}
	}
	// The proxy writes its count every 50 ms.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, err := runCommand(t, "keys", "--config", file)
		if err != nil {
			t.Fatalf("keys: %v\n%s", err, out)
		}
		v1, v2 := usageRow(out, "uk"), usageRow(out, "uk-v2")
		if v1 == "/u/kms/xks/v1 uk 1 uk retired 0 1000 0.00% -" && strings.HasPrefix(v2, "/u/kms/xks/v1 uk 2 uk-v2 current 3 1000 0.30% ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("keys does not show the usage of both versions:\n%s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// usageRow is the usage table's row of a version label, fields joined by
// single spaces.
func usageRow(out, label string) string {
	for line := range strings.SplitSeq(out, "\n") {
		if f := strings.Fields(line); len(f) > 3 && f[3] == label && strings.HasPrefix(f[0], "/") {
			return strings.Join(f, " ")
		}
	}
	return ""
}

// TestKeysReadsOnlyUsageRecords: with keys "*", the labels on the token
// name usage records in storage; a label that is not a valid external key
// id ("../..") is said to be one, and nothing outside the usage records is
// read for it.
func TestKeysReadsOnlyUsageRecords(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "uk")
	tk.CreateKey(t, "../..")
	in := proxytest.NewInstance(t)
	// What "../.." leads to from xks/usage/<label>: the storage's root.
	if err := os.MkdirAll(in.Storage, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, in.Storage, "planted.json", `{"instance":"planted","label":"../..","encryptions":7}`)
	t.Setenv("XKSCMD_USAGE_SECRET", strings.Repeat("s", 43))
	config := in.Global("\thsm {\n"+backendBlock(t, "main", tk)+"\t}\n") + fmt.Sprintf(`
localhost:%d {
	xks {
		key_store /u {
			hsm main
			region %s
			credential AAAAAAAAAAAAAAAAAAAA {env.XKSCMD_USAGE_SECRET}
			keys *
		}
	}
}
`, in.HTTPSPort, region)
	file := writeFile(t, t.TempDir(), "Caddyfile", config)
	out, err := runCommand(t, "keys", "--config", file)
	if err != nil {
		t.Fatalf("keys: %v\n%s", err, out)
	}
	if row := usageRow(out, "uk"); row != "/u/kms/xks/v1 uk 1 uk current 0 4294967296 0.00% -" {
		t.Errorf("the usage row of uk is %q:\n%s", row, out)
	}
	if row := usageRow(out, "../.."); row != "" {
		t.Errorf("a usage row for \"../..\", read from outside the usage records: %q", row)
	}
	if !strings.Contains(out, `"../..": not a valid external key id`) {
		t.Errorf("keys does not say that \"../..\" is not a valid external key id:\n%s", out)
	}
}
