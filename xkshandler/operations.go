package xkshandler

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// withBackend runs fn on the first backend that can serve the HSM key
// label, falling over to the next one only when a backend reports the HSM
// unavailable. A backend that the key check found holding another key under
// the label is never used for it: its ciphertexts would not decrypt on the
// others.
func (ks *KeyStore) withBackend(label string, fn func(*hsm.Backend) error) error {
	var err error
	var skipped []string
	differs := ks.keyCheck.differing(label)
	for i, b := range ks.backends {
		if i < len(differs) && differs[i] {
			skipped = append(skipped, b.Name())
			continue
		}
		if err = fn(b); !errors.Is(err, hsm.ErrUnavailable) {
			return err
		}
	}
	if len(skipped) > 0 {
		reason := fmt.Errorf("backends %s hold another key labelled %q and are not used for it", strings.Join(skipped, ", "), label)
		if err == nil {
			return &hsm.Error{Kind: hsm.ErrUnavailable, Key: label, Err: reason}
		}
		return fmt.Errorf("%w; %w", err, reason)
	}
	return err
}

// keyMetadata answers GetKeyMetadata: the spec, usage and status of the
// key's current version.
func (ks *KeyStore) keyMetadata(ctx context.Context, keyID string) (any, error) {
	label := keyID
	if vk := ks.versioned[keyID]; vk != nil {
		label = vk.current.Load().label
	}
	var md hsm.KeyMetadata
	err := ks.withBackend(label, func(b *hsm.Backend) (err error) {
		md, err = b.Metadata(ctx, label)
		return err
	})
	if err != nil {
		return nil, err
	}
	status := md.KeyStatus
	if ks.disabled[keyID] {
		status = "DISABLED"
	}
	return xksapi.MetadataResponse{KeySpec: md.KeySpec, KeyUsage: md.KeyUsage, KeyStatus: status}, nil
}

// encrypt answers Encrypt: AES-GCM in the HSM over the framed AAD, the
// key store's ciphertextMetadata with the ciphertext and, if asked for, the
// CDIV of what was proved decryptable.
func (ks *KeyStore) encrypt(ctx context.Context, keyID string, req *xksRequest) (any, error) {
	vk, err := ks.keyVersions(ctx, keyID)
	if err != nil {
		return nil, err
	}
	v, err := ks.forEncrypt(vk)
	if err != nil {
		return nil, err
	}
	md := ks.metadataFor(v)
	aad := ks.framing.hsmAAD(req.aad, md)
	var resp xksapi.EncryptResponse
	err = ks.withBackend(v.label, func(b *hsm.Backend) error {
		res, err := b.Encrypt(ctx, v.label, req.plaintext, aad)
		if err != nil {
			return err
		}
		if len(res.Ciphertext) != len(req.plaintext) || len(res.Tag) != xksapi.TagLen || !xksapi.ValidIVLen(len(res.IV)) {
			return fmt.Errorf("%w: HSM returned %d bytes of ciphertext for %d of plaintext, a %d-byte tag and a %d-byte IV",
				hsm.ErrInternal, len(res.Ciphertext), len(req.plaintext), len(res.Tag), len(res.IV))
		}
		resp = xksapi.EncryptResponse{
			Ciphertext:           res.Ciphertext,
			CiphertextMetadata:   md,
			InitializationVector: res.IV,
			AuthenticationTag:    res.Tag,
		}
		if !req.wantCDIV {
			return nil
		}
		// Appendix C: compute the CDIV over the bytes about to be returned
		// first, then prove them decryptable, so a corruption after the
		// check cannot hide behind a matching CDIV.
		resp.CiphertextDataIntegrityValue = cdiv(req.aad, md, res.IV, res.Ciphertext, res.Tag)
		pt, err := b.Decrypt(ctx, v.label, res.IV, res.Ciphertext, res.Tag, aad)
		if err != nil {
			if errors.Is(err, hsm.ErrKeyUsage) {
				return err
			}
			return fmt.Errorf("%w: decrypting the fresh ciphertext for its integrity check: %w", hsm.ErrInternal, err)
		}
		if subtle.ConstantTimeCompare(pt, req.plaintext) != 1 {
			return fmt.Errorf("%w: the fresh ciphertext did not decrypt to the plaintext", hsm.ErrInternal)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

// decrypt answers Decrypt with the key version the ciphertextMetadata
// names, over the AAD framed with that metadata.
func (ks *KeyStore) decrypt(ctx context.Context, keyID string, req *xksRequest) (any, error) {
	vk, err := ks.keyVersions(ctx, keyID)
	if err != nil {
		return nil, err
	}
	v, err := ks.forDecrypt(vk, req.ciphertextMetadata)
	if err != nil {
		return nil, err
	}
	aad := ks.framing.hsmAAD(req.aad, req.ciphertextMetadata)
	var pt []byte
	err = ks.withBackend(v.label, func(b *hsm.Backend) (err error) {
		pt, err = b.Decrypt(ctx, v.label, req.iv, req.ciphertext, req.tag, aad)
		return err
	})
	if err != nil {
		return nil, err
	}
	return xksapi.DecryptResponse{Plaintext: pt}, nil
}

// health reports every backend of the key store. It is never an error: KMS
// expects 200 with truthful statuses, UNAVAILABLE included. A backend whose
// keys the key check found wrong (a duplicate label, a key the others do not
// hold or hold differently) is DEGRADED at best. KMS's answer has no room
// for why a backend is not ACTIVE, so that comes back separately, for the
// audit line.
func (ks *KeyStore) health(ctx context.Context) (resp xksapi.HealthResponse, reason string) {
	resp = xksapi.HealthResponse{
		XKSProxyFleetSize: ks.FleetSize,
		XKSProxyVendor:    "caddy-xks",
		XKSProxyModel:     proxyModel(),
	}
	var reasons []string
	ttl := time.Duration(0)
	for _, b := range ks.backends {
		if ttl == 0 || b.HealthTTL() < ttl {
			ttl = b.HealthTTL()
		}
	}
	keys := ks.latestKeyReport(ctx, ttl)
	for i, b := range ks.backends {
		h := b.Health(ctx)
		if problems := keys.backendProblems(i); len(problems) > 0 {
			if h.Status == hsm.HealthActive {
				h.Status = hsm.HealthDegraded
			}
			if h.Reason != "" {
				problems = append([]string{h.Reason}, problems...)
			}
			h.Reason = strings.Join(problems, "; ")
		}
		if h.Status != hsm.HealthActive {
			reasons = append(reasons, fmt.Sprintf("backend %s %s: %s", b.Name(), h.Status, h.Reason))
		}
		if resp.EKMVendor == "" {
			resp.EKMVendor = h.Manufacturer
		}
		id := b.Name()
		if h.Serial != "" {
			id += " " + h.Serial
		}
		model := strings.TrimSpace(h.Model)
		if h.Firmware != "" {
			model += " firmware " + h.Firmware
		}
		if model == "" {
			model = "unknown"
		}
		resp.EKMFleetDetails = append(resp.EKMFleetDetails, xksapi.EKMFleetDetail{ID: id, Model: model, HealthStatus: h.Status})
	}
	if resp.EKMVendor == "" {
		resp.EKMVendor = "unknown"
	}
	return resp, strings.Join(reasons, "; ")
}
