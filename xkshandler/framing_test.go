package xkshandler

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"encoding/hex"
	"testing"
)

// The vectors below were computed outside Go (Python's cryptography package)
// from the constructions as documented: the spec's §"ciphertextMetadata" for
// framingSpec and AWS's sample proxy's build_full_aad for framingAWSSample.
// Key 00..1f, IV 00..0b, plaintext "Hello World!".
var (
	vectorKey       = seq(32)
	vectorIV        = seq(12)
	vectorPlaintext = []byte("Hello World!")
	vectorAAD       = []byte("project=nile,department=marketing")
	vectorMetadata  = []byte("key_version=1")
)

func seq(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}

func TestAADFramingVectors(t *testing.T) {
	const ciphertext = "D2e6d6rFlXT/LfOq" // GCM ciphertext does not depend on the AAD
	tests := []struct {
		name     string
		framing  aadFraming
		aad, md  []byte
		tag      string
		wantCDIV string // only for the spec framing; CDIV does not depend on it
	}{
		{"spec: AAD and metadata", framingSpec, vectorAAD, vectorMetadata, "z16Jpi+YEVrPfy7xOkRNVw==", "f3I7NWF4DGjk7+jfvjeSU5DvQJDKZ/RQztaBma/YHso="},
		{"spec: neither", framingSpec, nil, nil, "+DX8ZJOvQVMTeK7gwOAsdg==", "doMOaf+m+SLxEOfkUsWQLZ7ogxHdDMkxCl3238JWldo="},
		{"spec: AAD only", framingSpec, vectorAAD, nil, "oD3KqtYrMSdh/L3FQun+ag==", "ndew6iqil9so4xVeXqDoAWYgTm8gWoAIkLjPnyJAWhk="},
		{"spec: metadata only", framingSpec, nil, vectorMetadata, "zBQmoZLnRilLWaxwhHNPsg==", "9ISwnqfzvezG/zTL/EKdqjzrijKkAuuKMdsJsvorDIY="},
		{"aws_sample: AAD and metadata", framingAWSSample, vectorAAD, vectorMetadata, "bfJZGtJ467nLg9SrQBNpoQ==", ""},
		{"aws_sample: neither (same as spec)", framingAWSSample, nil, nil, "+DX8ZJOvQVMTeK7gwOAsdg==", ""},
		{"aws_sample: AAD only", framingAWSSample, vectorAAD, nil, "WdOD39Mw7MOTotY7BIAKZQ==", ""},
		{"aws_sample: metadata only (same as spec)", framingAWSSample, nil, vectorMetadata, "zBQmoZLnRilLWaxwhHNPsg==", ""},
	}
	block, err := aes.NewCipher(vectorKey)
	if err != nil {
		t.Fatal(err)
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := gcm.Seal(nil, vectorIV, vectorPlaintext, tt.framing.hsmAAD(tt.aad, tt.md)) //nolint:gosec // a known-answer vector's fixed IV
			ct, tag := out[:len(vectorPlaintext)], out[len(vectorPlaintext):]
			if got := base64.StdEncoding.EncodeToString(ct); got != ciphertext {
				t.Errorf("ciphertext = %s, want %s", got, ciphertext)
			}
			if got := base64.StdEncoding.EncodeToString(tag); got != tt.tag {
				t.Errorf("tag = %s, want %s", got, tt.tag)
			}
			if tt.wantCDIV != "" {
				got := base64.StdEncoding.EncodeToString(cdiv(tt.aad, tt.md, vectorIV, ct, tag))
				if got != tt.wantCDIV {
					t.Errorf("CDIV = %s, want %s", got, tt.wantCDIV)
				}
			}
		})
	}
}

func TestAWSSampleFramingBytes(t *testing.T) {
	// u16be(33) ‖ SHA-256(AAD) ‖ u8(13) ‖ "key_version=1"
	want := "00216fb32b1a4c13895a23343800001e0635885003c4d04ebb3cdd631452a824e6390d6b65795f76657273696f6e3d31"
	got := framingAWSSample.hsmAAD(vectorAAD, vectorMetadata)
	if hex.EncodeToString(got) != want {
		t.Errorf("aws_sample framing = %x, want %s", got, want)
	}
}

func TestCDIVSpecAppendixC(t *testing.T) {
	// The spec's own example: its Encrypt response and Appendix C.
	dec := func(s string) []byte {
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	got := cdiv(dec("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n"), dec("a2V5X3ZlcnNpb249MQ=="),
		dec("HMrlRw85cAJUd5Ax"), dec("ghxkK1txeDNn3q8Y"), dec("vBxN2ncH1oEkR8WVXpmyYQ=="))
	if want := dec("qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="); !bytes.Equal(got, want) {
		t.Errorf("CDIV = %x, want %x", got, want)
	}
}
