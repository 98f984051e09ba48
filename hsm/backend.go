package hsm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// Defaults of Config.
const (
	DefaultMaxSessions = 32
	DefaultSessionWait = 50 * time.Millisecond
	DefaultCallTimeout = 200 * time.Millisecond
	DefaultHealthTTL   = 30 * time.Second
)

// closeWait bounds how long Close waits for in-flight operations.
var closeWait = 10 * time.Second

// Config is one PKCS#11 backend's configuration.
type Config struct {
	// Module is the path of the PKCS#11 library, e.g.
	// /opt/nfast/toolkits/pkcs11/libcknfast.so. Required.
	Module string `json:"module"`
	// Token is the label of the token to use. At least one of token,
	// slot_id and serial is required; all that are given must match.
	Token string `json:"token,omitempty"`
	// SlotID selects the token by slot id. Slot ids can change when a
	// library re-initializes, so prefer token or serial. Default: unset.
	SlotID *uint `json:"slot_id,omitempty"`
	// Serial selects the token by serial number. Default: unset.
	Serial string `json:"serial,omitempty"`
	// PIN is the user PIN. In the hsm app it may be a placeholder such as
	// {env.XKS_HSM_PIN} or {file./etc/xks/pin}, resolved at provision time.
	// It is never logged. Required unless no_login is set.
	PIN string `json:"pin,omitempty"`
	// NoLogin skips C_Login, for tokens whose keys need no login (e.g.
	// nShield module-protected keys on the accelerator slot). Default: false.
	NoLogin bool `json:"no_login,omitempty"`
	// PINRefusedCodes are the codes, beyond PKCS#11's own
	// (CKR_PIN_INCORRECT, CKR_PIN_LOCKED, ...), with which this HSM's
	// C_Login says it refused the PIN: vendor-defined codes, as a number
	// (0x80000001) or as logs name them (CKR_VENDOR_DEFINED+0x1), or
	// PKCS#11 names (CKR_FUNCTION_FAILED). A login refused so is not tried
	// again until a configuration load, since HSMs lock the PIN, or zeroize
	// the partition, after a few wrong ones. Any other failed login is
	// tried again after a backoff that doubles from 1s to 5m. The setting
	// belongs to the token: backends sharing it use the one last loaded.
	// Default: none.
	PINRefusedCodes []string `json:"pin_refused_codes,omitempty"`
	// IVMode is how AES-GCM IVs are made: "caller" (random IVs from the
	// backend; SoftHSM2), "hsm" (the HSM writes its IV back; nShield,
	// CloudHSM), "hsm_appended" (the HSM appends a 16-byte IV; Luna in FIPS
	// mode) or "auto", which detects one of these at start-up and logs it.
	// Every mode is verified by a start-up self-test. Default: "auto".
	IVMode string `json:"iv,omitempty"`
	// MaxSessions bounds the token's session pool, and so the operations in
	// flight and the threads that can be stuck in the HSM. It is clamped to
	// the token's read-write session limit minus the anchor session. Backends
	// sharing a token share the pool of the first one opened. Default: 32.
	MaxSessions int `json:"max_sessions,omitempty"`
	// SessionWait is how long an operation waits for a free session before
	// failing with ErrBusy. Default: 50ms.
	SessionWait caddy.Duration `json:"session_wait,omitempty"`
	// CallTimeout is how long an operation's PKCS#11 calls may take before
	// it fails with ErrTimeout (a shorter context deadline wins). Default:
	// 200ms.
	CallTimeout caddy.Duration `json:"call_timeout,omitempty"`
	// PrivateKeys is CKA_PRIVATE for keys GenerateKey creates and for the
	// session keys of the self-test and health check. Only a token that
	// cannot hold private objects needs false: the nShield accelerator slot.
	// Elsewhere false weakens the key; on SoftHSM2 it is stored unencrypted
	// (see Backend.NonPrivateKeyMeaning). Default: true.
	PrivateKeys *bool `json:"private_keys,omitempty"`
	// AllowExportableKeys lets the backend use keys whose value can leave
	// the HSM: CKA_SENSITIVE false or CKA_EXTRACTABLE true (wrappable).
	// Whoever obtains such a key's value can decrypt every ciphertext made
	// with it, offline, so by default such a key is refused: calls with it
	// fail with ErrKeyExportable (XKS KeyNotFoundException) and a log line
	// says why. For tests that compare the HSM's output with a software
	// AES-GCM, never for keys that protect data. Default: false.
	AllowExportableKeys bool `json:"allow_exportable_keys,omitempty"`
	// HealthTTL is how long a health check's round trip result is reused;
	// at most 1m, the spec's limit. Default: 30s.
	HealthTTL caddy.Duration `json:"health_ttl,omitempty"`
	// Env holds environment variables set before the library is first
	// loaded, such as CKNFAST_LOADSHARING for nShield. Libraries read them
	// once, so changing them needs a restart. Default: none.
	Env map[string]string `json:"env,omitempty"`
	// InitArgs is a string that C_Initialize passes the library in
	// CK_C_INITIALIZE_ARGS.pReserved, for libraries configured that way:
	// NSS softokn (libsoftokn3.so) needs its database there, e.g.
	// "configdir='sql:/etc/xks/nssdb' certPrefix='' keyPrefix=''
	// secmod='secmod.db' flags=". Like Env, it is applied when the library
	// is first loaded, so changing it needs a restart. Default: none
	// (pReserved is NULL).
	InitArgs string `json:"init_args,omitempty"`
	// KWPMechanism is the PKCS#11 mechanism number of AES key wrap with
	// padding (RFC 5649, A256KWP), in hex or decimal: 0x210B
	// (CKM_AES_KEY_WRAP_KWP) on NSS softokn and tokens of PKCS#11 3.x, 0x210A
	// on SoftHSM2, where NSS and PKCS#11 3.x mean PKCS#7 padding by it. A
	// known-answer test on RFC 5649's vectors proves it at start-up and a
	// number that fails it fails the backend, naming the number that
	// passes. Default: unset, which probes 0x210B then 0x210A and uses the
	// one that passes (none: A256KWP is refused).
	KWPMechanism string `json:"kwp_mechanism,omitempty"`
}

// pinRefusedCodes parses PINRefusedCodes.
func (c *Config) pinRefusedCodes() (map[uint]bool, error) {
	codes := make(map[uint]bool, len(c.PINRefusedCodes))
	for _, s := range c.PINRefusedCodes {
		code, err := parseCKR(s)
		if err != nil {
			return nil, fmt.Errorf("pin_refused_codes: %w", err)
		}
		codes[code] = true
	}
	return codes, nil
}

func (c *Config) ident() tokenIdent {
	return tokenIdent{label: c.Token, serial: c.Serial, slotID: c.SlotID}
}

// Validate checks the configuration without touching the HSM.
func (c *Config) Validate() error {
	if c.Module == "" {
		return errors.New("module is required")
	}
	if c.Token == "" && c.Serial == "" && c.SlotID == nil {
		return errors.New("one of token, serial or slot_id is required")
	}
	if c.PIN == "" && !c.NoLogin {
		return errors.New("pin is required unless no_login is set")
	}
	if _, err := parseIVMode(c.IVMode); err != nil {
		return err
	}
	if _, err := c.pinRefusedCodes(); err != nil {
		return err
	}
	if c.KWPMechanism != "" {
		if _, err := ParseMechanism(c.KWPMechanism); err != nil {
			return fmt.Errorf("kwp_mechanism: %w", err)
		}
	}
	if c.MaxSessions < 0 {
		return fmt.Errorf("max_sessions must not be negative, got %d", c.MaxSessions)
	}
	if time.Duration(c.HealthTTL) > xksapi.MaxHealthAge {
		return fmt.Errorf("health_ttl must be at most %s: KMS must never be told a health result older than that", xksapi.MaxHealthAge)
	}
	for name, d := range map[string]caddy.Duration{"session_wait": c.SessionWait, "call_timeout": c.CallTimeout, "health_ttl": c.HealthTTL} {
		if d < 0 {
			return fmt.Errorf("%s must not be negative", name)
		}
	}
	return nil
}

func (c *Config) setDefaults() {
	if c.MaxSessions == 0 {
		c.MaxSessions = DefaultMaxSessions
	}
	if c.SessionWait == 0 {
		c.SessionWait = caddy.Duration(DefaultSessionWait)
	}
	if c.CallTimeout == 0 {
		c.CallTimeout = caddy.Duration(DefaultCallTimeout)
	}
	if c.HealthTTL == 0 {
		c.HealthTTL = caddy.Duration(DefaultHealthTTL)
	}
}

// Backend does AES-256-GCM with the keys of one PKCS#11 token. It is safe
// for concurrent use. Backends naming the same module and token share one
// logged-in token, its session pool and its key handle cache.
type Backend struct {
	name   string
	tok    *token
	key    string
	logger *zap.Logger

	ivMode       ivMode
	sessionWait  time.Duration
	callTimeout  time.Duration
	adminTimeout time.Duration
	healthTTL    time.Duration
	privateKeys  bool
	// allowExportable is AllowExportableKeys: backends sharing a token
	// share its key cache, and each applies its own setting.
	allowExportable bool
	// keyWrap is what the known-answer tests of key wrap proved at Open.
	keyWrap *keyWrapSupport

	inflight  atomic.Int64
	closeOnce sync.Once
	health    healthCache
}

// Open opens a backend named name: it loads the library (once per
// process), shares or opens the token, and runs the IV self-test. Backends
// opened by Open and by the hsm app share tokens alike.
func Open(name string, cfg Config, logger *zap.Logger) (*Backend, error) {
	if logger == nil {
		logger = zap.NewNop()
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("hsm backend %q: %w", name, err)
	}
	cfg.setDefaults()
	mode, _ := parseIVMode(cfg.IVMode)
	key := tokenKey(cfg.Module, cfg.ident())
	v, loaded, err := tokens.LoadOrNew(key, func() (caddy.Destructor, error) {
		return openToken(&cfg, logger)
	})
	if err != nil {
		return nil, fmt.Errorf("hsm backend %q: %w", name, err)
	}
	b := &Backend{
		name:         name,
		tok:          v.(*token),
		key:          key,
		logger:       logger,
		sessionWait:  time.Duration(cfg.SessionWait),
		callTimeout:  time.Duration(cfg.CallTimeout),
		adminTimeout: max(time.Duration(cfg.CallTimeout), 10*time.Second),
		healthTTL:    time.Duration(cfg.HealthTTL),
		privateKeys:  cfg.PrivateKeys == nil || *cfg.PrivateKeys,

		allowExportable: cfg.AllowExportableKeys,
	}
	if b.allowExportable {
		logger.Warn("allow_exportable_keys is set: this backend uses keys whose value can be read or wrapped out of the HSM, "+
			"and whoever obtains such a value can decrypt every ciphertext made with it, offline; for tests only, never for keys that protect data",
			zap.String("backend", name))
	}
	if loaded {
		logger.Debug("sharing an open token", zap.String("token", b.tok.ident.String()))
		codes, _ := cfg.pinRefusedCodes() // validated
		b.tok.pinRefused.Store(&codes)
		if !b.tok.retryLogin(logger, name, cfg.PIN) {
			b.tok.warnUnappliedSettings(logger, name, &cfg)
		}
	}
	b.ivMode, err = b.resolveIVMode(context.Background(), mode)
	if err != nil {
		_, _ = tokens.Delete(key)
		return nil, fmt.Errorf("hsm backend %q: %w", name, err)
	}
	var kwpMech uint
	if cfg.KWPMechanism != "" {
		kwpMech, _ = ParseMechanism(cfg.KWPMechanism)
	}
	if b.keyWrap, err = b.proveKeyWrap(context.Background(), kwpMech); err != nil {
		_, _ = tokens.Delete(key)
		return nil, fmt.Errorf("hsm backend %q: %w", name, err)
	}
	if !b.privateKeys && b.describe().Manufacturer == softHSMManufacturer {
		logger.Warn("private_keys is false on a token that stores keys that are not private in the clear: "+b.NonPrivateKeyMeaning(),
			zap.String("backend", name))
	}
	logger.Info("hsm backend ready", zap.String("backend", name),
		zap.Stringer("iv_mode", b.ivMode), zap.Bool("iv_mode_detected", mode == ivAuto),
		zap.String("key_wrap", b.keyWrap.kw.describe()), zap.String("key_wrap_pad", b.keyWrap.kwp.describe()))
	return b, nil
}

// Name returns the backend's name.
func (b *Backend) Name() string { return b.name }

// IVMode returns the IV mode in use: caller, hsm or hsm_appended.
func (b *Backend) IVMode() string { return b.ivMode.String() }

// enter registers an operation in flight, unless the token is gone. A
// closed backend still serves while its token lives: Caddy cleans up an old
// config while requests it accepted are still running, and those must not
// fail because a new config replaced it. An operation adds itself before it
// checks, and Close and Destruct set their flags before they count, so
// neither ever misses one.
func (b *Backend) enter() bool {
	b.inflight.Add(1)
	b.tok.ops.Add(1)
	if b.tok.destroyed.Load() {
		b.leave()
		return false
	}
	return true
}

func (b *Backend) leave() {
	b.tok.ops.Add(-1)
	b.inflight.Add(-1)
}

// Close waits (boundedly) for the backend's operations in flight and
// releases the shared token, which is closed when no backend uses it any
// more. It never logs out or finalizes the library.
func (b *Backend) Close() error {
	b.closeOnce.Do(func() {
		if !waitZero(&b.inflight, closeWait) {
			b.logger.Warn("closing hsm backend with operations still in flight",
				zap.String("backend", b.name), zap.Int64("in_flight", b.inflight.Load()))
		}
		_, _ = tokens.Delete(b.key)
	})
	return nil
}

// waitZero waits up to d for n to reach zero and reports whether it did.
func waitZero(n *atomic.Int64, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for n.Load() > 0 {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

// Stats is a snapshot of a backend's session pool, for metrics. Backends
// sharing a token share the pool.
type Stats struct {
	// SessionsInUse counts sessions held by operations, stuck ones included.
	SessionsInUse int
	// SessionsIdle counts open sessions waiting in the pool.
	SessionsIdle int
	// Waiters counts operations waiting for a session.
	Waiters int
	// StuckCalls counts calls whose caller timed out but which have not
	// returned from the HSM yet.
	StuckCalls int
	// MaxSessions is the pool's size.
	MaxSessions int
}

// Stats returns the pool's current figures.
func (b *Backend) Stats() Stats {
	p := b.tok.pool
	return Stats{
		SessionsInUse: int(max(p.inUse.Load(), 0)),
		SessionsIdle:  p.idleCount(),
		Waiters:       int(max(p.waiters.Load(), 0)),
		StuckCalls:    int(max(p.stuck.Load(), 0)),
		MaxSessions:   p.size,
	}
}
