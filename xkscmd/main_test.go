package xkscmd

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/miekg/pkcs11"
	"github.com/spf13/pflag"

	_ "github.com/caddy-xks/caddy-xks/caddyfile"
	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/internal/testcert"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
	_ "github.com/caddy-xks/caddy-xks/tlscheck" // the xks_subject client-auth verifier
)

// The tests run each command in-process with the flag set it is registered
// with, against SoftHSM2 tokens and, for check and bench, a real Caddy with
// the plugin on loopback.

func TestMain(m *testing.M) { os.Exit(hsmtest.Main(m)) }

// runCommand runs the xks subcommand name with args, as caddy would, and
// returns what it printed.
func runCommand(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	i := slices.IndexFunc(subcommands, func(sc subcommand) bool { return sc.name == name })
	if i < 0 {
		t.Fatalf("no subcommand %q", name)
	}
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	subcommands[i].flags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("caddy xks %s %s: %v", name, strings.Join(args, " "), err)
	}
	var out bytes.Buffer
	code, err := subcommands[i].run(caddycmd.Flags{FlagSet: fs}, &out)
	if (code == caddy.ExitCodeSuccess) != (err == nil) {
		t.Errorf("caddy xks %s: exit code %d with error %v", name, code, err)
	}
	return out.String(), err
}

// writeFile writes a test file readable by the owner only.
func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// backendBlock is a pkcs11 backend of the hsm global option for a token,
// its PIN read from the environment as in production.
func backendBlock(t *testing.T, name string, tk hsmtest.Token) string {
	t.Helper()
	env := "XKSCMD_TEST_PIN_" + strings.ToUpper(name)
	t.Setenv(env, tk.PIN)
	return proxytest.Backend{Name: name, Module: tk.Module, Token: tk.Label, PINEnv: env}.Block()
}

const region = "us-east-1"

// Keys of the proxy's tokens.
const (
	keyDemo        = "demo-key"
	keyEncryptOnly = "demo-encrypt-only"
)

// proxy is a running caddy-xks with two key stores: /good, whose keys are
// right, and /broken, whose demo-key is an AES-128 key.
type proxy struct {
	dir        string
	origin     string // the site with both key stores
	mtlsOrigin string // a site that requires KMS's client certificate
	cacert     string
	akid       string
	secretFile string
	// clientCert and clientKey are a client certificate the mTLS site
	// accepts: CN cks.kms.<region>.amazonaws.com from its trusted CA.
	clientCert, clientKey string
}

func (p proxy) url(keyStore string) string {
	return p.origin + keyStore + "/kms/xks/v1"
}

// clientArgs are the flags that let check and bench call the key store
// with the proxy's credential.
func (p proxy) clientArgs() []string {
	return []string{"--access-key-id", p.akid, "--secret-file", p.secretFile, "--cacert", p.cacert}
}

func startProxy(t *testing.T) proxy {
	t.Helper()
	good, broken := hsmtest.NewToken(t), hsmtest.NewToken(t)
	good.CreateKey(t, keyDemo)
	good.CreateKey(t, keyEncryptOnly, hsmtest.Usage(pkcs11.CKA_DECRYPT, false))
	broken.CreateKey(t, keyDemo, hsmtest.Bytes(16))

	p := proxy{dir: t.TempDir()}
	cred, err := sigv4auth.NewCredential()
	if err != nil {
		t.Fatal(err)
	}
	p.akid = cred.AccessKeyID
	p.secretFile = writeFile(t, p.dir, "secret", cred.SecretAccessKey+"\n")
	t.Setenv("XKSCMD_TEST_SECRET", cred.SecretAccessKey)
	var key string
	p.cacert, key = testcert.Localhost(t, p.dir)
	clientCA, clientCert, clientKey := testcert.ClientPKI(t, p.dir, "cks.kms."+region+".amazonaws.com")
	p.clientCert, p.clientKey = clientCert, clientKey

	caddy := proxytest.New(t)
	caddy.Trust(p.cacert)
	mtlsPort := proxytest.FreePort(t)
	p.origin = caddy.Origin()
	p.mtlsOrigin = fmt.Sprintf("https://localhost:%d", mtlsPort)
	ksDefaults := proxytest.KeyStoreDefaults("")
	config := caddy.Global("\thsm {\n"+backendBlock(t, "main", good)+backendBlock(t, "broken", broken)+"\t}\n") + fmt.Sprintf(`
localhost:%[1]d {
	tls %[2]s %[3]s
	xks {
		key_store /good {
			hsm main
			region %[4]s
			credential %[5]s {env.XKSCMD_TEST_SECRET}
			keys %[6]s %[7]s
%[10]s		}
		key_store /broken {
			hsm broken
			region %[4]s
			credential %[5]s {env.XKSCMD_TEST_SECRET}
			keys %[6]s
%[10]s		}
	}
}

localhost:%[8]d {
	tls %[2]s %[3]s {
		client_auth {
			mode require_and_verify
			trust_pool file %[9]s
			verifier xks_subject cks.kms.%[4]s.amazonaws.com
		}
	}
	xks {
		key_store /good {
			hsm main
			region %[4]s
			credential %[5]s {env.XKSCMD_TEST_SECRET}
			keys %[6]s %[7]s
%[10]s		}
	}
}
`, caddy.HTTPSPort, p.cacert, key, region, p.akid, keyDemo, keyEncryptOnly, mtlsPort, clientCA, ksDefaults)
	// The key store answers once its handler runs: an unsigned call is
	// refused in XKS terms.
	caddy.Ready = unsignedHealthAnswers(caddy.Client, p.url("/good"))
	caddy.Load(config)
	return p
}

// checkArgs are clientArgs for check, whose latency row must not fail
// because the test machine is busy: KMS's 250 ms is the product's limit,
// not the test's.
func (p proxy) checkArgs() []string {
	return append(p.clientArgs(), "--max-p99", "1m")
}

// tableRow is one row of check's table.
// clientProtocols are the ways bench and check can speak to a proxy: the
// flags that choose one, and the version the proxy answers with.
var clientProtocols = []struct {
	name     string
	args     []string
	protocol string
}{{"HTTP/2", nil, "HTTP/2.0"}, {"HTTP/1.1", []string{"--http1"}, "HTTP/1.1"}}

type tableRow struct{ result, detail string }

var columnGap = regexp.MustCompile(`\s{2,}`)

// parseTable reads check's table, from its CHECK RESULT DETAIL header to
// the first blank line.
func parseTable(t *testing.T, out string) map[string]tableRow {
	t.Helper()
	rows := make(map[string]tableRow)
	in := false
	for line := range strings.SplitSeq(out, "\n") {
		if strings.HasPrefix(line, "CHECK") {
			in = true
			continue
		}
		if !in {
			continue
		}
		if strings.TrimSpace(line) == "" {
			break
		}
		f := columnGap.Split(strings.TrimSpace(line), 3)
		if len(f) < 2 {
			t.Fatalf("row %q of:\n%s", line, out)
		}
		row := tableRow{result: f[1]}
		if len(f) == 3 {
			row.detail = f[2]
		}
		rows[f[0]] = row
	}
	if len(rows) == 0 {
		t.Fatalf("no table in:\n%s", out)
	}
	return rows
}
