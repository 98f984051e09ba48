package hsm

import (
	"bytes"
	"crypto/rand"
	"errors"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/kwref"
)

// nssConfig is a backend config for NSS softokn's key database token.
func nssConfig(t testing.TB) (Config, hsmtest.Token) {
	t.Helper()
	tk := hsmtest.NSS(t)
	cfg := configFor(tk)
	cfg.InitArgs = tk.InitArgs
	return cfg, tk
}

// TestKeyWrapKnownAnswerTest checks what the start-up known-answer test
// finds on the two tokens, each as reference/azure-ekm.md §3 measured it:
// SoftHSM2 does RFC 3394 only through C_WrapKey, and RFC 5649 under 0x210A,
// right only for whole 8-byte blocks (2.6.1 pads the rest with zeros); NSS
// softokn does both through C_Encrypt, RFC 5649 under 0x210B for every
// length, and cannot answer miekg/pkcs11's length query of C_WrapKey for it.
func TestKeyWrapKnownAnswerTest(t *testing.T) {
	nss, _ := nssConfig(t)
	tests := []struct {
		name     string
		cfg      Config
		kw, kwp  string
		kwpMech  uint
		kwpWhole bool
	}{
		{"SoftHSM2", configFor(hsmtest.NewToken(t)),
			"0x2109 (CKM_AES_KEY_WRAP): C_WrapKey/C_UnwrapKey passes",
			"0x210A (CKM_AES_KEY_WRAP_PAD): C_WrapKey/C_UnwrapKey passes for whole 8-byte blocks only",
			CKMAESKeyWrapPad, true},
		{"NSS softokn", nss,
			"0x2109 (CKM_AES_KEY_WRAP): C_Encrypt/C_Decrypt passes; C_WrapKey/C_UnwrapKey passes",
			"0x210B (CKM_AES_KEY_WRAP_KWP): C_Encrypt/C_Decrypt passes; C_WrapKey/C_UnwrapKey fails",
			CKMAESKeyWrapKWP, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := open(t, "kat", tt.cfg)
			kw, kwp := b.keyWrap.kw.describe(), b.keyWrap.kwp.describe()
			t.Logf("A256KW: %s", kw)
			t.Logf("A256KWP: %s", kwp)
			if !strings.HasPrefix(kw, tt.kw) {
				t.Errorf("A256KW: %s, want %s", kw, tt.kw)
			}
			if !strings.HasPrefix(kwp, tt.kwp) {
				t.Errorf("A256KWP: %s, want %s", kwp, tt.kwp)
			}
			if b.keyWrap.kwp.mech != tt.kwpMech || b.keyWrap.kwp.anyLength() == tt.kwpWhole {
				t.Errorf("A256KWP mechanism 0x%X, any length %t", b.keyWrap.kwp.mech, b.keyWrap.kwp.anyLength())
			}
		})
	}
}

// TestKWPMechanismSetting checks kwp_mechanism against the known-answer
// test: a number that gives other bytes than RFC 5649 fails the backend
// with an error naming the number that passes; a number that passes is
// used as configured.
func TestKWPMechanismSetting(t *testing.T) {
	nss, _ := nssConfig(t)
	softhsm := configFor(hsmtest.NewToken(t))
	tests := []struct {
		name    string
		cfg     Config
		setting string
		// refusal is what the error must say; "" when the backend opens
		// with the setting.
		refusal []string
	}{
		{"0x210A on NSS softokn is PKCS#7 padding, refused for 0x210B", nss, "0x210A", []string{
			"kwp_mechanism 0x210A (CKM_AES_KEY_WRAP_PAD) fails the RFC 5649 known-answer test on this token",
			"wrapping 8 bytes gave 24 bytes", "set kwp_mechanism 0x210B, which passes it"}},
		{"0x210B on SoftHSM2 is not offered, refused for 0x210A", softhsm, "0x210B", []string{
			"kwp_mechanism 0x210B (CKM_AES_KEY_WRAP_KWP) fails the RFC 5649 known-answer test on this token",
			"not offered by the token", "set kwp_mechanism 0x210A, which passes it"}},
		{"a vendor number the token does not know is refused", nss, "0x80000171", []string{
			"kwp_mechanism 0x80000171 fails", "set kwp_mechanism 0x210B"}},
		{"0x210B on NSS softokn is used", nss, "0x210B", nil},
		{"0x210A on SoftHSM2 is used", softhsm, "0x210A", nil},
		{"decimal works too", nss, "8459", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.KWPMechanism = tt.setting
			b, err := Open("kwp", cfg, zaptest.NewLogger(t))
			if tt.refusal == nil {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				defer b.Close()
				if want, _ := ParseMechanism(tt.setting); b.keyWrap.kwp.mech != want || !b.keyWrap.kwp.passed() {
					t.Fatalf("A256KWP: %s", b.keyWrap.kwp.describe())
				}
				return
			}
			if err == nil {
				b.Close()
				t.Fatal("the backend opened")
			}
			t.Logf("refusal: %v", err)
			for _, want := range tt.refusal {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("the error does not say %q", want)
				}
			}
		})
	}
	if _, err := ParseMechanism("CKM_AES_KEY_WRAP_KWP"); err == nil {
		t.Error("a mechanism name parsed as a number")
	}
}

// wrapTokens are the two PKCS#11 implementations key wrap is proven on.
func wrapTokens(t *testing.T) []struct {
	name string
	tk   hsmtest.Token
	cfg  Config
} {
	nss, ntk := nssConfig(t)
	stk := hsmtest.NewToken(t)
	return []struct {
		name string
		tk   hsmtest.Token
		cfg  Config
	}{{"SoftHSM2", stk, configFor(stk)}, {"NSS softokn", ntk, nss}}
}

// unique makes a label of its own for a key on NSS softokn, whose database
// the tests of a process share, so that another run (go test -count=N)
// makes its keys again.
func unique(prefix string) string { return prefix + "-" + rand.Text()[:8] }

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// TestAESKeyWrapRoundTrip wraps data keys of many lengths with A256KW and
// A256KWP on both tokens, under a KEK whose value the test knows, and
// checks each against the reference implementation both ways: what the
// HSM wraps is the reference's wrap (both are deterministic) and unwraps
// in software, and what software wraps the HSM unwraps. The lengths RFC
// 3394 does not take are refused before the token sees them, as are, on
// SoftHSM2, the RFC 5649 lengths it pads with zeros.
func TestAESKeyWrapRoundTrip(t *testing.T) {
	lengths := []int{1, 7, 8, 9, 15, 16, 20, 24, 31, 32, 33, 40, 64, 255, 256, 263, 512}
	for _, tok := range wrapTokens(t) {
		t.Run(tok.name, func(t *testing.T) {
			kek := randomBytes(32)
			label := unique("kek")
			tok.tk.ImportKey(t, label, kek, hsmtest.KeyWrapping())
			b := open(t, "wrap", tok.cfg)
			md, err := b.WrapKeyMetadata(bg, label)
			if err != nil || md.Type != WrapKeyAES || md.Bits != 256 || md.Modulus != nil {
				t.Fatalf("metadata %+v, %v", md, err)
			}
			wholeOnly := tok.name == "SoftHSM2"
			for _, alg := range []WrapAlgorithm{AESKeyWrap, AESKeyWrapPad} {
				ref, refUn := kwref.KW, kwref.KWUnwrap
				if alg == AESKeyWrapPad {
					ref, refUn = kwref.KWP, kwref.KWPUnwrap
				}
				for _, n := range lengths {
					dek := randomBytes(n)
					refused := (alg == AESKeyWrap && (n < 16 || n%8 != 0)) || (alg == AESKeyWrapPad && wholeOnly && n%8 != 0)
					got, err := b.WrapKey(bg, label, alg, dek)
					if refused {
						if !errors.Is(err, ErrInvalidInput) {
							t.Errorf("%s of %d bytes: %v, want ErrInvalidInput", alg, n, err)
						}
						if alg == AESKeyWrapPad {
							// Software's wrap of such a key is refused too: the
							// token's answer could not be trusted.
							if _, err := b.UnwrapKey(bg, label, alg, ref(kek, dek)); !errors.Is(err, ErrInvalidInput) {
								t.Errorf("unwrapping a %s of %d bytes: %v, want ErrInvalidInput", alg, n, err)
							}
						}
						continue
					}
					if err != nil {
						t.Fatalf("%s of %d bytes: %v", alg, n, err)
					}
					if want := ref(kek, dek); !bytes.Equal(got, want) {
						t.Fatalf("%s of %d bytes: the HSM gave %x, the reference %x", alg, n, got, want)
					}
					if back, err := refUn(kek, got); err != nil || !bytes.Equal(back, dek) {
						t.Fatalf("%s of %d bytes: software does not unwrap the HSM's answer: %v", alg, n, err)
					}
					back, err := b.UnwrapKey(bg, label, alg, ref(kek, dek))
					if err != nil || !bytes.Equal(back, dek) {
						t.Fatalf("%s of %d bytes: the HSM does not unwrap software's: %v", alg, n, err)
					}
					bad := bytes.Clone(got)
					bad[len(bad)/2] ^= 0x80
					if _, err := b.UnwrapKey(bg, label, alg, bad); !errors.Is(err, ErrInvalidCiphertext) {
						t.Fatalf("%s of %d bytes, tampered: %v, want ErrInvalidCiphertext", alg, n, err)
					}
				}
			}
			for _, w := range []struct {
				alg WrapAlgorithm
				n   int
			}{{AESKeyWrap, 16}, {AESKeyWrap, 23}, {AESKeyWrap, 0}, {AESKeyWrapPad, 8}, {AESKeyWrapPad, 20}} {
				if _, err := b.UnwrapKey(bg, label, w.alg, randomBytes(w.n)); !errors.Is(err, ErrInvalidCiphertext) {
					t.Errorf("unwrapping %d bytes with %s: %v, want ErrInvalidCiphertext", w.n, w.alg, err)
				}
			}
			if tk := tok.tk; tk.Module == hsmtest.Module {
				if n := tk.SessionKeys(t); n != 0 {
					t.Errorf("%d data keys left as session objects", n)
				}
			}
		})
	}
}
