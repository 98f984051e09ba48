package ekmapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
)

// TestValueIsBase64urlWithoutPadding holds Value to RFC 7515's encoding:
// every other spelling of the bytes that its characters tell apart is
// refused, as the API asks.
func TestValueIsBase64urlWithoutPadding(t *testing.T) {
	tests := []struct {
		name string
		json string
		want []byte // nil: refused
	}{
		{"base64url without padding", `"AQAB"`, []byte{1, 0, 1}},
		{"the URL alphabet", `"-_8"`, []byte{0xfb, 0xff}},
		{"empty", `""`, []byte{}},
		{"padding", `"AQA="`, nil},
		{"the standard alphabet's +", `"+/8"`, nil},
		{"the standard alphabet's /", `"//8"`, nil},
		{"a line break", `"AQ\nAB"`, nil},
		{"a carriage return", `"AQ\rAB"`, nil},
		{"white space", `"AQ AB"`, nil},
		// Hex is made of base64url characters: only the decoded length
		// can tell (a 32-byte key in hex decodes to 48 bytes), which the
		// handler checks.
		{"PEM", `"-----BEGIN PUBLIC KEY-----"`, nil},
		{"bits left over in the last character", `"AQB"`, nil},
		{"a length no encoding gives", `"A"`, nil},
		{"a number", `65537`, nil},
		{"null", `null`, []byte{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var v Value
			err := json.Unmarshal([]byte(tt.json), &v)
			if tt.want == nil {
				if !errors.Is(err, ErrNotBase64url) {
					t.Fatalf("decoded %x, %v; want ErrNotBase64url", v, err)
				}
				return
			}
			if err != nil || !bytes.Equal(v, tt.want) {
				t.Fatalf("decoded %x, %v; want %x", v, err, tt.want)
			}
		})
	}
	out, err := json.Marshal(KeyMetadata{KeyType: KeyTypeRSA, KeySize: 2048, KeyOps: KeyOps, N: Value{0xfb, 0xff}, E: Value{1, 0, 1}})
	if want := `{"key_type":"RSA","key_size":2048,"key_ops":["wrapKey","unwrapKey"],"n":"-_8","e":"AQAB"}`; err != nil || string(out) != want {
		t.Fatalf("encoded %s, %v; want %s", out, err, want)
	}
	out, _ = json.Marshal(KeyMetadata{KeyType: KeyTypeOct, KeySize: 256, KeyOps: KeyOps})
	if want := `{"key_type":"oct","key_size":256,"key_ops":["wrapKey","unwrapKey"]}`; string(out) != want {
		t.Fatalf("an oct key's metadata is %s, want %s", out, want)
	}
}

func TestNames(t *testing.T) {
	for _, tt := range []struct {
		name  string
		valid func(string) bool
		in    string
		want  bool
	}{
		{"a key name", ValidKeyName, "contoso-Key-1", true},
		{"a key name of 64 characters", ValidKeyName, string(bytes.Repeat([]byte{'k'}, 64)), true},
		{"a key name of 65 characters", ValidKeyName, string(bytes.Repeat([]byte{'k'}, 65)), false},
		{"an empty key name", ValidKeyName, "", false},
		{"a key name with _", ValidKeyName, "a_b", false},
		{"a key name with .", ValidKeyName, "a.b", false},
		{"a key name with /", ValidKeyName, "a/b", false},
		{"a prefix of segments", ValidPrefix, "/contoso/prod-1", true},
		{"no prefix", ValidPrefix, "", true},
		{"a prefix of 65 characters", ValidPrefix, "/" + string(bytes.Repeat([]byte{'p'}, 64)), false},
		{"a prefix with _", ValidPrefix, "/a_b", false},
	} {
		if got := tt.valid(tt.in); got != tt.want {
			t.Errorf("%s (%q): %v, want %v", tt.name, tt.in, got, tt.want)
		}
	}
}
