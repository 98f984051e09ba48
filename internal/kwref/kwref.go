// Package kwref is an implementation of AES key wrap (RFC 3394) and AES key
// wrap with padding (RFC 5649) written from the RFCs' text (§2.2.1 and
// §2.2.2 of RFC 3394, the index-based form; §4.1 and §4.2 of RFC 5649),
// independent of every PKCS#11 token and of package hsm: tests check the
// tokens' answers, and the known-answer vectors hsm runs at start-up,
// against it. It is for tests only: it makes no effort against timing
// side channels beyond the integrity check.
package kwref

import (
	"bytes"
	"crypto/aes"
	"crypto/subtle"
	"encoding/binary"
	"errors"
)

var rfc3394IV = []byte{0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6}

// wrap is RFC 3394's wrapping process W with the initial value iv.
func wrap(kek, iv, p []byte) []byte {
	block, err := aes.NewCipher(kek)
	if err != nil {
		panic(err)
	}
	n := len(p) / 8
	a := bytes.Clone(iv)
	r := bytes.Clone(p)
	b := make([]byte, 16)
	for j := range 6 {
		for i := 1; i <= n; i++ {
			copy(b, a)
			copy(b[8:], r[(i-1)*8:i*8])
			block.Encrypt(b, b)
			t := uint64(n*j + i) //nolint:gosec // n, j and i are small and positive
			binary.BigEndian.PutUint64(a, binary.BigEndian.Uint64(b[:8])^t)
			copy(r[(i-1)*8:], b[8:])
		}
	}
	return append(a, r...)
}

// unwrap is RFC 3394's unwrapping process W⁻¹; it returns A and R.
func unwrap(kek, c []byte) (a, r []byte) {
	block, err := aes.NewCipher(kek)
	if err != nil {
		panic(err)
	}
	n := len(c)/8 - 1
	a = bytes.Clone(c[:8])
	r = bytes.Clone(c[8:])
	b := make([]byte, 16)
	for j := 5; j >= 0; j-- {
		for i := n; i >= 1; i-- {
			t := uint64(n*j + i) //nolint:gosec // n, j and i are small and positive
			binary.BigEndian.PutUint64(b, binary.BigEndian.Uint64(a)^t)
			copy(b[8:], r[(i-1)*8:i*8])
			block.Decrypt(b, b)
			copy(a, b[:8])
			copy(r[(i-1)*8:], b[8:])
		}
	}
	return a, r
}

// KW is RFC 3394 key wrap.
func KW(kek, p []byte) []byte { return wrap(kek, rfc3394IV, p) }

// KWUnwrap is RFC 3394 key unwrap, with its integrity check.
func KWUnwrap(kek, c []byte) ([]byte, error) {
	if len(c) < 24 || len(c)%8 != 0 {
		return nil, errors.New("bad length")
	}
	a, r := unwrap(kek, c)
	if subtle.ConstantTimeCompare(a, rfc3394IV) != 1 {
		return nil, errors.New("integrity check failed")
	}
	return r, nil
}

// KWP is RFC 5649 key wrap with padding.
func KWP(kek, p []byte) []byte {
	aiv := []byte{0xA6, 0x59, 0x59, 0xA6, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(aiv[4:], uint32(len(p))) //nolint:gosec // test inputs are short
	padded := append(bytes.Clone(p), make([]byte, (8-len(p)%8)%8)...)
	if len(padded) == 8 {
		block, err := aes.NewCipher(kek)
		if err != nil {
			panic(err)
		}
		out := append(aiv, padded...)
		block.Encrypt(out, out)
		return out
	}
	return wrap(kek, aiv, padded)
}

// KWPUnwrap is RFC 5649 key unwrap with padding, with its checks.
func KWPUnwrap(kek, c []byte) ([]byte, error) {
	if len(c) < 16 || len(c)%8 != 0 {
		return nil, errors.New("bad length")
	}
	var a, r []byte
	if len(c) == 16 {
		block, err := aes.NewCipher(kek)
		if err != nil {
			panic(err)
		}
		out := make([]byte, 16)
		block.Decrypt(out, c)
		a, r = out[:8], out[8:]
	} else {
		a, r = unwrap(kek, c)
	}
	if !bytes.Equal(a[:4], []byte{0xA6, 0x59, 0x59, 0xA6}) {
		return nil, errors.New("integrity check failed")
	}
	mli := int(binary.BigEndian.Uint32(a[4:]))
	if mli <= len(r)-8 || mli > len(r) {
		return nil, errors.New("bad message length indicator")
	}
	if !bytes.Equal(r[mli:], make([]byte, len(r)-mli)) {
		return nil, errors.New("bad padding")
	}
	return r[:mli], nil
}
