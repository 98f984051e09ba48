// Package testenv is what the tests of every package take from the machine
// they run on: the real components the suite tests against (SoftHSM2, NSS
// softokn, opencryptoki, a C compiler for the PKCS#11 shims, curl with
// --aws-sigv4), found the same way on every architecture, and the one rule
// for a component that is missing or broken.
//
// The rule: such a test fails, with the reason. `go test` prints no skips,
// so a suite whose components skip would pass without having run. A
// developer without a component may let its tests skip instead, on
// purpose, with XKS_TEST_ALLOW_MISSING=1; make test (scripts/test.sh)
// unsets it, and fails on any skip that its allow-list does not name.
package testenv

import (
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// AllowMissing is the environment variable that, set to 1, turns the
// failure of a test whose component is missing into a skip.
const AllowMissing = "XKS_TEST_ALLOW_MISSING"

// Missing ends the test because component, which it needs, is missing or
// broken for reason: a failure, or a skip when XKS_TEST_ALLOW_MISSING=1.
func Missing(t testing.TB, component string, reason error) {
	t.Helper()
	if os.Getenv(AllowMissing) == "1" {
		t.Skipf("%s: %v (skipped: %s=1)", component, reason, AllowMissing)
	}
	t.Fatalf("%s: %v (scripts/install-deps.sh installs the suite's components; %s=1 lets a developer's run skip instead)",
		component, reason, AllowMissing)
}

// Library returns the first of patterns that names a shared library this
// process can load. A pattern is a path or a filepath.Glob pattern:
// "/usr/lib/*/libsoftokn3.so" covers Debian's multiarch directories
// (/usr/lib/x86_64-linux-gnu, /usr/lib/aarch64-linux-gnu, ...), and a
// library built for another architecture than this process's, as a
// multiarch system may also hold, is passed over. The error names every
// pattern searched.
func Library(patterns ...string) (string, error) {
	for _, pattern := range patterns {
		matches, err := filepath.Glob(pattern)
		if err != nil {
			return "", fmt.Errorf("library pattern %q: %w", pattern, err)
		}
		for _, m := range matches {
			if loadable(m) {
				return m, nil
			}
		}
	}
	return "", fmt.Errorf("no library for this architecture at %s", strings.Join(patterns, ", "))
}

// self is the ELF machine and class of this process's executable; ok is
// false where the executable is not ELF (then every library passes).
var self = sync.OnceValues(func() (elf.FileHeader, bool) {
	f, err := elf.Open("/proc/self/exe")
	if err != nil {
		return elf.FileHeader{}, false
	}
	defer f.Close()
	return f.FileHeader, true
})

// loadable reports whether path is a regular file that is, where this
// process is ELF, an ELF shared object of its machine and class.
func loadable(path string) bool {
	info, err := os.Stat(path)
	if err != nil || !info.Mode().IsRegular() {
		return false
	}
	own, ok := self()
	if !ok {
		return true
	}
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	return f.Type == elf.ET_DYN && f.Machine == own.Machine && f.Class == own.Class
}

// CC returns the C compiler that builds the PKCS#11 shims (cc, as cgo
// uses).
func CC(t testing.TB) string {
	t.Helper()
	cc, err := exec.LookPath("cc")
	if err != nil {
		Missing(t, "the C compiler (cc) for the PKCS#11 shims", err)
	}
	return cc
}

// CurlWithSigV4 returns the path of a curl that signs with --aws-sigv4
// (7.75 or later).
func CurlWithSigV4(t testing.TB) string {
	t.Helper()
	path, err := curlWithSigV4()
	if err != nil {
		Missing(t, "curl with --aws-sigv4 (7.75 or later)", err)
	}
	return path
}

func curlWithSigV4() (string, error) {
	path, err := exec.LookPath("curl")
	if err != nil {
		return "", err
	}
	out, err := exec.Command(path, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("curl --version: %w", err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	m := regexp.MustCompile(`^curl (\d+)\.(\d+)`).FindStringSubmatch(line)
	if m == nil {
		return "", fmt.Errorf("cannot read the curl version from %q", line)
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	if major < 7 || major == 7 && minor < 75 {
		return "", errors.New(line + ": no --aws-sigv4 before 7.75")
	}
	return path, nil
}
