package xkshandler_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// TestAdminEndpointOnTCPDoesNotRun: `caddy run` of a config with HSM
// backends and Caddy's admin endpoint on TCP, where any local user could
// POST a config to /load that serves the PIN, refuses to start, and says
// how to opt in. (It used to run, with a warning: the test then loads
// such a config through the endpoint and reads the PIN back.)
func TestAdminEndpointOnTCPDoesNotRun(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, keyBoth)
	c := newCredential(t)
	in := proxytest.NewInstance(t)
	admin := "localhost:" + strconv.Itoa(proxytest.FreePort(t))
	hsm := proxytest.Backend{Name: "main", Module: tk.Module, Token: tk.Label, PINEnv: "XKS_ADMIN_PIN"}
	cfg := strings.Replace(in.Global("\thsm {\n"+hsm.Block()+"\t}\n"), "admin unix/"+in.AdminSocket, "admin "+admin, 1) + fmt.Sprintf(`
localhost:%d {
	tls internal
	xks {
		key_store /admin {
			hsm main
			region %s
			credential %s {env.XKS_ADMIN_SECRET}
			keys %s
%s		}
	}
}
`, in.HTTPSPort, region, c.akid, keyBoth, proxytest.KeyStoreDefaults(""))
	cmd := caddyCommand(t, in, cfg, tk, "XKS_ADMIN_PIN="+tk.PIN, "XKS_ADMIN_SECRET="+c.secret)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			t.Logf("the proxy, killed: %v", <-exited)
		}
	})

	// The process exits, or its admin endpoint answers.
	client := &http.Client{Timeout: 30 * time.Second}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		select {
		case err := <-exited:
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() == 0 {
				t.Fatalf("caddy run exited with %v", err)
			}
			// Caddy reports the error in its log, which the config sends
			// to a file.
			file, _ := os.ReadFile(in.LogFile)
			if log := out.String() + string(file); !strings.Contains(log, "admin endpoint listens on TCP ("+admin+")") || !strings.Contains(log, "allow_tcp_admin") {
				t.Fatalf("caddy run failed without naming the TCP admin endpoint and allow_tcp_admin:\n%s", log)
			}
			return
		default:
		}
		if resp, err := client.Get("http://" + admin + "/config/"); err == nil {
			_ = resp.Body.Close()
			t.Fatalf("the proxy runs with its admin endpoint on TCP (GET /config/: %d); %s", resp.StatusCode, readPINThrough(t, client, admin, tk.PIN))
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy run neither exited nor served its admin endpoint after 2m:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readPINThrough loads, through an unauthenticated admin endpoint, a site
// that answers with the PIN's own placeholder, as any local user could,
// and says whether it served the PIN (never the PIN itself).
func readPINThrough(t *testing.T, client *http.Client, admin, pin string) string {
	port := proxytest.FreePort(t)
	cfg := fmt.Sprintf(`{"admin":{"listen":%q},"apps":{"http":{"servers":{"s":{"listen":[":%d"],"routes":[{"handle":[{"handler":"static_response","body":"{env.XKS_ADMIN_PIN}"}]}]}}}}}`, admin, port)
	resp, err := client.Post("http://"+admin+"/load", "application/json", strings.NewReader(cfg))
	if err != nil {
		return fmt.Sprintf("POST /load: %v", err)
	}
	_ = resp.Body.Close()
	got, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		return fmt.Sprintf("POST /load answered %d; the site: %v", resp.StatusCode, err)
	}
	defer got.Body.Close()
	body, _ := io.ReadAll(got.Body)
	return fmt.Sprintf("POST /load answered %d, and the site it loaded served the HSM PIN: %v", resp.StatusCode, string(body) == pin)
}

// TestAdminEndpointRules: with HSM backends configured, the admin endpoint
// on TCP fails the config unless the hsm option opts in by name, and then
// loads with a warning; a unix socket that others may connect to loads
// with a warning; one only the proxy's user can open, or none, loads
// quietly.
func TestAdminEndpointRules(t *testing.T) {
	f := newFixture(t)
	sock := func(name string) string { return filepath.Join(f.proxy.Dir, name) }
	tests := []struct {
		name, admin string
		optIn       bool
		wantErr     string // the load fails with this
		warning     string // the load logs a warning with this, for this admin value
	}{
		{"TCP: a config error", "localhost:" + strconv.Itoa(proxytest.FreePort(t)), false, "set allow_tcp_admin in the hsm global option", ""},
		{"TCP, allow_tcp_admin: a warning", "localhost:" + strconv.Itoa(proxytest.FreePort(t)), true, "", "admin endpoint listens on TCP"},
		{"unix socket of mode 0666: a warning", "unix/" + sock("open.sock") + "|0666", false, "", "users other than the proxy's may connect"},
		{"unix socket of mode 0620: a warning", "unix/" + sock("group.sock") + "|0620", false, "", "users other than the proxy's may connect"},
		{"unix socket of mode 0600", "unix/" + sock("own.sock") + "|0600", false, "", ""},
		{"unix socket of Caddy's default mode", "unix/" + sock("default.sock"), false, "", ""},
		{"admin off", "off", false, "", ""},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := strings.Replace(f.config(10+i), "admin unix/"+f.proxy.AdminSocket, "admin "+tt.admin, 1)
			if tt.optIn {
				cfg = strings.Replace(cfg, "\thsm {\n", "\thsm {\n\t\tallow_tcp_admin\n", 1)
			}
			err := f.proxy.TryLoad(cfg)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), tt.admin) {
					t.Fatalf("load: %v; want an error naming %s and saying %q", err, tt.admin, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			logs, err := os.ReadFile(f.logFile)
			if err != nil {
				t.Fatal(err)
			}
			named := regexp.MustCompile(`"level":"warn"[^\n]*admin endpoint[^\n]*"admin":"` + regexp.QuoteMeta(tt.admin) + `"`)
			warned := named.FindAll(logs, -1)
			switch {
			case tt.warning == "" && len(warned) > 0:
				t.Fatalf("a warning for admin %s: %s", tt.admin, warned[0])
			case tt.warning != "" && (len(warned) != 1 || !bytes.Contains(warned[0], []byte(tt.warning))):
				t.Fatalf("warnings for admin %s: %q, want one saying %q", tt.admin, warned, tt.warning)
			}
		})
	}
	// Back to the fixture's own socket, which the test's cleanup uses.
	f.load(1)
}
