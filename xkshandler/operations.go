package xkshandler

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"strings"

	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// keyMetadata answers GetKeyMetadata: the spec, usage and status of the
// key's current version.
func (ks *KeyStore) keyMetadata(ctx context.Context, keyID string) (any, error) {
	label := keyID
	if vk := ks.versioned[keyID]; vk != nil {
		label = vk.current.Load().label
	}
	var md hsm.KeyMetadata
	err := ks.check.WithBackend(label, func(b *hsm.Backend) (err error) {
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
	err = ks.check.WithBackend(v.label, func(b *hsm.Backend) error {
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
	err = ks.check.WithBackend(v.label, func(b *hsm.Backend) (err error) {
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
		XKSProxyVendor:    frontend.ProxyVendor,
		XKSProxyModel:     frontend.ProxyModel(),
	}
	var reasons []string
	for i, h := range ks.check.Health(ctx) {
		b := ks.backends[i]
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
