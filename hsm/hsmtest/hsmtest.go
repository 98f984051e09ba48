// Package hsmtest gives tests real SoftHSM2 tokens.
//
// SoftHSM2 reads SOFTHSM2_CONF once, in C_Initialize, and the hsm package
// never finalizes a library, so a process cannot switch to a new
// configuration per test. Instead the first use of this package in a process
// creates one token directory in a temporary folder and points SOFTHSM2_CONF
// at it (overriding any value from the environment), and NewToken initializes
// a new token with a unique label in SoftHSM2's always-present free slot,
// in-process, with C_InitToken; SoftHSM2 then offers a new free slot. Tests
// get one fresh token each and never see each other's keys. The directory is
// removed by Main, when the tests of the process are done.
//
// Child processes (a built caddy binary, say) see every token created so far
// when started with SOFTHSM2_CONF=Token.Conf.
package hsmtest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

// Module is the SoftHSM2 library found on this machine, or "" (then
// moduleErr says why): where Debian's package puts it on any architecture,
// or where other systems do.
var Module, moduleErr = testenv.Library(
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/*/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
	"/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

// Test PINs; SoftHSM2 holds only throw-away test keys under them.
const (
	UserPIN = "1234-test"
	SOPIN   = "5678-test"
)

// Token is a SoftHSM2 token made for one test.
type Token struct {
	// Module is the SoftHSM2 library path.
	Module string
	// Conf is the SOFTHSM2_CONF file listing the token.
	Conf string
	// Label is the token's label, unique in the process.
	Label string
	// PIN is the user PIN.
	PIN string
	// InitArgs is the string C_Initialize passes the module in pReserved,
	// or "" (NSS softokn needs one; see NSS).
	InitArgs string
}

var softhsm struct {
	once sync.Once
	err  error
	dir  string
	conf string
	ctx  *pkcs11.Ctx

	mu sync.Mutex
	n  int
}

func setup() {
	if moduleErr != nil {
		softhsm.err = moduleErr
		return
	}
	dir, err := os.MkdirTemp("", "hsmtest-softhsm-")
	if err != nil {
		softhsm.err = err
		return
	}
	softhsm.dir = dir
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		softhsm.err = err
		return
	}
	softhsm.conf = filepath.Join(dir, "softhsm2.conf")
	conf := "directories.tokendir = " + tokens + "\n" +
		"objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n"
	if err := os.WriteFile(softhsm.conf, []byte(conf), 0o600); err != nil {
		softhsm.err = err
		return
	}
	// Process-wide on purpose: SoftHSM2 reads it in C_Initialize, which
	// happens once per process.
	if err := os.Setenv("SOFTHSM2_CONF", softhsm.conf); err != nil {
		softhsm.err = err
		return
	}
	softhsm.ctx = pkcs11.New(Module)
	if softhsm.ctx == nil {
		softhsm.err = fmt.Errorf("loading %s failed", Module)
	}
}

// Require ends the test, as testenv.Missing does, unless SoftHSM2 tokens
// can be made here.
func Require(t testing.TB) {
	t.Helper()
	softhsm.once.Do(setup)
	if softhsm.err != nil {
		testenv.Missing(t, "SoftHSM2", softhsm.err)
	}
}

// Main runs the tests of a package and removes the token directory after.
// Use it from TestMain: func TestMain(m *testing.M) { os.Exit(hsmtest.Main(m)) }.
func Main(m *testing.M) int {
	code := m.Run()
	if softhsm.dir != "" {
		_ = os.RemoveAll(softhsm.dir)
	}
	if nss.dir != "" {
		_ = os.RemoveAll(nss.dir)
	}
	return code
}

// ctx returns the shared direct handle on SoftHSM2, initialized. Another
// library handle (such as the hsm package's, or a fault shim forwarding to
// SoftHSM2) may have finalized and re-initialized it meanwhile: module state
// is per process, so initialize again when needed.
func ctx(t testing.TB) *pkcs11.Ctx {
	t.Helper()
	Require(t)
	if err := softhsm.ctx.Initialize(); err != nil && err != pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		t.Fatalf("initializing softhsm2: %v", err)
	}
	return softhsm.ctx
}

// NewToken creates a token with a unique label and the user PIN UserPIN.
// Without SoftHSM2 it ends the test (Require).
func NewToken(t testing.TB) Token {
	t.Helper()
	p := ctx(t)
	softhsm.mu.Lock()
	defer softhsm.mu.Unlock()
	softhsm.n++
	label := fmt.Sprintf("t%d-%s", softhsm.n, strings.NewReplacer("/", "-", " ", "_").Replace(t.Name()))
	if len(label) > 32 {
		label = label[:32]
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatalf("listing slots: %v", err)
	}
	free, found := uint(0), false
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err == nil && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			free, found = s, true
			break
		}
	}
	if !found {
		t.Fatal("softhsm2 offers no free slot")
	}
	if err := p.InitToken(free, SOPIN, label); err != nil {
		t.Fatalf("initializing token %q: %v", label, err)
	}
	sh, err := p.OpenSession(free, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatalf("opening session: %v", err)
	}
	defer func() { _ = p.CloseSession(sh) }()
	if err := p.Login(sh, pkcs11.CKU_SO, SOPIN); err != nil {
		t.Fatalf("security officer login: %v", err)
	}
	if err := p.InitPIN(sh, UserPIN); err != nil {
		t.Fatalf("setting user pin: %v", err)
	}
	_ = p.Logout(sh)
	return Token{Module: Module, Conf: softhsm.conf, Label: label, PIN: UserPIN}
}
