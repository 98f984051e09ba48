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

// errPINRefused marks a login failure caused by the PIN. It is never retried.
var errPINRefused = errors.New("pin refused by token")

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
	connectMu sync.Mutex
	pinFailed atomic.Pointer[Error]

	pool *sessionPool
	// ops counts operations in flight on the token through any backend;
	// destroyed is set when the last backend released it.
	ops       atomic.Int64
	destroyed atomic.Bool
	keys      keyCache
	ivs       *ivRegistry
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
	lib, err := loadLibrary(cfg.Module, cfg.Env, logger)
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
		// One read-write session is the anchor.
		if int(max-1) < size {
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
	st := &tokenState{gen: gen}
	st.err = t.dial(st)
	if st.err != nil {
		var he *Error
		if errors.As(st.err, &he) && errors.Is(he.Err, errPINRefused) {
			t.pinFailed.Store(he)
		}
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
		return &Error{Kind: kindOf(codeOr(err)), Op: "open session", CKR: ckrNameOf(err), Err: err}
	}
	if !t.noLogin {
		err := ctx.Login(sh, pkcs11.CKU_USER, *t.pin.Load())
		if err != nil && !isCKR(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
			_ = ctx.CloseSession(sh)
			if code, ok := ckrOf(err); ok && classify(code) == classPIN {
				// Never retried: a real HSM locks the PIN after a few tries.
				return &Error{Kind: ErrUnavailable, Op: "login", CKR: ckrName(code),
					Err: fmt.Errorf("token %s: %w", t.ident, errPINRefused)}
			}
			return &Error{Kind: ErrUnavailable, Op: "login", CKR: ckrNameOf(err), Err: err}
		}
	}
	st.anchor = sh
	return nil
}

func codeOr(err error) uint {
	c, _ := ckrOf(err)
	return c
}

func ckrNameOf(err error) string {
	if c, ok := ckrOf(err); ok {
		return ckrName(c)
	}
	return ""
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

// relogin logs in again after the token reported USER_NOT_LOGGED_IN.
func (t *token) relogin(st *tokenState) error {
	if t.noLogin {
		return nil
	}
	err := t.lib.ctx.Login(st.anchor, pkcs11.CKU_USER, *t.pin.Load())
	if err != nil && !isCKR(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		return err
	}
	return nil
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

// adoptPIN takes the PIN of a newly loaded config when the token refused
// the one it had: an operator who changed the PIN on the HSM fixes the config
// and reloads, and the token logs in again with the new PIN, once, without
// a restart. A PIN that was not refused is never replaced, and a refused one
// is never retried (real HSMs lock it).
func (t *token) adoptPIN(logger *zap.Logger, backend, pin string) bool {
	t.connectMu.Lock()
	defer t.connectMu.Unlock()
	if t.pinFailed.Load() == nil || t.noLogin || pin == *t.pin.Load() {
		return false
	}
	t.pin.Store(&pin)
	t.pinFailed.Store(nil)
	logger.Info("the token refused its PIN; trying the PIN of the new configuration",
		zap.String("backend", backend), zap.String("token", t.ident.String()))
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
