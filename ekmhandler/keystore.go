package ekmhandler

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/authz"
	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
)

// KeyStore is what one EKM connection of Azure Managed HSM reaches: a
// path prefix, the client certificates Managed HSM connects with, the HSM
// backend(s) holding the keys and the key names Managed HSM may use.
type KeyStore struct {
	// PathPrefix is the EKM connection's path prefix (az keyvault
	// ekm-connection create --path-prefix), e.g. "/contoso/prod": a slash
	// followed by at most 63 characters of a-z, A-Z, 0-9, / and -, not
	// ending in a slash; or "" for none. The API is served under it
	// exactly: {prefix}/info, {prefix}/{key name}/metadata, .../wrapkey,
	// .../unwrapkey. Default: "".
	PathPrefix string `json:"path_prefix,omitempty"`

	// HSM names the backends of the hsm app that hold this key store's keys,
	// in order of preference. Key wrap goes to the first one; a backend that
	// is unavailable is skipped for the next, so list several only if they
	// hold the same key material (for example modules of one nShield
	// Security World). That is proven at provision and by the health check:
	// every key must be on every backend, and a key wrapped by one must
	// unwrap on the others, or the configuration fails to load (found
	// later, the backend is reported DEGRADED and calls with that key never
	// fall over to it). Required.
	HSM []string `json:"hsm"`

	// ClientSubjects are the subject common names of the client
	// certificates this key store accepts: Managed HSM's, as `az keyvault
	// ekm-connection certificate show` gives it (subjectCommonName, e.g.
	// contoso.managedhsmclient.azure.net). A certificate from the client
	// roots with any other name gets 401: the roots are Microsoft's, shared
	// by every Managed HSM, so they never authorize on their own. At least
	// one is required.
	ClientSubjects []string `json:"client_subjects"`

	// ClientRoots are files holding the CA certificates (PEM, or one DER
	// certificate) that the client certificate must chain to: the
	// caCertificates of `az keyvault ekm-connection certificate show`. The
	// handler checks the chain itself, so the site's TLS client_auth need
	// only request a certificate (mode request or verify_if_given). At least
	// one is required.
	ClientRoots []string `json:"client_roots"`

	// Keys lists the key names (HSM key labels) Managed HSM may use through
	// this key store; any other name gets 404 KeyNotFound without the HSM
	// being asked. The single entry "*" allows every key on the token. A
	// key whose value can leave the HSM is refused (KeyNotFound) by a
	// backend without allow_exportable_keys. Required.
	Keys []string `json:"keys"`

	// DisabledKeys lists key names that are disabled: metadata, wrapkey
	// and unwrapkey answer 403 KeyDisabled without the HSM being asked. It
	// is how a key is switched off quickly (a config reload), since PKCS#11
	// keys have no disabled state. Default: none.
	DisabledKeys []string `json:"disabled_keys,omitempty"`

	// Authorize is the key store's secondary authorization policy: named
	// CEL rules over the request's operation, key name, algorithm, client
	// certificate subject and request_context (see package authz). A denied
	// request gets 403 Forbidden and the log names the rule. info is never
	// subject to it. Default: no rules, every authenticated request is
	// allowed.
	Authorize []authz.Rule `json:"authorize,omitempty"`

	frontend.Limits

	roots    *x509.CertPool
	keys     map[string]bool // nil: every key allowed
	disabled map[string]bool
	policy   *authz.Policy[authz.EKMInput]
	check    frontend.KeyCheck
	logger   *zap.Logger
}

// name is the key store's name in logs and metrics: its prefix, or "/".
func (ks *KeyStore) name() string {
	if ks.PathPrefix == "" {
		return "/"
	}
	return ks.PathPrefix
}

// validate checks the key store's configuration without side effects.
func (ks *KeyStore) validate() error {
	p := ks.PathPrefix
	if p != "" && (!strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") || strings.Contains(p, "//") || !ekmapi.ValidPrefix(p)) {
		return fmt.Errorf("path_prefix %q must be a slash followed by at most %d characters of a-z, A-Z, 0-9, / and -, not ending in a slash, or empty", p, ekmapi.MaxPrefixLen-1)
	}
	if len(ks.HSM) == 0 || len(ks.HSM) > 10 {
		return fmt.Errorf("key store %s: hsm must name 1 to 10 backends", ks.name())
	}
	if len(ks.ClientSubjects) == 0 {
		return fmt.Errorf("key store %s: client_subjects must name the subject of Managed HSM's client certificate (az keyvault ekm-connection certificate show): its roots alone would let every Managed HSM in", ks.name())
	}
	for _, s := range ks.ClientSubjects {
		if s == "" || strings.ContainsAny(s, "*?") {
			return fmt.Errorf("key store %s: client subject %q must be a name, not empty or a pattern", ks.name(), s)
		}
	}
	if len(ks.ClientRoots) == 0 {
		return fmt.Errorf("key store %s: client_roots must name the files of the CA certificates of Managed HSM's client certificate", ks.name())
	}
	if len(ks.Keys) == 0 {
		return fmt.Errorf("key store %s: keys must list the key names Managed HSM may use (or \"*\" for all)", ks.name())
	}
	for _, k := range ks.Keys {
		if k == "*" && len(ks.Keys) == 1 {
			continue
		}
		if !ekmapi.ValidKeyName(k) {
			return fmt.Errorf("key store %s: key name %q must be 1 to %d characters of a-z, A-Z, 0-9 and - (and \"*\" stands alone)", ks.name(), k, ekmapi.MaxKeyNameLen)
		}
	}
	for _, k := range ks.DisabledKeys {
		if !ekmapi.ValidKeyName(k) {
			return fmt.Errorf("key store %s: disabled key name %q is not a valid key name", ks.name(), k)
		}
	}
	if err := ks.Limits.Validate(); err != nil {
		return fmt.Errorf("key store %s: %w", ks.name(), err)
	}
	return nil
}

// provision sets the key store's defaults, reads its client roots, builds
// its runtime state and runs the key check: backends that do not hold the
// same keys fail the configuration. Caddy validates the configuration after
// provisioning, so provision must not rely on it being valid, only on
// failing safely.
func (ks *KeyStore) provision(app *hsm.App, logger *zap.Logger) error {
	ks.logger = logger
	var err error
	if ks.roots, err = readRoots(ks.ClientRoots); err != nil {
		return fmt.Errorf("key store %s: client_roots: %w", ks.name(), err)
	}
	backends, err := frontend.LookupBackends(app, ks.HSM)
	if err != nil {
		return fmt.Errorf("key store %s: %w", ks.name(), err)
	}
	ks.keys, ks.disabled = frontend.AllowList(ks.Keys), frontend.Set(ks.DisabledKeys)
	if ks.policy, err = authz.CompileEKM(ks.Authorize); err != nil {
		return fmt.Errorf("key store %s: authorize: %w", ks.name(), err)
	}
	ks.Limits.Provision()
	ks.check = frontend.KeyCheck{
		Store: ks.name(), Backends: backends, Keys: wrapKeys{}, Logger: logger,
		Differ: "a key wrapped by one does not unwrap on the other",
	}
	if ks.keys != nil {
		ks.check.Labels = func() []string { return ks.Keys }
	}
	ctx, cancel := context.WithTimeout(context.Background(), frontend.KeyCheckTimeout)
	defer cancel()
	return ks.check.Run(ctx).Err(ks.name())
}

// readRoots reads the CA certificates of files, each PEM or one DER
// certificate.
func readRoots(files []string) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		var certs []*x509.Certificate
		if !strings.Contains(string(data), "-----BEGIN") {
			c, err := x509.ParseCertificate(data)
			if err != nil {
				return nil, fmt.Errorf("%s holds no PEM certificate and is not one DER certificate: %w", f, err)
			}
			certs = append(certs, c)
		}
		for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
			if block.Type != "CERTIFICATE" {
				continue
			}
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			certs = append(certs, c)
		}
		if len(certs) == 0 {
			return nil, fmt.Errorf("%s holds no certificate", f)
		}
		for _, c := range certs {
			if !c.IsCA {
				return nil, fmt.Errorf("%s: %q is not a CA certificate: give the roots of the client certificate, not the certificate itself", f, c.Subject.CommonName)
			}
			pool.AddCert(c)
		}
	}
	return pool, nil
}

// authenticate accepts a client certificate that chains to the key store's
// roots, for client authentication, and carries one of its subject names;
// it returns that name. The TLS handshake proved that the client holds the
// certificate's key. Every refusal is 401 Unauthorized.
func (ks *KeyStore) authenticate(state *tls.ConnectionState) (string, *ekmError) {
	if state == nil {
		return "", unauthorized("the proxy is called over mutual TLS only", errors.New("a plain-HTTP request"))
	}
	if len(state.PeerCertificates) == 0 {
		return "", unauthorized("no client certificate",
			errors.New("the client sent no certificate (the site's tls client_auth must request one: mode request or verify_if_given)"))
	}
	leaf := state.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range state.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ks.roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return "", unauthorized("the client certificate is not accepted", fmt.Errorf("it does not chain to the key store's client roots: %w", err))
	}
	subject := leaf.Subject.CommonName
	if !slices.Contains(ks.ClientSubjects, subject) {
		return "", unauthorized("the client certificate is not accepted",
			fmt.Errorf("its subject %q is not one of the key store's client_subjects", subject))
	}
	return subject, nil
}

// allows applies the key store's allow-list of key names.
func (ks *KeyStore) allows(keyName string) bool {
	return ks.keys == nil || ks.keys[keyName]
}
