package hsm

import (
	"bytes"
	"testing"

	"github.com/caddy-xks/caddy-xks/internal/kwref"
)

// TestReferenceKeyWrapMatchesRFCs checks the reference implementation
// (internal/kwref) on
// the RFCs' published vectors, typed here from RFC 3394 §4 and RFC 5649 §6,
// and then checks every known-answer vector the package runs at start-up
// against the reference: a vector typed wrong there fails here.
func TestReferenceKeyWrapMatchesRFCs(t *testing.T) {
	kek128 := hexBytes("000102030405060708090A0B0C0D0E0F")
	kek192a := hexBytes("000102030405060708090A0B0C0D0E0F1011121314151617")
	published := []struct {
		name            string
		pad             bool
		kek, p, wrapped []byte
	}{
		{"RFC 3394 4.1: 128 bits of data, 128-bit KEK", false, kek128, kwData[:16], hexBytes("1FA68B0A8112B447 AEF34BD8FB5A7B82 9D3E862371D2CFE5")},
		{"RFC 3394 4.2: 128 bits of data, 192-bit KEK", false, kek192a, kwData[:16], hexBytes("96778B25AE6CA435 F92B5B97C050AED2 468AB8A17AD84E5D")},
		{"RFC 3394 4.3: 128 bits of data, 256-bit KEK", false, kek256, kwData[:16], hexBytes("64E8C3F9CE0F5BA2 63E9777905818A2A 93C8191E7D6E8AE7")},
		{"RFC 3394 4.4: 192 bits of data, 192-bit KEK", false, kek192a, kwData[:24], hexBytes("031D33264E15D332 68F24EC260743EDC E1C6C7DDEE725A93 6BA814915C6762D2")},
		{"RFC 3394 4.5: 192 bits of data, 256-bit KEK", false, kek256, kwData[:24], hexBytes("A8F9BC1612C68B3F F6E6F4FBE30E71E4 769C8B80A32CB895 8CD5D17D6B254DA1")},
		{"RFC 3394 4.6: 256 bits of data, 256-bit KEK", false, kek256, kwData, hexBytes("28C9F404C4B810F4 CBCCB35CFB87F826 3F5786E2D80ED326 CBC7F0E71A99F43B FB988B9B7A02DD21")},
		{"RFC 5649 §6: 20 octets", true, hexBytes("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8"),
			hexBytes("c37b7e6492584340bed12207808941155068f738"), hexBytes("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")},
		{"RFC 5649 §6: 7 octets", true, hexBytes("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8"),
			hexBytes("466f7250617369"), hexBytes("afbeb0f07dfbf5419200f2ccb50bb24f")},
	}
	for _, v := range published {
		t.Run(v.name, func(t *testing.T) {
			wrap, unwrap := kwref.KW, kwref.KWUnwrap
			if v.pad {
				wrap, unwrap = kwref.KWP, kwref.KWPUnwrap
			}
			if got := wrap(v.kek, v.p); !bytes.Equal(got, v.wrapped) {
				t.Fatalf("wrap gave %x, the RFC says %x", got, v.wrapped)
			}
			back, err := unwrap(v.kek, v.wrapped)
			if err != nil || !bytes.Equal(back, v.p) {
				t.Fatalf("unwrap gave %x, %v", back, err)
			}
			bad := bytes.Clone(v.wrapped)
			bad[len(bad)-1] ^= 1
			if _, err := unwrap(v.kek, bad); err == nil {
				t.Fatal("a tampered ciphertext unwrapped")
			}
		})
	}
	for _, group := range []struct {
		name    string
		pad     bool
		vectors []kwVector
	}{{"kwVectors", false, kwVectors}, {"kwpWholeVectors", true, kwpWholeVectors}, {"kwpPartVectors", true, kwpPartVectors}} {
		for _, v := range group.vectors {
			t.Run(group.name+"/"+v.source, func(t *testing.T) {
				wrap := kwref.KW
				if group.pad {
					wrap = kwref.KWP
				}
				if got := wrap(v.kek, v.plaintext); !bytes.Equal(got, v.wrapped) {
					t.Fatalf("the package's vector says %x, the reference gives %x", v.wrapped, got)
				}
				if !group.pad && len(v.kek) != 32 {
					t.Fatal("an RFC 3394 vector of the self-test must use A256KW's 256-bit KEK")
				}
				if whole := len(v.plaintext)%8 == 0; group.pad && whole != (group.name == "kwpWholeVectors") {
					t.Fatalf("%d bytes in the wrong group", len(v.plaintext))
				}
			})
		}
	}
}
