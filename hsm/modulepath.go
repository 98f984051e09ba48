package hsm

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// checkModulePath refuses a PKCS#11 module that someone other than root or
// the proxy's own user could have written or could replace: the library is
// loaded (dlopen runs its constructors) into the process that holds the
// HSM login, so whoever can change the file, or rename another into its
// place, runs code with the HSM's keys. The path must be absolute; the
// file, after symlinks, a regular file owned by root or the proxy's user
// and not writable by group or others; and every directory on the way
// (before and after symlinks) owned by root or the proxy's user and not
// writable by group or others unless it is sticky (as /tmp is, where
// nobody may rename another's file).
func checkModulePath(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("pkcs11 module %q: the path must be absolute", path)
	}
	resolved, err := filepath.EvalSymlinks(path)
	if err != nil {
		return fmt.Errorf("pkcs11 module %q: %w", path, err)
	}
	info, err := os.Stat(resolved)
	if err != nil {
		return fmt.Errorf("pkcs11 module %q: %w", path, err)
	}
	if !info.Mode().IsRegular() {
		return fmt.Errorf("pkcs11 module %q: %s is not a regular file", path, resolved)
	}
	if err := trustedOwner(resolved, info, false); err != nil {
		return fmt.Errorf("pkcs11 module %q: %w", path, err)
	}
	for _, p := range []string{filepath.Dir(path), filepath.Dir(resolved)} {
		for dir := p; ; dir = filepath.Dir(dir) {
			info, err := os.Stat(dir)
			if err != nil {
				return fmt.Errorf("pkcs11 module %q: %w", path, err)
			}
			if err := trustedOwner(dir, info, true); err != nil {
				return fmt.Errorf("pkcs11 module %q: %w", path, err)
			}
			if dir == filepath.Dir(dir) {
				break
			}
		}
	}
	return nil
}

// trustedOwner checks that root or the proxy's user owns name and that no
// one else may write it (a sticky directory excepted).
func trustedOwner(name string, info fs.FileInfo, dir bool) error {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: cannot read its owner", name)
	}
	if st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s is owned by uid %d, neither root nor the proxy's user", name, st.Uid)
	}
	if info.Mode().Perm()&0o022 != 0 && (!dir || info.Mode()&fs.ModeSticky == 0) {
		return fmt.Errorf("%s is writable by group or others (mode %s)", name, info.Mode())
	}
	return nil
}
