package hsmtest

// #include <stdlib.h>
import "C"

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"unsafe"

	"github.com/miekg/pkcs11"

	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

// NSSModule is NSS softokn (libsoftokn3.so, from libnss3) on this machine,
// or "" (then nssModuleErr says why): in Debian's multiarch directory on
// any architecture, or where other systems put it.
var NSSModule, nssModuleErr = testenv.Library(
	"/usr/lib/*/libsoftokn3.so",
	"/usr/lib64/libsoftokn3.so",
	"/usr/lib/libsoftokn3.so",
)

// NSSTokenLabel is the label of softokn's key database token, the one that
// holds token keys and needs a login.
const NSSTokenLabel = "NSS Certificate DB"

var nss struct {
	once     sync.Once
	err      error
	dir      string
	initArgs string
	reserved unsafe.Pointer
	ctx      *pkcs11.Ctx
}

// NSSInitArgs is the configuration string softokn reads from C_Initialize's
// pReserved, for a database in dir.
func NSSInitArgs(dir string) string {
	return fmt.Sprintf("configdir='sql:%s' certPrefix='' keyPrefix='' secmod='secmod.db' flags=", dir)
}

func setupNSS() {
	if nssModuleErr != nil {
		nss.err = nssModuleErr
		return
	}
	dir, err := os.MkdirTemp("", "hsmtest-nss-")
	if err != nil {
		nss.err = err
		return
	}
	nss.dir = dir
	nss.initArgs = NSSInitArgs(dir)
	nss.reserved = unsafe.Pointer(C.CString(nss.initArgs)) // for the life of the process, as the module's
	nss.ctx = pkcs11.New(NSSModule)
	if nss.ctx == nil {
		nss.err = fmt.Errorf("loading %s failed", NSSModule)
		return
	}
	p := nss.ctx
	if err := p.Initialize(pkcs11.InitializeWithReserved(nss.reserved)); err != nil {
		nss.err = fmt.Errorf("initializing NSS softokn (%s): %w", nss.initArgs, err)
		return
	}
	// A new database has an empty security officer PIN and no user PIN.
	slot, err := slotLabelled(p, NSSTokenLabel)
	if err != nil {
		nss.err = err
		return
	}
	sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		nss.err = err
		return
	}
	defer func() { _ = p.CloseSession(sh) }()
	if err := p.Login(sh, pkcs11.CKU_SO, ""); err != nil {
		nss.err = fmt.Errorf("security officer login on a new NSS database: %w", err)
		return
	}
	if err := p.InitPIN(sh, UserPIN); err != nil {
		nss.err = fmt.Errorf("setting the NSS user pin: %w", err)
		return
	}
	_ = p.Logout(sh)
}

func slotLabelled(p *pkcs11.Ctx, label string) (uint, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, err
	}
	for _, s := range slots {
		if ti, err := p.GetTokenInfo(s); err == nil && trim(ti.Label) == label {
			return s, nil
		}
	}
	return 0, fmt.Errorf("no token %q", label)
}

// NSS returns NSS softokn's key database token, with the user PIN UserPIN,
// in a database made for this process; Token.InitArgs is what a backend
// passes C_Initialize. Tests share it: give keys labels of their own.
// Without a working NSS softokn it ends the test, as testenv.Missing does.
func NSS(t testing.TB) Token {
	t.Helper()
	nss.once.Do(setupNSS)
	if nss.err != nil {
		testenv.Missing(t, "NSS softokn", nss.err)
	}
	return Token{Module: NSSModule, Label: NSSTokenLabel, PIN: UserPIN, InitArgs: nss.initArgs}
}

// nssCtx returns the direct handle on NSS softokn, initialized again if a
// backend's re-initialization finalized it.
func nssCtx(t testing.TB) *pkcs11.Ctx {
	t.Helper()
	if err := nss.ctx.Initialize(pkcs11.InitializeWithReserved(nss.reserved)); err != nil && err != pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		t.Fatalf("initializing NSS softokn: %v", err)
	}
	return nss.ctx
}
