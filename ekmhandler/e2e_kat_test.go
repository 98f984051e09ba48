package ekmhandler_test

import (
	"bytes"
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/ekmapi"
)

// TestWrongKWPMechanismIsRefused configures NSS softokn's backend with
// 0x210A for A256KWP, which NSS implements as PKCS#7 padding then RFC
// 3394, not RFC 5649. The start-up known-answer test refuses the config at
// start and on a reload, with an error that says to set 0x210B; the
// running config goes on serving through the refused reload.
func TestWrongKWPMechanismIsRefused(t *testing.T) {
	f := prepareFixture(t, func(*fixture) {})
	wrong := func(f *fixture) { f.nssExtra = "\t\t\tkwp_mechanism 0x210A\n" }
	right := func(f *fixture) { f.nssExtra = "\t\t\tkwp_mechanism 0x210B\n" }
	want := []string{`hsm backend "nss": kwp_mechanism 0x210A (CKM_AES_KEY_WRAP_PAD) fails the RFC 5649 known-answer test on this token`,
		"set kwp_mechanism 0x210B, which passes it"}

	wrong(f)
	err := f.proxy.TryLoad(f.config())
	if err == nil {
		t.Fatal("a config with the wrong mechanism started")
	}
	t.Logf("at start: %v", err)
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("the refusal at start does not say %q", w)
		}
	}

	right(f)
	f.load()
	dek := randomBytes(20)
	sw := aesSoftware(f.nssKEK, true)
	if back, err := sw.unwrap(f.value(f.wrap("/nss/prod", f.nssAES, ekmapi.AlgA256KWP, dek), false)); err != nil || !bytes.Equal(back, dek) {
		t.Fatalf("A256KWP with 0x210B: %v", err)
	}

	wrong(f)
	err = f.proxy.TryLoad(f.config())
	if err == nil {
		t.Fatal("a reload with the wrong mechanism was taken")
	}
	t.Logf("on reload: %v", err)
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("the refusal on reload does not say %q", w)
		}
	}
	f.closeIdle()
	r := f.wrap("/nss/prod", f.nssAES, ekmapi.AlgA256KWP, dek)
	if r.status != http.StatusOK {
		t.Fatalf("after the refused reload: %d %s", r.status, r.raw)
	}
	if back, err := sw.unwrap(f.value(r, false)); err != nil || !bytes.Equal(back, dek) {
		t.Fatalf("after the refused reload, A256KWP: %v", err)
	}
}
