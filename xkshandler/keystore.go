package xkshandler

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"golang.org/x/time/rate"

	"github.com/caddy-xks/caddy-xks/authz"
	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/internal/placeholder"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// APIPathSuffix ends every key store's URI path (XksProxyUriPath); v1 is
// the only version of the XKS API.
const APIPathSuffix = "/kms/xks/v1"

// uriPathPattern is KMS's rule for XksProxyUriPath (CreateCustomKeyStore),
// narrowed to the API version this proxy serves.
var uriPathPattern = regexp.MustCompile(`^(/[a-zA-Z0-9/_-]+)?/kms/xks/v1$`)

// keyIDPattern is KMS's rule for an external key id (XksKeyId).
var keyIDPattern = regexp.MustCompile(`^[a-zA-Z0-9._-]{1,128}$`)

// validKeyID applies KMS's rule, less "." and "..": as path segments they
// would be resolved away by any proxy or client that normalizes paths, so a
// key with such an id could be reached by another path than the one signed.
func validKeyID(id string) bool {
	return id != "." && id != ".." && keyIDPattern.MatchString(id)
}

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
	// Security World). GetHealthStatus reports every one. Required.
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
	// token. Required.
	Keys []string `json:"keys"`

	// DisabledKeys lists external key ids that are disabled: GetKeyMetadata
	// reports them DISABLED and Encrypt and Decrypt answer
	// InvalidStateException, without the HSM being asked to use them. It
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
	// proxy's clock, either way. Default: 5m, the spec's value.
	MaxClockSkew caddy.Duration `json:"max_clock_skew,omitempty"`

	// Authorize is the key store's secondary authorization policy: named
	// CEL rules over the request's metadata, operation, key and credential
	// (see package authz). A denied request gets AccessDeniedException and
	// the log names the rule. GetHealthStatus is never subject to it.
	// Default: no rules, every authenticated request is allowed.
	Authorize []authz.Rule `json:"authorize,omitempty"`

	// RateLimit is the key store's request quota in requests per second,
	// a token bucket refilled at this rate; past it, requests get
	// ThrottlingException before the HSM is asked. KMS's own default quota
	// per external key store is 1800. Default: 0, no quota.
	RateLimit float64 `json:"rate_limit,omitempty"`

	// RateBurst is the token bucket's size: how many requests may arrive
	// at once above the rate. Default: one second's worth of rate_limit.
	RateBurst int `json:"rate_burst,omitempty"`

	// MaxConcurrent bounds the requests of this key store doing HSM work at
	// once; past it, requests get ThrottlingException at once. Default: 0,
	// bounded only by the HSM backend's session pool.
	MaxConcurrent int `json:"max_concurrent,omitempty"`

	// Deadline bounds each request, from its arrival to the HSM's answer;
	// past it the request gets DependencyTimeoutException (HSM work it
	// started is abandoned, counted, and its session closed when the HSM
	// returns). KMS waits 250 ms for an answer, network included.
	// Default: 200ms.
	Deadline caddy.Duration `json:"deadline,omitempty"`

	verifier *sigv4auth.Verifier
	backends []*hsm.Backend
	keys     map[string]bool // nil: every key allowed
	disabled map[string]bool
	policy   *authz.Policy
	limiter  *rate.Limiter // nil: no quota
	slots    chan struct{} // nil: no bound on concurrent HSM work
	framing  aadFraming
	// ciphertextMetadata is CiphertextMetadata decoded: what Encrypt
	// returns and binds into the AAD.
	ciphertextMetadata []byte
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
		if !placeholder.IsSecretReference(c.SecretAccessKey) {
			return fmt.Errorf("key store %s: the secret access key of %s must be an {env.*} or {file.*} placeholder, so that it never appears in the config", ks.URIPath, c.AccessKeyID)
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
	if _, err := parseCiphertextMetadata(ks.CiphertextMetadata); err != nil {
		return fmt.Errorf("key store %s: %w", ks.URIPath, err)
	}
	if ks.FleetSize < 0 {
		return fmt.Errorf("key store %s: fleet_size must be positive", ks.URIPath)
	}
	if ks.RateLimit < 0 || ks.RateBurst < 0 || ks.MaxConcurrent < 0 || ks.Deadline < 0 {
		return fmt.Errorf("key store %s: rate_limit, rate_burst, max_concurrent and deadline must not be negative", ks.URIPath)
	}
	return nil
}

// provision sets the key store's defaults, resolves its secrets and builds
// its runtime state. Caddy validates the configuration after provisioning,
// so provision must not rely on it being valid, only on failing safely.
func (ks *KeyStore) provision(app *hsm.App) error {
	repl := caddy.NewReplacer()
	creds := make([]sigv4auth.Credential, 0, len(ks.Credentials))
	for _, c := range ks.Credentials {
		akid, err := repl.ReplaceOrErr(c.AccessKeyID, true, true)
		if err != nil {
			return fmt.Errorf("key store %s: access key id %s: %w", ks.URIPath, c.AccessKeyID, err)
		}
		secret, err := repl.ReplaceOrErr(c.SecretAccessKey, true, true)
		if err != nil {
			// The error names the placeholder, never its value.
			return fmt.Errorf("key store %s: secret access key of %s: %w", ks.URIPath, akid, err)
		}
		creds = append(creds, sigv4auth.Credential{AccessKeyID: akid, SecretAccessKey: secret})
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

	ks.backends = ks.backends[:0]
	for _, name := range ks.HSM {
		b, err := app.Backend(name)
		if err != nil {
			return fmt.Errorf("key store %s: %w", ks.URIPath, err)
		}
		ks.backends = append(ks.backends, b)
	}

	if len(ks.Keys) != 1 || ks.Keys[0] != "*" {
		ks.keys = make(map[string]bool, len(ks.Keys))
		for _, k := range ks.Keys {
			ks.keys[k] = true
		}
	}
	ks.disabled = make(map[string]bool, len(ks.DisabledKeys))
	for _, k := range ks.DisabledKeys {
		ks.disabled[k] = true
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
	if ks.RateLimit > 0 {
		burst := ks.RateBurst
		if burst == 0 {
			burst = max(int(ks.RateLimit), 1)
		}
		ks.limiter = rate.NewLimiter(rate.Limit(ks.RateLimit), burst)
	}
	if ks.MaxConcurrent > 0 {
		ks.slots = make(chan struct{}, ks.MaxConcurrent)
	}
	if ks.Deadline == 0 {
		ks.Deadline = caddy.Duration(defaultDeadline)
	}
	return nil
}

// defaultDeadline leaves KMS's 250 ms for the network and TLS.
const defaultDeadline = 200 * time.Millisecond

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
// quota or the bound on concurrent work. release must be called when the
// work is done.
func (ks *KeyStore) admit() (release func(), xerr *xksError) {
	if ks.limiter != nil && !ks.limiter.Allow() {
		return nil, newError(ThrottlingException, "the key store's request quota is exceeded")
	}
	if ks.slots == nil {
		return func() {}, nil
	}
	select {
	case ks.slots <- struct{}{}:
		return func() { <-ks.slots }, nil
	default:
		return nil, newError(ThrottlingException, "too many requests of this key store are in the HSM")
	}
}

// authorize runs the secondary authorization policy.
func (ks *KeyStore) authorize(x *exchange) authz.Decision {
	return ks.policy.Evaluate(&authz.Input{
		Operation:       x.op.String(),
		KeyStore:        ks.URIPath,
		ExternalKeyID:   x.keyID,
		AccessKeyID:     x.akid,
		RequestMetadata: *x.requestMetadata,
	})
}

func (ks *KeyStore) allows(keyID string) bool {
	return ks.keys == nil || ks.keys[keyID]
}

// withBackend runs fn on the first backend that can serve, falling over to
// the next one only when a backend reports the HSM unavailable.
func (ks *KeyStore) withBackend(fn func(*hsm.Backend) error) error {
	var err error
	for _, b := range ks.backends {
		if err = fn(b); !errors.Is(err, hsm.ErrUnavailable) {
			return err
		}
	}
	return err
}

// keyMetadata answers GetKeyMetadata: the key's spec, usage and status.
func (ks *KeyStore) keyMetadata(ctx context.Context, keyID string) (any, error) {
	var md hsm.KeyMetadata
	err := ks.withBackend(func(b *hsm.Backend) (err error) {
		md, err = b.Metadata(ctx, keyID)
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
	aad := ks.framing.hsmAAD(req.aad, ks.ciphertextMetadata)
	var resp xksapi.EncryptResponse
	err := ks.withBackend(func(b *hsm.Backend) error {
		res, err := b.Encrypt(ctx, keyID, req.plaintext, aad)
		if err != nil {
			return err
		}
		if len(res.Ciphertext) != len(req.plaintext) || len(res.Tag) != xksapi.TagLen || !xksapi.ValidIVLen(len(res.IV)) {
			return fmt.Errorf("%w: HSM returned %d bytes of ciphertext for %d of plaintext, a %d-byte tag and a %d-byte IV",
				hsm.ErrInternal, len(res.Ciphertext), len(req.plaintext), len(res.Tag), len(res.IV))
		}
		resp = xksapi.EncryptResponse{
			Ciphertext:           res.Ciphertext,
			CiphertextMetadata:   ks.ciphertextMetadata,
			InitializationVector: res.IV,
			AuthenticationTag:    res.Tag,
		}
		if !req.wantCDIV {
			return nil
		}
		// Appendix C: compute the CDIV over the bytes about to be returned
		// first, then prove them decryptable, so a corruption after the
		// check cannot hide behind a matching CDIV.
		resp.CiphertextDataIntegrityValue = cdiv(req.aad, ks.ciphertextMetadata, res.IV, res.Ciphertext, res.Tag)
		pt, err := b.Decrypt(ctx, keyID, res.IV, res.Ciphertext, res.Tag, aad)
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

// decrypt answers Decrypt, over the AAD framed with the ciphertextMetadata
// the request carries.
func (ks *KeyStore) decrypt(ctx context.Context, keyID string, req *xksRequest) (any, error) {
	aad := ks.framing.hsmAAD(req.aad, req.ciphertextMetadata)
	var pt []byte
	err := ks.withBackend(func(b *hsm.Backend) (err error) {
		pt, err = b.Decrypt(ctx, keyID, req.iv, req.ciphertext, req.tag, aad)
		return err
	})
	if err != nil {
		return nil, err
	}
	return xksapi.DecryptResponse{Plaintext: pt}, nil
}

// health reports every backend of the key store. It is never an error: KMS
// expects 200 with truthful statuses, UNAVAILABLE included. KMS's answer has
// no room for why a backend is not ACTIVE, so that comes back separately,
// for the audit line.
func (ks *KeyStore) health(ctx context.Context) (resp xksapi.HealthResponse, reason string) {
	resp = xksapi.HealthResponse{
		XKSProxyFleetSize: ks.FleetSize,
		XKSProxyVendor:    "caddy-xks",
		XKSProxyModel:     proxyModel(),
	}
	var reasons []string
	for _, b := range ks.backends {
		h := b.Health(ctx)
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
