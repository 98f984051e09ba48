package xkshandler

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
)

// The key check (frontend.KeyCheck) proves what a key store's backends hold
// under its key labels, at provision and again from the health check: one
// key per label on each backend, and with several backends the same key on
// each. For XKS the proof is a ciphertext made by one backend that another
// decrypts, which works in every IV mode: decryption always takes the IV as
// given. The check also finds the configured key versions that no backend
// holds (checkVersions).

// keyIdentityAAD is the AAD of the identity proof's ciphertexts; the
// plaintext is random. The proof must use the key store's own keys (there
// is no other way to prove they are equal), so the HSM's log shows these
// operations once per health interval.
var keyIdentityAAD = []byte("caddy-xks key identity check")

// setupKeyCheck makes the key store's key check over its backends.
func (ks *KeyStore) setupKeyCheck() {
	ks.check = frontend.KeyCheck{
		Store: ks.URIPath, Backends: ks.backends, Keys: gcmKeys{}, Logger: ks.logger,
		Differ: "a ciphertext made by one does not decrypt on the other",
		Extra:  ks.checkVersions,
	}
	if ks.keys != nil {
		ks.check.Labels = ks.keyLabels
	}
}

// keyLabels are the HSM key labels of a key store that lists its keys: its
// external key ids and the labels of their versions.
func (ks *KeyStore) keyLabels() []string {
	all := maps.Clone(ks.keys)
	for _, vk := range ks.versioned {
		for _, l := range vk.labels() {
			all[l] = true
		}
	}
	return slices.Sorted(maps.Keys(all))
}

// gcmKeys are the AES-GCM keys of XKS as the key check sees them: a key is
// provable when it is AES-256.
type gcmKeys struct{}

func (gcmKeys) State(ctx context.Context, b *hsm.Backend, label string) frontend.KeyState {
	md, err := b.CheckKey(ctx, label)
	return frontend.KeyState{Provable: err == nil && md.KeySpec == hsm.KeySpecAES256, Err: err}
}

func (gcmKeys) List(ctx context.Context, b *hsm.Backend) ([]frontend.Listed, error) {
	keys, err := b.ListKeys(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]frontend.Listed, 0, len(keys))
	for _, k := range keys {
		st := frontend.KeyState{Provable: k.KeySpec == hsm.KeySpecAES256}
		if k.Protection.Exportable() != "" && !b.AllowsExportableKeys() {
			st.Err = &hsm.Error{Kind: hsm.ErrKeyExportable, Key: k.Label}
		}
		out = append(out, frontend.Listed{Label: k.Label, State: st})
	}
	return out, nil
}

// Same proves whether a and b hold the same key under label: a ciphertext
// of one decrypts on the other, whichever way the keys' usage allows. An
// error means neither way could be tried.
func (gcmKeys) Same(ctx context.Context, label string, a, b *hsm.Backend) (bool, error) {
	same, err := proveSameKey(ctx, label, a, b)
	if errors.Is(err, hsm.ErrKeyUsage) {
		same, err = proveSameKey(ctx, label, b, a)
	}
	if errors.Is(err, hsm.ErrKeyUsage) {
		return false, fmt.Errorf("neither backend may encrypt with the key while the other decrypts: %w", err)
	}
	return same, err
}

// proveSameKey encrypts a random plaintext on from and decrypts it on to.
func proveSameKey(ctx context.Context, label string, from, to *hsm.Backend) (bool, error) {
	pt := make([]byte, 32)
	_, _ = rand.Read(pt) // never fails
	res, err := from.Encrypt(ctx, label, pt, keyIdentityAAD)
	if err != nil {
		return false, err
	}
	got, err := to.Decrypt(ctx, label, res.IV, res.Ciphertext, res.Tag, keyIdentityAAD)
	if errors.Is(err, hsm.ErrInvalidCiphertext) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return bytes.Equal(got, pt), nil
}

// checkVersions refuses each configured key version that Encrypt or
// Decrypt may need (every one that is not disabled) and that no backend
// that answered holds.
func (ks *KeyStore) checkVersions(r *frontend.KeyReport, states map[string][]frontend.KeyState) {
	answered := r.Answered()
	for _, k := range slices.Sorted(maps.Keys(ks.versioned)) {
		vk := ks.versioned[k]
		if !vk.configured {
			continue
		}
		for _, v := range vk.versions {
			if v.disabled {
				continue
			}
			if !answered || slices.ContainsFunc(states[v.label], frontend.KeyState.Exists) {
				continue
			}
			r.Refuse(fmt.Sprintf("version %d of key %s, the HSM key labelled %q, is on no backend, so calls that need it fail: make it with `caddy xks keygen --label %s`, or disable the version",
				v.n, vk.key, v.label, v.label))
		}
	}
}
