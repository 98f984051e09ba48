package hsmtest

import (
	"crypto/rand"
	"crypto/rsa"
	"math/big"
	"testing"

	"github.com/miekg/pkcs11"
)

// KeyWrapping lets an AES key wrap and unwrap keys on either path a token
// may take: CKA_ENCRYPT and CKA_DECRYPT (C_Encrypt) and CKA_WRAP and
// CKA_UNWRAP (C_WrapKey).
func KeyWrapping() KeyOption {
	return func(tmpl *[]*pkcs11.Attribute, m *uint) {
		for _, a := range []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP} {
			set(a, true)(tmpl, m)
		}
	}
}

// ImportRSAKey creates a private RSA token key pair labelled label from
// priv (C_CreateObject, twice), as a key ceremony puts one key pair into
// two HSMs: the private key sensitive, unextractable, permitted to decrypt
// and unwrap, changed by opts; the public key permitted to encrypt. The
// test keeps priv, to check what the HSM does against crypto/rsa. Without
// a public key (publicKey false) the token holds the private key only.
func (tk Token) ImportRSAKey(t testing.TB, label string, priv *rsa.PrivateKey, publicKey bool, opts ...KeyOption) {
	t.Helper()
	priv.Precompute()
	n, e := priv.N.Bytes(), big.NewInt(int64(priv.E)).Bytes()
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, n),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, e),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, priv.D.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PRIME_1, priv.Primes[0].Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PRIME_2, priv.Primes[1].Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_1, priv.Precomputed.Dp.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_2, priv.Precomputed.Dq.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_COEFFICIENT, priv.Precomputed.Qinv.Bytes()),
	}
	tk.create(t, "the private key "+label, tmpl, opts...)
	if publicKey {
		tk.ImportRSAPublicKey(t, label, &priv.PublicKey)
	}
}

// ImportRSAPublicKey creates a public RSA token key labelled label.
func (tk Token) ImportRSAPublicKey(t testing.TB, label string, pub *rsa.PublicKey) {
	t.Helper()
	tk.create(t, "the public key "+label, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, pub.N.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(pub.E)).Bytes()),
	})
}

// SessionKeys counts the generic secret session objects on the token that
// this process's sessions hold: what wrapping on the object path makes of
// a data key for the length of one call, and must destroy.
func (tk Token) SessionKeys(t testing.TB) int {
	t.Helper()
	return tk.genericSecrets(t, false)
}

// TokenKeys counts the generic secret token objects, which key wrap must
// never make.
func (tk Token) TokenKeys(t testing.TB) int {
	t.Helper()
	return tk.genericSecrets(t, true)
}

func (tk Token) genericSecrets(t testing.TB, onToken bool) int {
	t.Helper()
	p, sh := tk.session(t)
	defer func() { _ = p.CloseSession(sh) }()
	if err := p.FindObjectsInit(sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, onToken),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
	}); err != nil {
		t.Fatalf("searching generic secrets: %v", err)
	}
	hs, _, err := p.FindObjects(sh, 1024)
	_ = p.FindObjectsFinal(sh)
	if err != nil {
		t.Fatalf("searching generic secrets: %v", err)
	}
	return len(hs)
}

// RSAKey makes an RSA key pair of bits with crypto/rsa, for a test to
// import (ImportRSAKey) and check the HSM's answers with.
func RSAKey(t testing.TB, bits int) *rsa.PrivateKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Attribute sets one attribute of a key to v, e.g.
// Attribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{0, 1, 0, 1}).
func Attribute(typ uint, v any) KeyOption { return set(typ, v) }
