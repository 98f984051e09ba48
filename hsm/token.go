package hsm

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/miekg/pkcs11"
	"go.uber.org/zap"
)

// tokens holds the tokens in use, shared by every backend (and every loaded
// config) naming the same module and token, so that a config reload neither
// logs out nor re-opens a token the new config still uses.
var tokens = caddy.NewUsagePool()

// errPINRefused marks a login failure caused by the PIN. Nothing retries it
// on its own; a configuration load tries once more (see retryLogin).
var errPINRefused = errors.New("pin refused by token; not tried again until a configuration reload")

// pinRefusedAction is what the log tells the operator to do about a refused
// PIN.
const pinRefusedAction = "check the pin (its file or environment variable) and the token's PIN state on the HSM, " +
	"then reload the configuration with `caddy reload --force` (systemctl reload caddy runs it), or start the proxy: " +
	"each load of the configuration tries the login once"

// tokenIdent selects a token: by serial, label or slot id, whichever are set
// (all of them must match).
type tokenIdent struct {
	label, serial string
	slotID        *uint
}

func (id tokenIdent) String() string {
	var parts []string
	if id.label != "" {
		parts = append(parts, "label "+strconv.Quote(id.label))
	}
	if id.serial != "" {
		parts = append(parts, "serial "+strconv.Quote(id.serial))
	}
	if id.slotID != nil {
		parts = append(parts, "slot "+strconv.FormatUint(uint64(*id.slotID), 10))
	}
	return strings.Join(parts, ", ")
}

// tokenInfo describes the token and its library for health reports.
type tokenInfo struct {
	manufacturer, model, serial, firmware, library string
	maxRWSessions                                  uint
}

// tokenState is what a successful connection in one library generation
// produced. It is replaced, never modified.
type tokenState struct {
	gen    uint64
	slot   uint
	anchor pkcs11.SessionHandle
	info   tokenInfo
	err    error
}

// token is one logged-in token. It keeps an anchor session open for its whole
// life: closing an application's last session on a token logs it out and
// invalidates the handles of private keys.
type token struct {
	lib     *library
	key     string
	ident   tokenIdent
	pin     atomic.Pointer[string] // replaced when a config brings a new PIN after the old one was refused
	noLogin bool
	logger  *zap.Logger
	// maxSessions is the max_sessions the token was opened with, before
	// clamping: a later config asking for another value is told it has no
	// effect.
	maxSessions int

	state     atomic.Pointer[tokenState]
	connectMu sync.Mutex // serializes logins: connect, relogin, retryLogin
	// pinFailed is the error of the last login refused for the PIN; while
	// it is set nothing logs in.
	pinFailed atomic.Pointer[Error]
	// pinRefused are the codes besides PKCS#11's PIN codes that mean the
	// PIN was refused (pin_refused_codes).
	pinRefused atomic.Pointer[map[uint]bool]
	// After any other failed login, loginErr is its error, and no login is
	// tried before loginRetry; loginBackoff doubles with each failure.
	// Guarded by connectMu.
	loginErr     *Error
	loginRetry   time.Time
	loginBackoff time.Duration
	// loginFailures counts failed C_Login calls, for metrics.
	loginFailures atomic.Uint64

	pool *sessionPool
	// ops counts operations in flight on the token through any backend;
	// destroyed is set when the last backend released it.
	ops       atomic.Int64
	destroyed atomic.Bool
	// keys caches the AES-GCM keys, wrapKeys the key-encryption keys.
	keys, wrapKeys keyCache
	ivs            *ivRegistry
	// generating serializes GenerateKey so two calls cannot both see a label
	// as free.
	generating sync.Mutex
}

// tokenKey is the UsagePool key: the module and the token's identity, never
// the PIN or pool settings, so two configs for one token share one login.
func tokenKey(module string, id tokenIdent) string {
	return module + "\x00" + id.String()
}

// openToken loads the library and connects to the token.
func openToken(cfg *Config, logger *zap.Logger) (*token, error) {
	lib, err := loadLibrary(cfg.Module, cfg.Env, cfg.InitArgs, logger)
	if err != nil {
		return nil, &Error{Kind: ErrUnavailable, Op: "open", Err: err}
	}
	id := cfg.ident()
	t := &token{
		lib:         lib,
		key:         tokenKey(cfg.Module, id),
		ident:       id,
		noLogin:     cfg.NoLogin,
		maxSessions: cfg.MaxSessions,
		logger:      logger,
		ivs:         newIVRegistry(ivWindow),
	}
	t.pin.Store(&cfg.PIN)
	codes, _ := cfg.pinRefusedCodes() // validated
	t.pinRefused.Store(&codes)
	t.keys.load = (*callSession).loadSecretKey
	t.wrapKeys.load = (*callSession).loadWrapKey
	gen, ok := lib.acquire()
	if !ok {
		_, reason, _ := lib.status()
		return nil, &Error{Kind: ErrUnavailable, Op: "open", Err: fmt.Errorf("pkcs11 module is reconnecting: %s", reason)}
	}
	_, info, err := findSlot(lib.ctx, id)
	if err != nil {
		lib.release()
		return nil, err
	}
	size := cfg.MaxSessions
	if max := info.maxRWSessions; max != pkcs11.CK_EFFECTIVELY_INFINITE && max != pkcs11.CK_UNAVAILABLE_INFORMATION && max > 1 {
		// One read-write session is the anchor. The comparison stays
		// unsigned: opencryptoki reports 2^64-2, which as an int is
		// negative.
		if max-1 < uint(size) { //nolint:gosec // size is positive: Validate and setDefaults
			logger.Warn("max_sessions clamped to the token's read-write session limit",
				zap.Int("configured", size), zap.Uint("token_limit", max))
			size = int(max - 1)
		}
	}
	t.pool = newSessionPool(size)
	lib.register(t)
	st, err := t.connect(gen)
	lib.release()
	if err != nil {
		lib.unregister(t)
		return nil, err
	}
	logger.Info("token opened",
		zap.String("token", id.String()), zap.Uint("slot", st.slot),
		zap.String("model", st.info.model), zap.String("serial", st.info.serial),
		zap.Int("max_sessions", size))
	return t, nil
}

// connect finds the slot, opens the anchor session and logs in, once per
// library generation. The caller holds the lifecycle read lock for gen.
func (t *token) connect(gen uint64) (*tokenState, error) {
	if st := t.state.Load(); st != nil && st.gen == gen {
		return st, st.err
	}
	if pe := t.pinFailed.Load(); pe != nil {
		return nil, pe
	}
	t.connectMu.Lock()
	defer t.connectMu.Unlock()
	if st := t.state.Load(); st != nil && st.gen == gen {
		return st, st.err
	}
	// A caller that waited for the lock behind a refused login must not
	// try the same PIN again, nor one behind a failed login before its
	// backoff is over.
	if pe := t.pinFailed.Load(); pe != nil {
		return nil, pe
	}
	if le := t.loginBackingOff(); le != nil {
		return nil, le
	}
	st := &tokenState{gen: gen}
	st.err = t.dial(st)
	if st.err != nil {
		if code, ok := ckrOf(st.err); ok && classify(code) == classModule {
			t.lib.fail(gen, st.err)
		}
		// A failed connection is not kept: the next call tries again (or
		// finds the library down).
		return nil, st.err
	}
	t.state.Store(st)
	return st, nil
}

func (t *token) dial(st *tokenState) error {
	ctx := t.lib.ctx
	slot, info, err := findSlot(ctx, t.ident)
	if err != nil {
		return err
	}
	st.slot, st.info = slot, info
	if li, err := ctx.GetInfo(); err == nil {
		st.info.library = fmt.Sprintf("%s %s %d.%d", strings.TrimSpace(li.ManufacturerID),
			strings.TrimSpace(li.LibraryDescription), li.LibraryVersion.Major, li.LibraryVersion.Minor)
	}
	sh, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return wrapCKR("open session", "", err)
	}
	if !t.noLogin {
		if err := t.login(sh); err != nil {
			_ = ctx.CloseSession(sh)
			return err
		}
	}
	st.anchor = sh
	return nil
}

// Login backoff: after a failed login that is neither a refused PIN nor a
// device failure (which the library's reconnection paces), the next C_Login
// waits loginBackoffMin, then twice as long after each failure, up to
// loginBackoffMax.
const (
	loginBackoffMin = time.Second
	loginBackoffMax = 5 * time.Minute
)

// login runs C_Login on sh; CKR_USER_ALREADY_LOGGED_IN is success. The
// caller holds connectMu.
//
// A PIN the token refuses (PKCS#11's PIN codes, and pin_refused_codes) is
// recorded in pinFailed, so that nothing tries it again (HSMs such as Luna
// lock the PIN, or zeroize the partition, after a few failed logins) until
// a configuration load asks for one more attempt, and it is logged at
// ERROR with what the operator must do: every call fails meanwhile, and
// this line is what says why. Any other failure backs off: until
// loginRetry, login answers the last failure without calling C_Login. An
// HSM that refuses a PIN with a code of its own is then tried at most once
// per backoff, not once per request.
func (t *token) login(sh pkcs11.SessionHandle) error {
	if le := t.loginBackingOff(); le != nil {
		return le
	}
	err := t.lib.ctx.Login(sh, pkcs11.CKU_USER, *t.pin.Load())
	if err == nil || isCKR(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		t.loginErr, t.loginBackoff = nil, 0
		return nil
	}
	t.loginFailures.Add(1)
	code, ok := ckrOf(err)
	switch {
	case ok && (classify(code) == classPIN || (*t.pinRefused.Load())[code]):
		pe := &Error{Kind: ErrUnavailable, Op: "login", CKR: ckrName(code),
			Err: fmt.Errorf("token %s: %w", t.ident, errPINRefused)}
		t.pinFailed.Store(pe)
		t.logger.Error("the token refused the PIN; the proxy will not try it again on its own, and the token is unavailable",
			zap.String("token", t.ident.String()), zap.String("ckr", pe.CKR), zap.String("action", pinRefusedAction))
		return pe
	case ok && classify(code) == classModule:
		// The library reconnects, with a backoff of its own.
		return &Error{Kind: ErrUnavailable, Op: "login", CKR: ckrName(code), Err: err}
	}
	t.loginBackoff = min(max(2*t.loginBackoff, loginBackoffMin), loginBackoffMax)
	t.loginRetry = time.Now().Add(t.loginBackoff)
	t.loginErr = &Error{Kind: ErrUnavailable, Op: "login", CKR: ckrNameOf(err),
		Err: fmt.Errorf("token %s: %w; no login is tried for %s", t.ident, err, t.loginBackoff)}
	t.logger.Error("logging in to the token failed; the next login waits",
		zap.String("token", t.ident.String()), zap.String("ckr", t.loginErr.CKR), zap.Duration("backoff", t.loginBackoff),
		zap.String("action", "if the HSM means by this code that it refused the PIN, name the code in the backend's pin_refused_codes, "+
			"so that a wrong PIN is never tried again on its own"))
	return t.loginErr
}

// loginBackingOff returns the last failed login's error while its backoff
// lasts, else nil. The caller holds connectMu.
func (t *token) loginBackingOff() *Error {
	if t.loginErr != nil && !t.noLogin && time.Now().Before(t.loginRetry) {
		return t.loginErr
	}
	return nil
}

// findSlot returns the one slot whose token matches id. Slots are never
// chosen by index: SoftHSM2 derives slot ids from serials and always lists
// an extra uninitialized token.
func findSlot(ctx *pkcs11.Ctx, id tokenIdent) (uint, tokenInfo, error) {
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return 0, tokenInfo{}, &Error{Kind: ErrUnavailable, Op: "find token", CKR: ckrNameOf(err), Err: err}
	}
	var found []uint
	var info tokenInfo
	for _, s := range slots {
		if id.slotID != nil && s != *id.slotID {
			continue
		}
		ti, err := ctx.GetTokenInfo(s)
		if err != nil {
			continue
		}
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			continue
		}
		if id.label != "" && strings.TrimSpace(ti.Label) != id.label {
			continue
		}
		if id.serial != "" && strings.TrimSpace(ti.SerialNumber) != id.serial {
			continue
		}
		found = append(found, s)
		info = tokenInfo{
			manufacturer:  strings.TrimSpace(ti.ManufacturerID),
			model:         strings.TrimSpace(ti.Model),
			serial:        strings.TrimSpace(ti.SerialNumber),
			firmware:      fmt.Sprintf("%d.%d", ti.FirmwareVersion.Major, ti.FirmwareVersion.Minor),
			maxRWSessions: ti.MaxRwSessionCount,
		}
	}
	switch len(found) {
	case 0:
		return 0, tokenInfo{}, &Error{Kind: ErrUnavailable, Op: "find token", Err: fmt.Errorf("no initialized token with %s", id)}
	case 1:
		return found[0], info, nil
	}
	return 0, tokenInfo{}, &Error{Kind: ErrUnavailable, Op: "find token", Err: fmt.Errorf("%d tokens match %s; add serial or slot_id", len(found), id)}
}

// relogin logs in again after the token reported USER_NOT_LOGGED_IN, unless
// the token refused the PIN before.
func (t *token) relogin(st *tokenState) error {
	if t.noLogin {
		return nil
	}
	t.connectMu.Lock()
	defer t.connectMu.Unlock()
	if pe := t.pinFailed.Load(); pe != nil {
		return pe
	}
	return t.login(st.anchor)
}

// Destruct closes the token's idle sessions and its anchor session when the
// last backend using it is gone. It never calls C_Logout or C_Finalize:
// another token or config may share the library. Calls abandoned after a
// timeout close their own sessions when they return.
func (t *token) Destruct() error {
	t.destroyed.Store(true)
	if !waitZero(&t.ops, closeWait) {
		t.logger.Warn("closing token with operations still in flight", zap.String("token", t.ident.String()))
	}
	t.lib.unregister(t)
	gen, ok := t.lib.acquire()
	if !ok {
		return nil
	}
	defer t.lib.release()
	for _, s := range t.pool.drain() {
		if s.gen == gen {
			_ = t.lib.ctx.CloseSession(s.h)
		}
	}
	if st := t.state.Load(); st != nil && st.gen == gen && st.err == nil {
		_ = t.lib.ctx.CloseSession(st.anchor)
	}
	t.logger.Info("token closed", zap.String("token", t.ident.String()))
	return nil
}

// sinceRecovery reports how long ago the library last reconnected.
func (t *token) sinceRecovery() time.Duration {
	_, _, at := t.lib.status()
	if at.IsZero() {
		return time.Duration(1<<63 - 1)
	}
	return time.Since(at)
}

var _ caddy.Destructor = (*token)(nil)

// clearKeys forgets every cached key handle, after the token said one is
// stale.
func (t *token) clearKeys() {
	t.keys.clear()
	t.wrapKeys.clear()
}

// retryLogin is a configuration load's one attempt to log in to a token
// whose PIN was refused, or whose last login failed and waits its backoff:
// the operator fixed the PIN (in the config, or on the HSM) or the HSM, and
// reloaded. An unchanged config counts too, through `caddy reload --force`;
// a plain reload of an unchanged config is a no-op in Caddy and never
// reaches here. The load's PIN replaces the refused one. Nothing else tries
// a refused PIN again, or a failed login before its backoff is over, so
// each load is one deliberate login (a failure backs off further). It
// reports whether there was such a login to try; the load's self-test then
// fails if this login did.
func (t *token) retryLogin(logger *zap.Logger, backend, pin string) bool {
	t.connectMu.Lock()
	refused := t.pinFailed.Load() != nil
	if (!refused && t.loginBackingOff() == nil) || t.noLogin {
		t.connectMu.Unlock()
		return false
	}
	changed := pin != *t.pin.Load()
	t.pin.Store(&pin)
	t.pinFailed.Store(nil)
	t.loginRetry = time.Time{}
	t.connectMu.Unlock()
	why := "the token refused its PIN earlier"
	if !refused {
		why = "the token's last login failed and waits its backoff"
	}
	logger.Warn(why+"; this configuration load tries to log in once",
		zap.String("backend", backend), zap.String("token", t.ident.String()), zap.Bool("pin_changed", changed))
	gen, ok := t.lib.acquire()
	if !ok {
		// The library is reconnecting: the reconnection logs in, once.
		return true
	}
	defer t.lib.release()
	var err error
	if st := t.state.Load(); st != nil && st.gen == gen && st.err == nil {
		// Connected in this generation, but logged out since (the token
		// answered USER_NOT_LOGGED_IN).
		err = t.relogin(st)
	} else {
		_, err = t.connect(gen)
	}
	switch {
	case err == nil:
		logger.Info("token logged in; it serves again", zap.String("backend", backend), zap.String("token", t.ident.String()))
	case !errors.Is(err, errPINRefused):
		// A refusal was logged by login.
		logger.Error("logging in to the token failed", zap.String("backend", backend), zap.String("token", t.ident.String()), zap.Error(err))
	}
	return true
}

// warnUnappliedSettings tells a backend sharing this open token which of its
// settings cannot take effect: the login and the session pool belong to the
// token, which keeps the settings it was opened with until no config uses it
// any more (or the process restarts).
func (t *token) warnUnappliedSettings(logger *zap.Logger, backend string, cfg *Config) {
	var ignored []string
	if cfg.PIN != *t.pin.Load() {
		ignored = append(ignored, "pin")
	}
	if cfg.NoLogin != t.noLogin {
		ignored = append(ignored, "no_login")
	}
	if cfg.MaxSessions != t.maxSessions {
		ignored = append(ignored, "max_sessions")
	}
	if len(ignored) > 0 {
		logger.Warn("the token is already open with other settings, which it keeps until no configuration uses it or the process restarts",
			zap.String("backend", backend), zap.String("token", t.ident.String()), zap.Strings("settings_not_applied", ignored))
	}
}
