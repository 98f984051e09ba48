package hsmtest

import (
	"testing"

	"github.com/miekg/pkcs11"
)

// Protection sets CKA_SENSITIVE and CKA_EXTRACTABLE of a key.
func Protection(sensitive, extractable bool) KeyOption {
	return func(tmpl *[]*pkcs11.Attribute, m *uint) {
		set(pkcs11.CKA_SENSITIVE, sensitive)(tmpl, m)
		set(pkcs11.CKA_EXTRACTABLE, extractable)(tmpl, m)
	}
}

// ImportKey creates a private AES token key with the given value
// (C_CreateObject with CKA_VALUE), permitted to encrypt and decrypt, changed
// by opts: the way a key ceremony puts one key into two HSMs. The key is
// sensitive and unextractable but, imported, neither CKA_ALWAYS_SENSITIVE
// nor CKA_NEVER_EXTRACTABLE. Like CreateKey it does not refuse a label in
// use.
func (tk Token) ImportKey(t testing.TB, label string, value []byte, opts ...KeyOption) {
	t.Helper()
	// No CKA_VALUE_LEN: C_CreateObject takes the length from the value.
	tk.create(t, "key "+label, append(keyTemplate(label), pkcs11.NewAttribute(pkcs11.CKA_VALUE, value)), opts...)
}

// create makes an object of tmpl changed by opts (C_CreateObject).
func (tk Token) create(t testing.TB, what string, tmpl []*pkcs11.Attribute, opts ...KeyOption) {
	t.Helper()
	var mech uint // unused: nothing is generated
	for _, o := range opts {
		o(&tmpl, &mech)
	}
	p, sh := tk.session(t)
	defer func() { _ = p.CloseSession(sh) }()
	if _, err := p.CreateObject(sh, tmpl); err != nil {
		t.Fatalf("importing %s: %v", what, err)
	}
}

// DestroyKeys destroys every secret key labelled label, as an HSM
// administrator would.
func (tk Token) DestroyKeys(t testing.TB, label string) {
	t.Helper()
	p, sh := tk.session(t)
	defer func() { _ = p.CloseSession(sh) }()
	for _, h := range find(t, p, sh, label) {
		if err := p.DestroyObject(sh, h); err != nil {
			t.Fatalf("destroying key %q: %v", label, err)
		}
	}
}
