package hsmtest

import (
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

// KeyOption changes a key CreateKey makes.
type KeyOption func(*[]*pkcs11.Attribute, *uint)

func set(typ uint, v any) KeyOption {
	return func(tmpl *[]*pkcs11.Attribute, _ *uint) {
		for i, a := range *tmpl {
			if a.Type == typ {
				(*tmpl)[i] = pkcs11.NewAttribute(typ, v)
				return
			}
		}
		*tmpl = append(*tmpl, pkcs11.NewAttribute(typ, v))
	}
}

// Extractable makes the key readable (CKA_SENSITIVE false, CKA_EXTRACTABLE
// true), for comparing the HSM's output with Go's crypto/cipher. Test keys
// only: a production key never leaves the HSM.
func Extractable() KeyOption {
	return func(tmpl *[]*pkcs11.Attribute, m *uint) {
		set(pkcs11.CKA_SENSITIVE, false)(tmpl, m)
		set(pkcs11.CKA_EXTRACTABLE, true)(tmpl, m)
	}
}

// Bytes sets the AES key's length in bytes (16, 24 or 32).
func Bytes(n int) KeyOption { return set(pkcs11.CKA_VALUE_LEN, n) }

// Usage sets one usage attribute, e.g. Usage(pkcs11.CKA_DECRYPT, false).
func Usage(typ uint, v bool) KeyOption { return set(typ, v) }

// Private sets CKA_PRIVATE; false makes a key usable without a login, as
// the nShield accelerator slot requires.
func Private(v bool) KeyOption { return set(pkcs11.CKA_PRIVATE, v) }

// Modifiable lets the key's attributes be changed later with SetBool.
func Modifiable() KeyOption { return set(pkcs11.CKA_MODIFIABLE, true) }

// GenericSecret makes a generic secret key of n bytes instead of AES.
func GenericSecret(n int) KeyOption {
	return func(tmpl *[]*pkcs11.Attribute, mech *uint) {
		*mech = pkcs11.CKM_GENERIC_SECRET_KEY_GEN
		set(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET)(tmpl, mech)
		set(pkcs11.CKA_VALUE_LEN, n)(tmpl, mech)
	}
}

// DES3 makes a triple-DES key instead of AES.
func DES3() KeyOption {
	return func(tmpl *[]*pkcs11.Attribute, mech *uint) {
		*mech = pkcs11.CKM_DES3_KEY_GEN
		set(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_DES3)(tmpl, mech)
		out := (*tmpl)[:0]
		for _, a := range *tmpl {
			if a.Type != pkcs11.CKA_VALUE_LEN {
				out = append(out, a)
			}
		}
		*tmpl = out
	}
}

// ctx returns the direct handle on the token's module.
func (tk Token) ctx(t testing.TB) *pkcs11.Ctx {
	t.Helper()
	if tk.Module == NSSModule && tk.InitArgs != "" {
		return nssCtx(t)
	}
	return ctx(t)
}

func trim(label string) string { return strings.TrimSpace(label) }

// session opens a logged-in session on the token. Closing it does not log
// out a backend using the token: the backend keeps its own anchor session.
func (tk Token) session(t testing.TB) (*pkcs11.Ctx, pkcs11.SessionHandle) {
	t.Helper()
	p := tk.ctx(t)
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatalf("listing slots: %v", err)
	}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil || trim(ti.Label) != tk.Label {
			continue
		}
		sh, err := p.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatalf("opening session on %q: %v", tk.Label, err)
		}
		if err := p.Login(sh, pkcs11.CKU_USER, tk.PIN); err != nil && err != pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
			t.Fatalf("login on %q: %v", tk.Label, err)
		}
		return p, sh
	}
	t.Fatalf("no token %q", tk.Label)
	return nil, 0
}

// keyTemplate is the template of CreateKey's and ImportKey's keys, without
// the value or its length: a private AES token key, sensitive, not
// extractable, not modifiable, that may encrypt and decrypt and nothing else.
func keyTemplate(label string) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)),
	}
}

// CreateKey creates a private AES-256 token key permitted to encrypt and
// decrypt, changed by opts. It does not refuse a label in use: tests make
// duplicates on purpose.
func (tk Token) CreateKey(t testing.TB, label string, opts ...KeyOption) {
	t.Helper()
	tmpl := append(keyTemplate(label), pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32))
	mech := uint(pkcs11.CKM_AES_KEY_GEN)
	for _, o := range opts {
		o(&tmpl, &mech)
	}
	p, sh := tk.session(t)
	defer func() { _ = p.CloseSession(sh) }()
	if _, err := p.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, tmpl); err != nil {
		t.Fatalf("creating key %q: %v", label, err)
	}
}

// find returns the handles of the secret keys labelled label.
func find(t testing.TB, p *pkcs11.Ctx, sh pkcs11.SessionHandle, label string) []pkcs11.ObjectHandle {
	t.Helper()
	if err := p.FindObjectsInit(sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}); err != nil {
		t.Fatalf("finding %q: %v", label, err)
	}
	hs, _, err := p.FindObjects(sh, 16)
	_ = p.FindObjectsFinal(sh)
	if err != nil {
		t.Fatalf("finding %q: %v", label, err)
	}
	if len(hs) == 0 {
		t.Fatalf("no key %q", label)
	}
	return hs
}

// Attribute returns one attribute of the (first) key labelled label.
func (tk Token) Attribute(t testing.TB, label string, typ uint) []byte {
	t.Helper()
	p, sh := tk.session(t)
	defer func() { _ = p.CloseSession(sh) }()
	attrs, err := p.GetAttributeValue(sh, find(t, p, sh, label)[0], []*pkcs11.Attribute{pkcs11.NewAttribute(typ, nil)})
	if err != nil {
		t.Fatalf("reading attribute 0x%X of %q: %v", typ, label, err)
	}
	return attrs[0].Value
}

// KeyValue returns the value of an Extractable key.
func (tk Token) KeyValue(t testing.TB, label string) []byte {
	t.Helper()
	return tk.Attribute(t, label, pkcs11.CKA_VALUE)
}

// SetBool sets a boolean attribute of a Modifiable key, e.g. CKA_DECRYPT.
func (tk Token) SetBool(t testing.TB, label string, typ uint, v bool) {
	t.Helper()
	tk.setAttribute(t, label, pkcs11.NewAttribute(typ, v))
}

func (tk Token) setAttribute(t testing.TB, label string, a *pkcs11.Attribute) {
	t.Helper()
	p, sh := tk.session(t)
	defer func() { _ = p.CloseSession(sh) }()
	for _, h := range find(t, p, sh, label) {
		if err := p.SetAttributeValue(sh, h, []*pkcs11.Attribute{a}); err != nil {
			t.Fatalf("setting attribute 0x%X of %q: %v", a.Type, label, err)
		}
	}
}

// SetPIN changes the token's user PIN, as an HSM administrator would, and
// returns the token with the new PIN.
func (tk Token) SetPIN(t testing.TB, pin string) Token {
	t.Helper()
	p, sh := tk.session(t)
	defer func() { _ = p.CloseSession(sh) }()
	if err := p.SetPIN(sh, tk.PIN, pin); err != nil {
		t.Fatalf("changing the PIN of %q: %v", tk.Label, err)
	}
	tk.PIN = pin
	return tk
}
