// Package faultshim builds and drives a PKCS#11 fault-injection module for
// tests: a shared library that forwards every call to a real module and
// fails or delays chosen calls, as told by a control file it re-reads on
// every call. See csrc/faultshim.c for the control file's syntax.
package faultshim

import (
	_ "embed"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

//go:embed csrc/faultshim.c
var source []byte

// Shim is one built copy of the shim. Each copy is its own library path,
// and so its own library in the hsm package's registry.
type Shim struct {
	// Path is the shim module to open instead of the real one.
	Path string
	ctl  string
	log  string
}

// New compiles the shim into t.TempDir() with cc and points it at target
// (the real module) through the environment, which the shim reads when it is
// loaded: open the shim only after New.
func New(t testing.TB, target string) *Shim {
	t.Helper()
	cc := testenv.CC(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "faultshim.c")
	if err := os.WriteFile(src, source, 0o600); err != nil {
		t.Fatal(err)
	}
	s := &Shim{
		Path: filepath.Join(dir, "faultshim.so"),
		ctl:  filepath.Join(dir, "control"),
		log:  filepath.Join(dir, "calls.log"),
	}
	out, err := exec.Command(cc, "-shared", "-fPIC", "-O1", "-o", s.Path, src, "-ldl", "-lpthread").CombinedOutput()
	if err != nil {
		t.Fatalf("building fault shim: %v\n%s", err, out)
	}
	s.Set()
	t.Setenv("P11SHIM_TARGET", target)
	t.Setenv("P11SHIM_CTL", s.ctl)
	t.Setenv("P11SHIM_LOG", s.log)
	return s
}

// Set replaces the fault rules, e.g. Set("C_Encrypt=0x30") or
// Set("C_Encrypt=hang"). Set() clears them, which also releases every hung
// call.
func (s *Shim) Set(rules ...string) {
	data := strings.Join(rules, "\n")
	if data != "" {
		data += "\n"
	}
	tmp := s.ctl + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o600); err != nil {
		panic(err)
	}
	if err := os.Rename(tmp, s.ctl); err != nil {
		panic(err)
	}
}

// Calls counts the calls of the named function the shim has seen.
func (s *Shim) Calls(name string) int {
	data, err := os.ReadFile(s.log)
	if err != nil {
		return 0
	}
	n := 0
	for line := range strings.SplitSeq(string(data), "\n") {
		if line == name {
			n++
		}
	}
	return n
}

// Hung counts the calls of the named function that a hang rule has held,
// released or not.
func (s *Shim) Hung(name string) int {
	return s.Calls(name + " hang")
}

// settle bounds how long WaitHung waits: a loaded machine can take seconds
// to reach the HSM, never minutes.
const settle = 2 * time.Minute

// WaitHung waits until n calls of the named function hang in the shim, so
// that a test acts only once the HSM is held, however slow the machine.
func (s *Shim) WaitHung(t testing.TB, name string, n int) {
	t.Helper()
	deadline := time.Now().Add(settle)
	for s.Hung(name) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not reach the HSM within %s", name, settle)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
