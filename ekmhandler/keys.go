package ekmhandler

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"slices"

	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
)

// wrapKeys are the key-encryption keys as the key check sees them: a key
// is provable when it serves key wrap, and two backends hold the same key
// when a data key wrapped by one unwraps on the other (for RSA, once their
// public keys are equal).
type wrapKeys struct{}

func (wrapKeys) State(ctx context.Context, b *hsm.Backend, label string) frontend.KeyState {
	_, err := b.CheckWrapKey(ctx, label)
	return frontend.KeyState{Provable: err == nil, Err: err}
}

func (k wrapKeys) List(ctx context.Context, b *hsm.Backend) ([]frontend.Listed, error) {
	labels, err := b.ListWrapKeys(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]frontend.Listed, 0, len(labels))
	for _, label := range slices.Compact(labels) {
		out = append(out, frontend.Listed{Label: label, State: k.State(ctx, b, label)})
	}
	return out, nil
}

// Same wraps a random data key on a and unwraps it on b, with the first
// algorithm of the key's kind that both HSMs do.
func (wrapKeys) Same(ctx context.Context, label string, a, b *hsm.Backend) (bool, error) {
	ma, err := a.WrapKeyMetadata(ctx, label)
	if err != nil {
		return false, err
	}
	mb, err := b.WrapKeyMetadata(ctx, label)
	if err != nil {
		return false, err
	}
	if ma.Type != mb.Type || ma.Bits != mb.Bits || !bytes.Equal(ma.Modulus, mb.Modulus) || !bytes.Equal(ma.PublicExponent, mb.PublicExponent) {
		return false, nil
	}
	algs := []hsm.WrapAlgorithm{hsm.AESKeyWrap, hsm.AESKeyWrapPad}
	if ma.Type == hsm.WrapKeyRSA {
		algs = []hsm.WrapAlgorithm{hsm.RSAOAEP, hsm.RSAOAEP256}
	}
	dek := make([]byte, 32)
	_, _ = rand.Read(dek) // never fails
	var last error
	for _, alg := range algs {
		wrapped, err := a.WrapKey(ctx, label, alg, dek)
		if err == nil {
			var back []byte
			back, err = b.UnwrapKey(ctx, label, alg, wrapped)
			if errors.Is(err, hsm.ErrInvalidCiphertext) {
				return false, nil
			}
			if err == nil {
				return bytes.Equal(back, dek), nil
			}
		}
		if !errors.Is(err, hsm.ErrUnsupportedAlgorithm) {
			return false, err
		}
		last = err
	}
	return false, last
}
