package hsm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// maxModuleSymlinks bounds the symlinks followed to a module, as Linux's
// MAXSYMLINKS (40) does for a path.
const maxModuleSymlinks = 40

// checkModulePath refuses a PKCS#11 module that someone other than root or
// the proxy's user could have written or could replace, and returns the
// path to load: the file it checked, every symlink resolved. The library is
// loaded (dlopen runs its constructors) into the process that holds the
// HSM login, so whoever can change the file, or rename another into its
// place, runs code with the HSM's keys. The path must be absolute; the
// file a regular file owned by root or the proxy's user and not writable by
// group or others; every directory a name is looked up in, on the way to it
// and to each symlink's target, owned by them and not writable by group or
// others unless it is sticky (as /tmp is, where nobody may rename another's
// file); and every symlink followed owned by them. Loading the returned
// path, not the configured one, leaves no symlink to swap between the
// check and the load.
func checkModulePath(path string) (string, error) {
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("pkcs11 module %q: the path must be absolute", path)
	}
	resolved, err := resolveTrusted(path)
	if err != nil {
		return "", fmt.Errorf("pkcs11 module %q: %w", path, err)
	}
	info, err := os.Stat(resolved)
	if err != nil {
		return "", fmt.Errorf("pkcs11 module %q: %w", path, err)
	}
	if !info.Mode().IsRegular() {
		return "", fmt.Errorf("pkcs11 module %q: %s is not a regular file", path, resolved)
	}
	if err := trustedOwner(resolved, info, false); err != nil {
		return "", fmt.Errorf("pkcs11 module %q: %w", path, err)
	}
	return resolved, nil
}

// resolveTrusted resolves an absolute path one name at a time, as the
// kernel does, and checks each directory it looks a name up in and each
// symlink it follows (trustedOwner, ownedByTrusted). It returns the path
// with no symlink left in it.
func resolveTrusted(path string) (string, error) {
	root, err := os.Stat("/")
	if err != nil {
		return "", err
	}
	if err := trustedOwner("/", root, true); err != nil {
		return "", err
	}
	dir, rest, links := "/", splitPath(path), 0
	for len(rest) > 0 {
		name := rest[0]
		rest = rest[1:]
		switch name {
		case "", ".":
			continue
		case "..":
			dir = filepath.Dir(dir)
			continue
		}
		p := filepath.Join(dir, name)
		info, err := os.Lstat(p)
		if err != nil {
			return "", err
		}
		if info.Mode()&fs.ModeSymlink != 0 {
			if links++; links > maxModuleSymlinks {
				return "", fmt.Errorf("more than %d symlinks on the way to %s", maxModuleSymlinks, p)
			}
			if err := ownedByTrusted(p, info); err != nil {
				return "", fmt.Errorf("symlink %w", err)
			}
			target, err := os.Readlink(p)
			if err != nil {
				return "", err
			}
			if filepath.IsAbs(target) {
				dir = "/"
			}
			rest = append(splitPath(target), rest...)
			continue
		}
		if len(rest) > 0 {
			if !info.IsDir() {
				return "", fmt.Errorf("%s is not a directory", p)
			}
			if err := trustedOwner(p, info, true); err != nil {
				return "", err
			}
		}
		dir = p
	}
	return dir, nil
}

func splitPath(p string) []string {
	return strings.Split(filepath.ToSlash(p), "/")
}

// trustedOwner checks that root or the proxy's user owns name and that no
// one else may write it (a sticky directory excepted).
func trustedOwner(name string, info fs.FileInfo, dir bool) error {
	if err := ownedByTrusted(name, info); err != nil {
		return err
	}
	if info.Mode().Perm()&0o022 != 0 && (!dir || info.Mode()&fs.ModeSticky == 0) {
		return fmt.Errorf("%s is writable by group or others (mode %s)", name, info.Mode())
	}
	return nil
}

// ownedByTrusted checks that root or the proxy's user owns name.
func ownedByTrusted(name string, info fs.FileInfo) error {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return errors.New(name + ": cannot read its owner")
	}
	if st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s is owned by uid %d, neither root nor the proxy's user", name, st.Uid)
	}
	return nil
}
