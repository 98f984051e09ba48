package hsm

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

// evilModule builds a shared library whose constructor writes marker: what
// a local user could put where the proxy loads its PKCS#11 module from.
func evilModule(t *testing.T, dir, marker string) string {
	t.Helper()
	cc := testenv.CC(t)
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
	target := write(filepath.Join(base, "ok"), "target.so", 0o644)
	symlink := func(name, to string) string {
		t.Helper()
		if err := os.Symlink(to, name); err != nil {
			t.Fatal(err)
		}
		return name
	}
	link := symlink(filepath.Join(base, "link.so"), target)
	// A symlink to a symlink that lives in a group-writable directory:
	// both ends are in trusted directories, the hop between them is not.
	hop := symlink(filepath.Join(base, "hop.so"), symlink(filepath.Join(groupDir, "hop.so"), target))
	// The same through a relative symlink to a directory, and back out of
	// it with "..".
	relHop := symlink(filepath.Join(base, "ok", "rel.so"), "../group-link/../ok/target.so")
	symlink(filepath.Join(base, "group-link"), "group")
	loop := symlink(filepath.Join(base, "loop.so"), "loop.so")
	tests := []struct {
		name, path, wantErr string
	}{
		{"a root-owned module in root-owned directories", write(filepath.Join(base, "ok"), "lib.so", 0o755), ""},
		{"a symlink to one", link, ""},
		{"a symlink by way of a symlink in a group-writable directory", hop, "writable by group or others"},
		{"a relative symlink through a group-writable directory", relHop, "writable by group or others"},
		{"a symlink loop", loop, "symlinks on the way"},
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
	hsmtest.Require(t)
	tests = append(tests, struct{ name, path, wantErr string }{"SoftHSM2 as Debian installs it", hsmtest.Module, ""})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resolved, err := checkModulePath(tt.path)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if want, _ := filepath.EvalSymlinks(tt.path); resolved != want {
					t.Fatalf("checked %s, want %s loaded", resolved, want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), tt.path) {
				t.Fatalf("err = %v, want one naming %s and saying %q", err, tt.path, tt.wantErr)
			}
		})
	}
}

// TestModuleLoadedIsTheFileChecked: the module is loaded from the path its
// check resolved, so a symlink replaced between the check and the load
// (by anyone the check trusts to own it) cannot slip another library in.
func TestModuleLoadedIsTheFileChecked(t *testing.T) {
	base := t.TempDir()
	dirs := map[string]string{}
	for _, name := range []string{"checked", "swapped"} {
		dirs[name] = filepath.Join(base, name)
		if err := os.Mkdir(dirs[name], 0o755); err != nil {
			t.Fatal(err)
		}
	}
	checked := evilModule(t, dirs["checked"], filepath.Join(base, "checked-ran"))
	swapped := evilModule(t, dirs["swapped"], filepath.Join(base, "swapped-ran"))
	link := filepath.Join(base, "module.so")
	if err := os.Symlink(checked, link); err != nil {
		t.Fatal(err)
	}
	afterModuleCheck = func(string) {
		tmp := link + ".new"
		if err := os.Symlink(swapped, tmp); err != nil {
			t.Error(err)
		}
		if err := os.Rename(tmp, link); err != nil {
			t.Error(err)
		}
	}
	t.Cleanup(func() { afterModuleCheck = func(string) {} })

	// Neither is a PKCS#11 module: what matters is whose constructor ran.
	if _, err := Open("swap", Config{Module: link, Token: "t", PIN: "p"}, zaptest.NewLogger(t)); err == nil {
		t.Fatal("Open of a library without C_GetFunctionList succeeded")
	}
	if _, err := os.Stat(filepath.Join(base, "swapped-ran")); err == nil {
		t.Fatal("the library swapped in after the check was loaded")
	}
	if _, err := os.Stat(filepath.Join(base, "checked-ran")); err != nil {
		t.Fatalf("the library checked was not loaded: %v", err)
	}
}
