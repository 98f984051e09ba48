package hsm

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"go.uber.org/zap/zaptest"

	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

// opencryptoki's soft token, another independent PKCS#11 implementation that
// Debian ships (package opencryptoki). Its library talks to the slot daemon
// pkcsslotd, which the test starts when it is not running (as root, as CI
// runs).
const (
	ockDaemon = "/usr/sbin/pkcsslotd"
	ockPID    = "/var/run/pkcsslotd.pid"
	// ockSlot is the soft token's slot in Debian's opencryptoki.conf.
	ockSlot = 3
	// ockSOPIN is the security officer PIN of a new soft token, which the
	// test keeps.
	ockSOPIN = "87654321"
)

// startSlotDaemon starts pkcsslotd unless it runs, and stops it after the
// test if it started it.
func startSlotDaemon(t *testing.T) {
	t.Helper()
	if data, err := os.ReadFile(ockPID); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && processRuns(pid) {
			return
		}
	}
	if os.Geteuid() != 0 {
		testenv.Missing(t, "opencryptoki's slot daemon", errors.New("pkcsslotd is not running, and only root can start it"))
	}
	_ = os.Remove(ockPID) // stale: its process is gone
	if out, err := exec.Command(ockDaemon).CombinedOutput(); err != nil {
		t.Fatalf("starting pkcsslotd: %v\n%s", err, out)
	}
	deadline := time.Now().Add(settle)
	var pid int
	for {
		data, err := os.ReadFile(ockPID)
		if err == nil {
			if pid, err = strconv.Atoi(strings.TrimSpace(string(data))); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("pkcsslotd wrote no pid file")
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(pid, syscall.SIGTERM)
		deadline := time.Now().Add(settle)
		for processRuns(pid) {
			if time.Now().After(deadline) {
				t.Logf("pkcsslotd (pid %d) still runs %s after SIGTERM", pid, settle)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// processRuns reports whether pid is a process that has not exited (a
// zombie has).
func processRuns(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the parenthesized command name.
	i := strings.LastIndexByte(string(stat), ')')
	return i < 0 || i+2 >= len(stat) || stat[i+2] != 'Z'
}

// TestOpencryptokiHasNoGCM: opencryptoki 3.8.1's soft token offers no
// CKM_AES_GCM, so the start-up self-test refuses it in every IV mode, and
// the error says why. Should a later version add GCM, the test fails, to
// have the module added to the vendor matrix.
func TestOpencryptokiHasNoGCM(t *testing.T) {
	// Where Debian's package puts the module, on any architecture.
	ockModule, err := testenv.Library("/usr/lib/*/pkcs11/libopencryptoki.so", "/usr/lib64/pkcs11/libopencryptoki.so")
	if err != nil {
		testenv.Missing(t, "opencryptoki", err)
	}
	startSlotDaemon(t)
	p := pkcs11.New(ockModule)
	if p == nil {
		t.Fatal("loading opencryptoki failed")
	}
	if err := p.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		t.Fatalf("initializing opencryptoki: %v", err)
	}
	// Before the daemon stops (cleanups run last first): the library
	// detaches from it.
	t.Cleanup(func() { _ = p.Finalize() })
	mechs, err := p.GetMechanismList(ockSlot)
	if err != nil {
		t.Fatalf("the soft token's mechanisms: %v", err)
	}
	for _, m := range mechs {
		if m.Mechanism == pkcs11.CKM_AES_GCM {
			t.Fatal("opencryptoki's soft token offers CKM_AES_GCM now: add it to the vendor matrix (docs/nshield.md §14)")
		}
	}
	const label, pin = "xks-ock", "1234abcd"
	if err := p.InitToken(ockSlot, ockSOPIN, label); err != nil {
		t.Fatalf("initializing the soft token: %v", err)
	}
	sh, err := p.OpenSession(ockSlot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Login(sh, pkcs11.CKU_SO, ockSOPIN); err != nil {
		t.Fatalf("security officer login: %v", err)
	}
	if err := p.InitPIN(sh, pin); err != nil {
		t.Fatalf("setting the user pin: %v", err)
	}
	_ = p.Logout(sh)
	_ = p.CloseSession(sh)

	for _, mode := range []string{"auto", "caller", "hsm", "hsm_appended"} {
		cfg := Config{Module: ockModule, Token: label, PIN: pin, IVMode: mode}
		b, err := Open("opencryptoki", cfg, zaptest.NewLogger(t))
		if err == nil {
			_ = b.Close()
			t.Fatalf("iv %s: a backend opened on a token without AES-GCM", mode)
		}
		if !strings.Contains(err.Error(), "CKR_MECHANISM_INVALID") {
			t.Fatalf("iv %s: %v; want the self-test to fail with CKR_MECHANISM_INVALID", mode, err)
		}
		t.Logf("iv %s: %v", mode, err)
	}
}
