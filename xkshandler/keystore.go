package xkshandler

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/authz"
	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/secret"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// KeyStore is one external key store: a URI path that KMS is configured with,
// the SigV4 credentials KMS signs with, the HSM backend(s) holding the keys
// and the external key ids that KMS may use through it.
type KeyStore struct {
	// URIPath is the key store's XksProxyUriPath as configured in KMS:
	// an optional prefix followed by /kms/xks/v1, e.g. "/demo/kms/xks/v1".
	// At most 128 characters of a-z, A-Z, 0-9, /, - and _. Required.
	URIPath string `json:"uri_path"`

	// HSM names the backends of the hsm app that hold this key store's keys,
	// in order of preference. Crypto goes to the first one; a backend that
	// is unavailable is skipped for the next, so list several only if they
	// hold the same key material (for example modules of one nShield
	// Security World). That is proven at provision and by the health check:
	// every key must be on every backend, and a ciphertext of one must
	// decrypt on the others, or the configuration fails to load (found
	// later, the backend is reported DEGRADED and calls with that key never
	// fall over to it). GetHealthStatus reports every one. Required.
	HSM []string `json:"hsm"`

	// Region is the AWS region of the KMS key store; requests signed for
	// another region fail authentication. Required.
	Region string `json:"region"`

	// Credentials are the SigV4 credentials KMS may sign with. List two
	// while rotating: both are accepted until the old one is removed.
	// At least one is required.
	Credentials []Credential `json:"credentials"`

	// Keys lists the external key ids (HSM key labels) KMS may use through
	// this key store; any other id gets KeyNotFoundException without the
	// HSM being asked. The single entry "*" allows every AES key on the
	// token but those that are versions 2 and up of a key (Versions): a
	// version is reached through its key's id only. Either way a key whose value can leave the HSM is refused
	// (KeyNotFoundException) by a backend without allow_exportable_keys.
	// Required.
	Keys []string `json:"keys"`

	// DisabledKeys lists external key ids that are disabled: GetKeyMetadata
	// reports them DISABLED and Encrypt and Decrypt answer
	// InvalidStateException, without the HSM being asked to use them,
	// whichever of their versions a ciphertext names. It
	// is how a key is switched off quickly (a config reload), since
	// PKCS#11 keys have no disabled state. Default: none.
	DisabledKeys []string `json:"disabled_keys,omitempty"`

	// CiphertextMetadata is returned, Base64-encoded, with every Encrypt
	// and bound into the AES-GCM AAD, so that the format of a ciphertext
	// can be recognised and versioned later. At most 20 bytes once decoded.
	// Default: none.
	CiphertextMetadata string `json:"ciphertext_metadata,omitempty"`

	// AADFraming selects how the AAD given to the HSM is built: "spec" (the
	// default; the spec's length-prefixed AAD and metadata) or "aws_sample"
	// (SHA-256 of the AAD in place of the AAD, as AWS's sample proxy does),
	// for key stores migrated from that proxy whose ciphertexts must stay
	// decryptable.
	AADFraming string `json:"aad_framing,omitempty"`

	// FleetSize is the number of proxy instances serving this key store,
	// reported to KMS as xksProxyFleetSize. Default: 1.
	FleetSize int `json:"fleet_size,omitempty"`

	// MaxClockSkew is how far a request's signing time may be from the
	// proxy's clock, either way; at most 15m (sigv4auth.MaxAllowedSkew).
	// Default: 5m, the spec's value.
	MaxClockSkew caddy.Duration `json:"max_clock_skew,omitempty"`

	// Authorize is the key store's secondary authorization policy: named
	// CEL rules over the request's metadata, operation, key and credential
	// (see package authz). A denied request gets AccessDeniedException and
	// the log names the rule. GetHealthStatus is never subject to it.
	// Default: no rules, every authenticated request is allowed.
	Authorize []authz.Rule `json:"authorize,omitempty"`

	// AllowPlainHTTP serves this key store's requests that did not arrive
	// over TLS. KMS always connects over TLS to the proxy's certificate, so
	// a plain request reached the proxy some other way; set it only behind
	// a load balancer that terminates KMS's TLS and forwards over a network
	// no one else can reach. Default: false, and such requests get
	// AccessDeniedException.
	AllowPlainHTTP bool `json:"allow_plain_http,omitempty"`

	// The key store's request quota, bound on concurrent HSM work and
	// deadline (rate_limit, rate_burst, max_concurrent, deadline): past the
	// first two, requests get ThrottlingException before the HSM is asked;
	// past the deadline, DependencyTimeoutException.
	frontend.Limits

	// Versions puts several HSM keys behind an external key id, its
	// versions (versions.go): Encrypt uses the current one and says which
	// in the ciphertextMetadata; Decrypt uses the one the metadata names.
	// Default: every key has version 1 only, the HSM key labelled as the
	// external key id.
	Versions []KeyVersions `json:"versions,omitempty"`

	// EncryptLimit is how many Encrypts one key version may do, counted
	// across the fleet through Caddy's storage (usage.go). With the caller
	// IV mode (the proxy makes the random IVs) a version at the limit is
	// refused for Encrypt (InvalidStateException, logged) unless a higher
	// version is configured, which becomes current by itself; in the hsm IV
	// modes the HSM makes the IVs and enforces its own limits, and the
	// count is only reported. Default: 2^32, NIST SP 800-38D §8.3's limit
	// for random 96-bit IVs.
	EncryptLimit uint64 `json:"encrypt_limit,omitempty"`

	// UsageWarnings are the fractions of encrypt_limit at which a warning
	// is logged for a key version, once per threshold and process.
	// Default: 0.5 and 0.9.
	UsageWarnings []float64 `json:"usage_warnings,omitempty"`

	verifier *sigv4auth.Verifier
	backends []*hsm.Backend
	keys     map[string]bool // nil: every key allowed
	// versionLabels are the HSM labels of versions 2 and up: reached only
	// through their key's id, never as an id of their own.
	versionLabels map[string]bool
	disabled      map[string]bool
	policy        *authz.Policy[authz.Input]
	framing       aadFraming
	// ciphertextMetadata is CiphertextMetadata decoded: what Encrypt
	// returns and binds into the AAD.
	ciphertextMetadata []byte
	check              frontend.KeyCheck
	logger             *zap.Logger

	// Key versions and their usage counters.
	usage     usageSettings
	limit     uint64
	warnAt    []uint64 // counts at which UsageWarnings are logged
	callerIVs bool     // some backend takes its IVs from the proxy
	versioned map[string]*versionedKey
	lazyMu    sync.Mutex
	lazy      map[string]*versionedKey // keys of a "*" key store, met at run time
	released  bool                     // cleanup gave the counters back
}

// usageSettings is what the key store's usage counters need from the
// handler and the config.
type usageSettings struct {
	// storage is what the counters write to: the config's storage, or
	// when a config unload closes that, an instance the handler opened for
	// the counters (usageStores), whose JSON is storageConfig.
	storage       certmagic.Storage
	storageConfig json.RawMessage
	instance      string
	interval      time.Duration
}

// Credential is one SigV4 access key id and secret access key.
type Credential struct {
	// AccessKeyID is 20 to 30 characters of A-Z and 2-7. It may be a
	// placeholder such as {env.XKS_AKID}.
	AccessKeyID string `json:"access_key_id"`

	// SecretAccessKey is 43 to 64 characters of A-Z, a-z, 0-9, /, + and =.
	// It must be an {env.*} or {file.*} placeholder, resolved when the
	// config is loaded, so that the secret never appears in the config JSON
	// (which the admin API serves and autosave writes to disk).
	SecretAccessKey string `json:"secret_access_key"`
}

// ResolveAccessKeyID returns the access key id, its placeholder resolved
// if it is one.
func (c Credential) ResolveAccessKeyID() (string, error) {
	akid, err := caddy.NewReplacer().ReplaceOrErr(c.AccessKeyID, true, true)
	if err != nil {
		return "", fmt.Errorf("access key id %s: %w", c.AccessKeyID, err)
	}
	return akid, nil
}

// Resolve returns the credential with its placeholders resolved: the
// access key id's, if it has one, and the secret access key's, which must
// be one (secret.Resolve). Errors name the placeholder, never a value.
func (c Credential) Resolve() (sigv4auth.Credential, error) {
	akid, err := c.ResolveAccessKeyID()
	if err != nil {
		return sigv4auth.Credential{}, err
	}
	key, err := secret.Resolve(c.SecretAccessKey)
	if err != nil {
		return sigv4auth.Credential{}, fmt.Errorf("the secret access key of %s %w", akid, err)
	}
	return sigv4auth.Credential{AccessKeyID: akid, SecretAccessKey: key}, nil
}

// CompleteURIPath is the URIPath of a key store given as path, which may
// leave off the API suffix /kms/xks/v1, as the Caddyfile and the commands
// allow: "/demo" is "/demo/kms/xks/v1", and "/" or "" is "/kms/xks/v1".
// It does not check the path; validation does.
func CompleteURIPath(path string) string {
	if path == "/" {
		path = ""
	}
	if !strings.HasSuffix(path, APIPathSuffix) {
		path += APIPathSuffix
	}
	return path
}

// validate checks the key store's configuration without side effects.
func (ks *KeyStore) validate() error {
	if len(ks.URIPath) > 128 || !uriPathPattern.MatchString(ks.URIPath) {
		return fmt.Errorf("uri_path %q must be an optional prefix of a-z, A-Z, 0-9, /, - and _ followed by %s, at most 128 characters", ks.URIPath, APIPathSuffix)
	}
	if len(ks.HSM) == 0 || len(ks.HSM) > 10 {
		return fmt.Errorf("key store %s: hsm must name 1 to 10 backends", ks.URIPath)
	}
	if ks.Region == "" {
		return fmt.Errorf("key store %s: region is required", ks.URIPath)
	}
	if len(ks.Credentials) == 0 {
		return fmt.Errorf("key store %s: at least one credential is required", ks.URIPath)
	}
	for _, c := range ks.Credentials {
		if !secret.IsPlaceholder(c.SecretAccessKey) {
			return fmt.Errorf("key store %s: the secret access key of %s %w", ks.URIPath, c.AccessKeyID, secret.ErrLiteral)
		}
	}
	if len(ks.Keys) == 0 {
		return fmt.Errorf("key store %s: keys must list the external key ids KMS may use (or \"*\" for all)", ks.URIPath)
	}
	for _, k := range ks.Keys {
		if k == "*" && len(ks.Keys) == 1 {
			continue
		}
		if !validKeyID(k) {
			return fmt.Errorf("key store %s: external key id %q must be 1 to 128 characters of a-z, A-Z, 0-9, ., - and _, not . or .. (and \"*\" stands alone)", ks.URIPath, k)
		}
	}
	for _, k := range ks.DisabledKeys {
		if !validKeyID(k) {
			return fmt.Errorf("key store %s: disabled key id %q is not a valid external key id", ks.URIPath, k)
		}
	}
	if _, err := parseFraming(ks.AADFraming); err != nil {
		return fmt.Errorf("key store %s: %w", ks.URIPath, err)
	}
	md, err := parseCiphertextMetadata(ks.CiphertextMetadata)
	if err != nil {
		return fmt.Errorf("key store %s: %w", ks.URIPath, err)
	}
	if bytes.HasPrefix(md, versionPrefix) {
		return fmt.Errorf("key store %s: a ciphertext_metadata that starts with the bytes 00 78 6b is reserved for key version metadata", ks.URIPath)
	}
	versioned := map[string]bool{}
	for i := range ks.Versions {
		kv := &ks.Versions[i]
		if err := kv.validate(ks.Keys); err != nil {
			return fmt.Errorf("key store %s: %w", ks.URIPath, err)
		}
		if versioned[kv.Key] {
			return fmt.Errorf("key store %s: the versions of %s are configured twice", ks.URIPath, kv.Key)
		}
		versioned[kv.Key] = true
	}
	for _, kv := range ks.Versions {
		for _, v := range kv.Versions {
			if v.Version > 1 && (versioned[v.Label] || slices.Contains(ks.Keys, v.Label)) {
				return fmt.Errorf("key store %s: %s, the label of version %d of %s, is also an external key id of the key store", ks.URIPath, v.Label, v.Version, kv.Key)
			}
		}
	}
	for _, w := range ks.UsageWarnings {
		if !(w > 0 && w < 1) {
			return fmt.Errorf("key store %s: usage_warnings must be fractions between 0 and 1, got %v", ks.URIPath, w)
		}
	}
	if ks.FleetSize < 0 {
		return fmt.Errorf("key store %s: fleet_size must be positive", ks.URIPath)
	}
	if err := ks.Limits.Validate(); err != nil {
		return fmt.Errorf("key store %s: %w", ks.URIPath, err)
	}
	return nil
}

// provision sets the key store's defaults, resolves its secrets and builds
// its runtime state, then runs the key check (keycheck.go): backends that
// do not hold the same keys fail the configuration. Caddy validates the
// configuration after provisioning, so provision must not rely on it being
// valid, only on failing safely.
func (ks *KeyStore) provision(app *hsm.App, logger *zap.Logger, usage usageSettings) error {
	ks.logger = logger
	ks.usage = usage
	if ks.AllowPlainHTTP {
		logger.Warn("key store serves requests that did not arrive over TLS (allow_plain_http): only safe behind a TLS-terminating load balancer on a network no one else reaches",
			zap.String("key_store", ks.URIPath))
	}
	creds := make([]sigv4auth.Credential, 0, len(ks.Credentials))
	for _, c := range ks.Credentials {
		cred, err := c.Resolve()
		if err != nil {
			return fmt.Errorf("key store %s: %w", ks.URIPath, err)
		}
		creds = append(creds, cred)
	}
	var err error
	ks.verifier, err = sigv4auth.NewVerifier(sigv4auth.Config{
		Region:      ks.Region,
		Credentials: creds,
		MaxSkew:     time.Duration(ks.MaxClockSkew),
	})
	if err != nil {
		return fmt.Errorf("key store %s: %w", ks.URIPath, err)
	}

	if ks.backends, err = frontend.LookupBackends(app, ks.HSM); err != nil {
		return fmt.Errorf("key store %s: %w", ks.URIPath, err)
	}

	ks.keys, ks.disabled = frontend.AllowList(ks.Keys), frontend.Set(ks.DisabledKeys)
	ks.versionLabels = make(map[string]bool)
	for _, kv := range ks.Versions {
		for _, v := range kv.Versions {
			if v.Version > 1 {
				ks.versionLabels[v.Label] = true
			}
		}
	}
	// Both are checked by validate, which Caddy runs after provisioning.
	ks.ciphertextMetadata, _ = parseCiphertextMetadata(ks.CiphertextMetadata)
	ks.framing, _ = parseFraming(ks.AADFraming)
	if ks.FleetSize == 0 {
		ks.FleetSize = 1
	}
	if ks.policy, err = authz.Compile(ks.Authorize); err != nil {
		return fmt.Errorf("key store %s: authorize: %w", ks.URIPath, err)
	}
	ks.Limits.Provision()
	for _, b := range ks.backends {
		ks.callerIVs = ks.callerIVs || b.IVMode() == "caller"
	}
	ctx, cancel := context.WithTimeout(context.Background(), frontend.KeyCheckTimeout)
	defer cancel()
	ks.provisionVersions(ctx)
	ks.setupKeyCheck()
	return ks.check.Run(ctx).Err(ks.URIPath)
}

// parseCiphertextMetadata decodes the configured ciphertext_metadata; an
// empty one is none (nil).
func parseCiphertextMetadata(s string) ([]byte, error) {
	if s == "" {
		return nil, nil
	}
	md, err := strictBase64.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("ciphertext_metadata is not valid Base64: %w", err)
	}
	if len(md) > xksapi.MaxCiphertextMetadataLen {
		return nil, fmt.Errorf("ciphertext_metadata is %d bytes, at most %d are allowed", len(md), xksapi.MaxCiphertextMetadataLen)
	}
	return md, nil
}

// admit takes a place for one request's HSM work, or says why not: the
// quota or the bound on concurrent work (ThrottlingException). release
// must be called when the work is done.
func (ks *KeyStore) admit() (release func(), xerr *xksError) {
	release, err := ks.Admit()
	if err != nil {
		return nil, newError(xksapi.ThrottlingException, err.Error())
	}
	return release, nil
}

// authorize runs the key store's secondary authorization policy on one
// call about a key.
func (ks *KeyStore) authorize(in *authz.Input) authz.Decision {
	return ks.policy.Evaluate(in)
}

// allows applies the key store's allow-list of external key ids. The label
// of a key's version 2 or later is never an id of its own, with keys "*"
// too: called by it, the version would escape its key's disable, its own
// disabled state and every authorization rule on the key's id, and KMS
// could bind a key to it.
func (ks *KeyStore) allows(keyID string) bool {
	return (ks.keys == nil || ks.keys[keyID]) && !ks.versionLabels[keyID]
}
