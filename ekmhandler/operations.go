package ekmhandler

import (
	"context"
	"errors"
	"strings"

	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
)

// info answers /info: the API version, the proxy, and the HSM of the
// first backend that is not UNAVAILABLE, from the backends' cached health
// (a round trip at most once per health_ttl, never per call). With every
// backend UNAVAILABLE it is 502 BadGateway; reason says why a backend is
// not ACTIVE, for the audit line.
func (ks *KeyStore) info(ctx context.Context) (resp ekmapi.ProxyInfo, reason string, xerr *ekmError) {
	resp = ekmapi.ProxyInfo{
		APIVersion:  ekmapi.APIVersion,
		ProxyVendor: frontend.ProxyVendor,
		ProxyName:   frontend.ProxyModel(),
	}
	var reasons []string
	for i, h := range ks.check.Health(ctx) {
		if h.Status != hsm.HealthActive {
			reasons = append(reasons, "backend "+ks.check.Backends[i].Name()+" "+h.Status+": "+h.Reason)
		}
		if h.Status == hsm.HealthUnavailable || resp.EKMVendor != "" {
			continue
		}
		resp.EKMVendor = h.Manufacturer
		resp.EKMProduct = strings.TrimSpace(h.Model)
		if h.Firmware != "" {
			resp.EKMProduct += " firmware " + h.Firmware
		}
	}
	reason = strings.Join(reasons, "; ")
	if resp.EKMVendor == "" {
		return resp, "", &ekmError{code: ekmapi.CodeBadGateway, message: "no HSM of the key store is available", cause: errors.New(reason)}
	}
	return resp, reason, nil
}

// metadata answers /metadata: the key's type and size, and an RSA key's
// public key.
func (ks *KeyStore) metadata(ctx context.Context, keyName string) (any, error) {
	var md hsm.WrapKeyMetadata
	err := ks.check.WithBackend(keyName, func(b *hsm.Backend) (err error) {
		md, err = b.WrapKeyMetadata(ctx, keyName)
		return err
	})
	if err != nil {
		return nil, err
	}
	resp := ekmapi.KeyMetadata{KeyType: ekmapi.KeyTypeOct, KeySize: md.Bits, KeyOps: ekmapi.KeyOps}
	if md.Type == hsm.WrapKeyRSA {
		resp.KeyType, resp.N, resp.E = ekmapi.KeyTypeRSA, md.Modulus, md.PublicExponent
	}
	return resp, nil
}

// wrap answers /wrapkey.
func (ks *KeyStore) wrap(ctx context.Context, keyName string, req *ekmRequest) (any, error) {
	return ks.keyWrap(ctx, keyName, req, (*hsm.Backend).WrapKey)
}

// unwrap answers /unwrapkey.
func (ks *KeyStore) unwrap(ctx context.Context, keyName string, req *ekmRequest) (any, error) {
	return ks.keyWrap(ctx, keyName, req, (*hsm.Backend).UnwrapKey)
}

func (ks *KeyStore) keyWrap(ctx context.Context, keyName string, req *ekmRequest,
	do func(*hsm.Backend, context.Context, string, hsm.WrapAlgorithm, []byte) ([]byte, error)) (any, error) {
	var out []byte
	err := ks.check.WithBackend(keyName, func(b *hsm.Backend) (err error) {
		out, err = do(b, ctx, keyName, req.wrapAlg, req.value)
		return err
	})
	if err != nil {
		return nil, err
	}
	return ekmapi.WrapResult{Value: out}, nil
}
