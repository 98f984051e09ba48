package hsm

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha1" //nolint:gosec // crypto.SHA1: RSA-OAEP with SHA-1 is one of the algorithms under test
	"crypto/sha256"
	"errors"
	"hash"
	"math/big"
	"strconv"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
)

// TestRSAOAEPRoundTrip wraps and unwraps with RSA-OAEP (SHA-1) and
// RSA-OAEP-256 on both tokens, with a key pair the test made and imported,
// and checks each against crypto/rsa both ways: what the proxy wraps
// crypto/rsa decrypts with the private key, and what crypto/rsa encrypts
// with the public key the HSM unwraps. SoftHSM2 cannot do OAEP with
// SHA-256 (it refuses the parameters with CKR_ARGUMENTS_BAD): RSA-OAEP-256
// is refused there both ways, never wrapped into something that cannot be
// unwrapped.
func TestRSAOAEPRoundTrip(t *testing.T) {
	priv := hsmtest.RSAKey(t, 2048)
	algs := []struct {
		alg  WrapAlgorithm
		hash func() hash.Hash
		size int
	}{{RSAOAEP, crypto.SHA1.New, crypto.SHA1.Size()}, {RSAOAEP256, sha256.New, sha256.Size}}
	for _, tok := range wrapTokens(t) {
		t.Run(tok.name, func(t *testing.T) {
			label := unique("rsa")
			tok.tk.ImportRSAKey(t, label, priv, true)
			b := open(t, "rsa", tok.cfg)
			md, err := b.WrapKeyMetadata(bg, label)
			if err != nil {
				t.Fatal(err)
			}
			if md.Type != WrapKeyRSA || md.Bits != 2048 || !bytes.Equal(md.Modulus, priv.N.Bytes()) || !bytes.Equal(md.PublicExponent, []byte{1, 0, 1}) {
				t.Fatalf("metadata %s %d, n %x..., e %x", md.Type, md.Bits, md.Modulus[:4], md.PublicExponent)
			}
			for _, a := range algs {
				supported := tok.name != "SoftHSM2" || a.alg != RSAOAEP256
				most := 256 - 2*a.size - 2
				for _, n := range []int{1, 16, 32, 64, most} {
					dek := randomBytes(n)
					fromGo, err := rsa.EncryptOAEP(a.hash(), rand.Reader, &priv.PublicKey, dek, nil)
					if err != nil {
						t.Fatal(err)
					}
					wrapped, err := b.WrapKey(bg, label, a.alg, dek)
					if !supported {
						if !errors.Is(err, ErrUnsupportedAlgorithm) {
							t.Fatalf("%s on SoftHSM2: %v, want ErrUnsupportedAlgorithm", a.alg, err)
						}
						if _, err := b.UnwrapKey(bg, label, a.alg, fromGo); !errors.Is(err, ErrUnsupportedAlgorithm) {
							t.Fatalf("unwrapping %s on SoftHSM2: %v, want ErrUnsupportedAlgorithm", a.alg, err)
						}
						continue
					}
					if err != nil {
						t.Fatalf("%s of %d bytes: %v", a.alg, n, err)
					}
					if len(wrapped) != 256 {
						t.Fatalf("%s gave %d bytes, want the modulus's 256", a.alg, len(wrapped))
					}
					if back, err := rsa.DecryptOAEP(a.hash(), nil, priv, wrapped, nil); err != nil || !bytes.Equal(back, dek) {
						t.Fatalf("%s of %d bytes: crypto/rsa does not unwrap the proxy's: %v", a.alg, n, err)
					}
					back, err := b.UnwrapKey(bg, label, a.alg, fromGo)
					if err != nil || !bytes.Equal(back, dek) {
						t.Fatalf("%s of %d bytes: the HSM does not unwrap crypto/rsa's: %v", a.alg, n, err)
					}
					bad := bytes.Clone(fromGo)
					bad[100] ^= 1
					if _, err := b.UnwrapKey(bg, label, a.alg, bad); !errors.Is(err, ErrInvalidCiphertext) {
						t.Fatalf("%s tampered: %v, want ErrInvalidCiphertext", a.alg, err)
					}
				}
				if !supported {
					continue
				}
				if _, err := b.WrapKey(bg, label, a.alg, randomBytes(most+1)); !errors.Is(err, ErrInvalidInput) {
					t.Errorf("%s of %d bytes: %v, want ErrInvalidInput", a.alg, most+1, err)
				}
				for _, n := range []int{255, 257, 512} {
					if _, err := b.UnwrapKey(bg, label, a.alg, randomBytes(n)); !errors.Is(err, ErrInvalidCiphertext) {
						t.Errorf("unwrapping %d bytes with %s: %v, want ErrInvalidCiphertext", n, a.alg, err)
					}
				}
			}
			if tok.name != "SoftHSM2" {
				// A ciphertext of one hash does not unwrap as the other's.
				sha1CT, _ := rsa.EncryptOAEP(crypto.SHA1.New(), rand.Reader, &priv.PublicKey, []byte("k"), nil)
				if _, err := b.UnwrapKey(bg, label, RSAOAEP256, sha1CT); !errors.Is(err, ErrInvalidCiphertext) {
					t.Errorf("an RSA-OAEP ciphertext unwrapped as RSA-OAEP-256: %v", err)
				}
			}
		})
	}
}

// TestRSAKeySizes checks metadata and both directions at each size Azure
// takes, on NSS softokn (which does both hashes).
func TestRSAKeySizes(t *testing.T) {
	cfg, tk := nssConfig(t)
	prefix := unique("rsa-size")
	for _, bits := range rsaBits {
		tk.ImportRSAKey(t, prefix+strconv.Itoa(bits), hsmtest.RSAKey(t, bits), true)
	}
	b := open(t, "rsa-sizes", cfg)
	for _, bits := range rsaBits {
		label := prefix + strconv.Itoa(bits)
		md, err := b.WrapKeyMetadata(bg, label)
		if err != nil || md.Bits != bits || len(md.Modulus) != bits/8 || md.Modulus[0] == 0 {
			t.Fatalf("RSA-%d metadata: %d bits, %d-byte modulus, %v", bits, md.Bits, len(md.Modulus), err)
		}
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(md.Modulus), E: 65537}
		dek := randomBytes(32)
		ct, _ := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, dek, nil)
		if back, err := b.UnwrapKey(bg, label, RSAOAEP256, ct); err != nil || !bytes.Equal(back, dek) {
			t.Fatalf("RSA-%d: %v", bits, err)
		}
		w, err := b.WrapKey(bg, label, RSAOAEP256, dek)
		if err != nil || len(w) != bits/8 {
			t.Fatalf("RSA-%d wrap: %d bytes, %v", bits, len(w), err)
		}
		if back, err := b.UnwrapKey(bg, label, RSAOAEP256, w); err != nil || !bytes.Equal(back, dek) {
			t.Fatalf("RSA-%d round trip: %v", bits, err)
		}
	}
}

// TestWrapKeyRefusals is a table of the keys key wrap refuses, on
// SoftHSM2, each with the error kind a caller maps to its answer.
func TestWrapKeyRefusals(t *testing.T) {
	tk := hsmtest.NewToken(t)
	small := hsmtest.RSAKey(t, 1024)
	pair, other := hsmtest.RSAKey(t, 2048), hsmtest.RSAKey(t, 2048)
	tk.ImportKey(t, "aes128", randomBytes(16), hsmtest.KeyWrapping())
	tk.ImportKey(t, "aes256", randomBytes(32), hsmtest.KeyWrapping())
	tk.ImportKey(t, "crypt-only", randomBytes(32), hsmtest.Usage(pkcs11.CKA_WRAP, false), hsmtest.Usage(pkcs11.CKA_UNWRAP, false))
	tk.ImportKey(t, "exportable", randomBytes(32), hsmtest.KeyWrapping(), hsmtest.Protection(false, true))
	tk.CreateKey(t, "generic", hsmtest.GenericSecret(32), hsmtest.KeyWrapping())
	tk.ImportRSAKey(t, "rsa1024", small, true)
	tk.ImportRSAKey(t, "rsa2048", pair, true)
	tk.ImportRSAKey(t, "no-public", pair, false)
	tk.ImportRSAKey(t, "foreign-public", pair, false)
	tk.ImportRSAPublicKey(t, "foreign-public", &other.PublicKey)
	tk.ImportRSAKey(t, "both", pair, true)
	tk.ImportKey(t, "both", randomBytes(32), hsmtest.KeyWrapping())
	tk.ImportRSAKey(t, "no-decrypt", pair, true, hsmtest.Usage(pkcs11.CKA_DECRYPT, false), hsmtest.Usage(pkcs11.CKA_UNWRAP, false))
	b := open(t, "refusals", configFor(tk))
	dek := randomBytes(32)
	tests := []struct {
		name  string
		label string
		alg   WrapAlgorithm
		want  error // nil: it works
	}{
		{"an AES-128 key wraps nothing", "aes128", AESKeyWrap, ErrKeyUsage},
		{"a generic secret wraps nothing", "generic", AESKeyWrap, ErrKeyUsage},
		{"an RSA-1024 key wraps nothing", "rsa1024", RSAOAEP, ErrKeyUsage},
		{"an RSA algorithm with an AES key", "aes256", RSAOAEP, ErrAlgorithmMismatch},
		{"an AES algorithm with an RSA key", "rsa2048", AESKeyWrapPad, ErrAlgorithmMismatch},
		{"a key that permits only C_Encrypt, on a token that wraps with C_WrapKey", "crypt-only", AESKeyWrap, ErrKeyUsage},
		{"a key whose value can leave the HSM", "exportable", AESKeyWrap, ErrKeyExportable},
		{"no key with the label", "missing", AESKeyWrap, ErrKeyNotFound},
		{"an AES key and an RSA key with one label", "both", AESKeyWrap, ErrDuplicateKey},
		{"a public key of another pair under the label", "foreign-public", RSAOAEP, ErrKeyUsage},
		{"a private key that may neither decrypt nor unwrap", "no-decrypt", RSAOAEP, ErrKeyUsage},
		{"a private key without a public key object serves", "no-public", RSAOAEP, nil},
		{"AES-256 serves", "aes256", AESKeyWrap, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wrapped, err := b.WrapKey(bg, tt.label, tt.alg, dek)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("WrapKey: %v", err)
				}
				if back, err := b.UnwrapKey(bg, tt.label, tt.alg, wrapped); err != nil || !bytes.Equal(back, dek) {
					t.Fatalf("UnwrapKey: %v", err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("WrapKey: %v, want %v", err, tt.want)
			}
			t.Logf("%v", err)
			in := randomBytes(40)
			if tt.alg.rsa() {
				in = randomBytes(256)
			}
			if _, err := b.UnwrapKey(bg, tt.label, tt.alg, in); !errors.Is(err, tt.want) {
				t.Fatalf("UnwrapKey: %v, want %v", err, tt.want)
			}
			if tt.want == ErrAlgorithmMismatch {
				return // the key itself is fine
			}
			if _, err := b.WrapKeyMetadata(bg, tt.label); !errors.Is(err, tt.want) {
				t.Fatalf("WrapKeyMetadata: %v, want %v", err, tt.want)
			}
		})
	}
}

// TestGenerateWrapKey makes each kind of key-encryption key on both
// tokens, and checks that it stays in the HSM (the backend, which refuses
// keys whose value can leave it, uses it) and works: software wraps with
// the RSA public key the metadata gives, and the HSM unwraps.
func TestGenerateWrapKey(t *testing.T) {
	for _, tok := range wrapTokens(t) {
		t.Run(tok.name, func(t *testing.T) {
			b := open(t, "keygen", tok.cfg)
			pre := unique("gen") + "-"
			aes, err := b.GenerateWrapKey(bg, pre+"aes", WrapKeySpec{Type: WrapKeyAES, Bits: 256})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("AES-256: restricted to %v", aes.AllowedMechanisms)
			if _, err := b.GenerateWrapKey(bg, pre+"aes", WrapKeySpec{Type: WrapKeyRSA, Bits: 2048}); !errors.Is(err, ErrKeyExists) {
				t.Fatalf("a second key with the label: %v", err)
			}
			if _, err := b.GenerateWrapKey(bg, pre+"x", WrapKeySpec{Type: WrapKeyRSA, Bits: 1024}); !errors.Is(err, ErrKeyUsage) {
				t.Fatalf("RSA-1024: %v", err)
			}
			if got := tok.tk.Attribute(t, pre+"aes", pkcs11.CKA_SENSITIVE); !attrBool(got) {
				t.Fatal("the AES key is not sensitive")
			}
			dek := randomBytes(32)
			for _, alg := range []WrapAlgorithm{AESKeyWrap, AESKeyWrapPad} {
				w, err := b.WrapKey(bg, pre+"aes", alg, dek)
				if err != nil {
					t.Fatalf("%s: %v", alg, err)
				}
				if back, err := b.UnwrapKey(bg, pre+"aes", alg, w); err != nil || !bytes.Equal(back, dek) {
					t.Fatalf("%s: %v", alg, err)
				}
			}
			for _, bits := range []int{2048, 3072} {
				label := pre + "rsa" + strconv.Itoa(bits)
				g, err := b.GenerateWrapKey(bg, label, WrapKeySpec{Type: WrapKeyRSA, Bits: bits})
				if err != nil {
					t.Fatal(err)
				}
				if g.Bits != bits || !bytes.Equal(g.PublicExponent, []byte{1, 0, 1}) {
					t.Fatalf("RSA-%d: %d bits, e %x", bits, g.Bits, g.PublicExponent)
				}
				pub := &rsa.PublicKey{N: new(big.Int).SetBytes(g.Modulus), E: 65537}
				ct, _ := rsa.EncryptOAEP(crypto.SHA1.New(), rand.Reader, pub, dek, nil)
				if back, err := b.UnwrapKey(bg, label, RSAOAEP, ct); err != nil || !bytes.Equal(back, dek) {
					t.Fatalf("RSA-%d: the HSM does not unwrap crypto/rsa's: %v", bits, err)
				}
				w, err := b.WrapKey(bg, label, RSAOAEP, dek)
				if err != nil {
					t.Fatal(err)
				}
				if back, err := b.UnwrapKey(bg, label, RSAOAEP, w); err != nil || !bytes.Equal(back, dek) {
					t.Fatalf("RSA-%d round trip: %v", bits, err)
				}
			}
		})
	}
}

// TestRSAPublicKeyWithoutLeadingZeros: n and e are reported unsigned
// big-endian without leading zero bytes, whatever the token stores: a
// private key imported with its exponent as 00 01 00 01 (and no public key
// object, so the private key's own attributes serve) reports 01 00 01, as
// the API's AQAB.
func TestRSAPublicKeyWithoutLeadingZeros(t *testing.T) {
	tk := hsmtest.NewToken(t)
	pair := hsmtest.RSAKey(t, 2048)
	tk.ImportRSAKey(t, "padded", pair, false,
		hsmtest.Attribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{0, 1, 0, 1}),
		hsmtest.Attribute(pkcs11.CKA_MODULUS, append([]byte{0}, pair.N.Bytes()...)))
	b := open(t, "padded", configFor(tk))
	md, err := b.WrapKeyMetadata(bg, "padded")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(md.PublicExponent, []byte{1, 0, 1}) || !bytes.Equal(md.Modulus, pair.N.Bytes()) || md.Bits != 2048 {
		t.Fatalf("e %x, n of %d bytes starting %x, %d bits", md.PublicExponent, len(md.Modulus), md.Modulus[:2], md.Bits)
	}
	dek := randomBytes(32)
	w, err := b.WrapKey(bg, "padded", RSAOAEP, dek)
	if err != nil {
		t.Fatal(err)
	}
	if back, err := rsa.DecryptOAEP(crypto.SHA1.New(), nil, pair, w, nil); err != nil || !bytes.Equal(back, dek) {
		t.Fatalf("crypto/rsa does not unwrap the proxy's: %v", err)
	}
}
