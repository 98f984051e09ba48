package hsm

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
)

// evilModule builds a shared library whose constructor writes marker: what
// a local user could put where the proxy loads its PKCS#11 module from.
func evilModule(t *testing.T, dir, marker string) string {
	t.Helper()
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("no C compiler")
	}
	src := filepath.Join(t.TempDir(), "evil.c")
	code := `#include <stdio.h>
__attribute__((constructor)) static void run(void) { FILE *f = fopen("` + marker + `", "w"); if (f) fclose(f); }
`
	if err := os.WriteFile(src, []byte(code), 0o600); err != nil {
		t.Fatal(err)
	}
	lib := filepath.Join(dir, "libevil.so")
	if out, err := exec.Command(cc, "-shared", "-fPIC", "-o", lib, src).CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}
	return lib
}

// TestModulePathIsCheckedBeforeLoading: a module that a local user could
// have written or replaced is refused with an error naming its path, and
// its code never runs.
func TestModulePathIsCheckedBeforeLoading(t *testing.T) {
	base := t.TempDir()
	worldWritable := filepath.Join(base, "world")
	if err := os.Mkdir(worldWritable, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(worldWritable, 0o777); err != nil { //nolint:gosec // the attack
		t.Fatal(err)
	}
	marker := filepath.Join(base, "constructor-ran")
	lib := evilModule(t, worldWritable, marker)

	_, err := Open("evil", Config{Module: lib, Token: "t", PIN: "p"}, zaptest.NewLogger(t))
	if err == nil || !strings.Contains(err.Error(), lib) || !strings.Contains(err.Error(), "writable by group or others") {
		t.Fatalf("Open of a module in a world-writable directory: %v", err)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the module's constructor ran: the path was checked after dlopen")
	}
}

func TestCheckModulePath(t *testing.T) {
	base := t.TempDir()
	write := func(dir, name string, mode os.FileMode) string {
		t.Helper()
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	sticky := filepath.Join(base, "sticky")
	if err := os.Mkdir(sticky, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sticky, 0o777|os.ModeSticky); err != nil { //nolint:gosec // as /tmp
		t.Fatal(err)
	}
	groupDir := filepath.Join(base, "group")
	if err := os.Mkdir(groupDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(groupDir, 0o775); err != nil { //nolint:gosec // the attack
		t.Fatal(err)
	}
	link := filepath.Join(base, "link.so")
	if err := os.Symlink(write(filepath.Join(base, "ok"), "target.so", 0o644), link); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, path, wantErr string
	}{
		{"a root-owned module in root-owned directories", write(filepath.Join(base, "ok"), "lib.so", 0o755), ""},
		{"a symlink to one", link, ""},
		{"a file in a sticky world-writable directory", write(sticky, "lib.so", 0o644), ""},
		{"a relative path", "lib.so", "must be absolute"},
		{"a missing file", filepath.Join(base, "missing.so"), "no such file"},
		{"a directory", filepath.Join(base, "ok"), "not a regular file"},
		{"a world-writable file", write(filepath.Join(base, "ok"), "open.so", 0o666), "writable by group or others"},
		{"a group-writable file", write(filepath.Join(base, "ok"), "group.so", 0o664), "writable by group or others"},
		{"a file in a group-writable directory", write(groupDir, "lib.so", 0o644), "writable by group or others"},
	}
	if os.Geteuid() == 0 {
		theirs := write(filepath.Join(base, "ok"), "theirs.so", 0o644)
		if err := os.Chown(theirs, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		tests = append(tests, struct{ name, path, wantErr string }{"a file of another user", theirs, "owned by uid 65534"})
	}
	if hsmtest.Module != "" {
		tests = append(tests, struct{ name, path, wantErr string }{"SoftHSM2 as Debian installs it", hsmtest.Module, ""})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkModulePath(tt.path)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), tt.path) {
				t.Fatalf("err = %v, want one naming %s and saying %q", err, tt.path, tt.wantErr)
			}
		})
	}
}
