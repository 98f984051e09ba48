package caddyfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"

	_ "github.com/caddy-xks/caddy-xks/tlscheck" // the xks_subject client-auth verifier
)

// TestCaddyfileAdapt runs every testdata/caddyfile_adapt/*.caddyfiletest:
// a Caddyfile, a line of ten dashes, then either the JSON it must adapt to or
// a substring of the error it must fail with.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile_adapt/*.caddyfiletest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no adapt tests found: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".caddyfiletest"), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			in, want, found := strings.Cut(string(data), "\n----------\n")
			if !found {
				t.Fatalf("%s: no ---------- separator", f)
			}
			in, want = strings.TrimSpace(in)+"\n", strings.TrimSpace(want)
			if want == "" {
				t.Fatalf("%s: nothing after the separator: give the JSON or the error", f)
			}
			if strings.HasPrefix(want, "{") {
				if !caddytest.CompareAdapt(t, f, in, "caddyfile", want) {
					t.Error("adapted JSON differs (diff above)")
				}
				return
			}
			_, _, err = caddyconfig.GetAdapter("caddyfile").Adapt([]byte(in), nil)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("want an error containing %q, got %v", want, err)
			}
		})
	}
}
