package hsm

// #include <stdlib.h>
import "C"

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"github.com/miekg/pkcs11"
	"go.uber.org/zap"
)

// Re-initialization backoff. A C_Finalize kills every session of every token
// on the library, so re-initializing more often than this only makes an
// outage worse. Tests shorten them.
var (
	reinitBackoffMin = time.Second
	reinitBackoffMax = 30 * time.Second
	// reinitLockWait bounds how long a re-initialization waits for calls
	// still inside the library; a call stuck forever must not stop the others
	// from recovering for good, only this attempt.
	reinitLockWait = 5 * time.Second
)

// library is one PKCS#11 module loaded into the process. There is exactly one
// per module path for the life of the process: every pkcs11.New of the same
// path shares the module's state, and finalizing one would kill them all.
type library struct {
	path   string
	ctx    *pkcs11.Ctx
	fns    functionList
	logger *zap.Logger
	// initArgs is what C_Initialize passes in CK_C_INITIALIZE_ARGS.pReserved
	// (nil when none): the library is initialized again with it after a
	// device error. It lives as long as the process.
	initArgs   unsafe.Pointer
	initString string

	// lifecycle is held for reading by every PKCS#11 call and for writing by
	// C_Finalize/C_Initialize.
	lifecycle sync.RWMutex
	// gen counts initializations; sessions, handles and token state carry
	// the generation they belong to and are dropped when it changes.
	gen atomic.Uint64
	// down is set from the first module-class error until a
	// re-initialization succeeded; calls fail fast meanwhile.
	down atomic.Bool
	// events counts module-class errors and reconnections. A health result
	// cached before the latest one no longer describes the token.
	events atomic.Uint64

	mu            sync.Mutex
	tokens        map[*token]struct{}
	reinitRunning bool
	backoff       time.Duration
	lastReinit    time.Time
	downReason    string
	recoveredAt   time.Time
}

var libraries = struct {
	sync.Mutex
	m map[string]*library
}{m: make(map[string]*library)}

var finalizeAtExit sync.Once

// afterModuleCheck runs between the check of a module's path and its load,
// with the path about to be loaded. It does nothing; a test replaces the
// module's symlink there, as someone racing the check could.
var afterModuleCheck = func(string) {}

// loadLibrary returns the process-wide library for path, loading and
// initializing it on first use. env is set in the process environment before
// the first load, because vendor libraries read it in C_Initialize; initArgs,
// when not empty, is the string C_Initialize passes the library in pReserved
// (NSS softokn reads its configuration there).
func loadLibrary(path string, env map[string]string, initArgs string, logger *zap.Logger) (*library, error) {
	libraries.Lock()
	defer libraries.Unlock()
	if lib, ok := libraries.m[path]; ok {
		for k, v := range env {
			if os.Getenv(k) != v {
				logger.Warn("pkcs11 module already loaded; environment change needs a restart",
					zap.String("module", path), zap.String("variable", k))
			}
		}
		if initArgs != lib.initString {
			logger.Warn("pkcs11 module already loaded with other init_args; the change needs a restart",
				zap.String("module", path))
		}
		return lib, nil
	}
	// Before dlopen, which runs the library's constructors; dlopen then
	// opens the file checked, symlinks resolved.
	resolved, err := checkModulePath(path)
	if err != nil {
		return nil, err
	}
	afterModuleCheck(resolved)
	for k, v := range env {
		if err := os.Setenv(k, v); err != nil {
			return nil, fmt.Errorf("setting %s for pkcs11 module: %w", k, err)
		}
	}
	ctx := pkcs11.New(resolved)
	if ctx == nil {
		return nil, fmt.Errorf("loading pkcs11 module %q: not a PKCS#11 library (dlopen or C_GetFunctionList failed)", path)
	}
	lib := &library{
		path:       path,
		ctx:        ctx,
		logger:     logger.Named("pkcs11").With(zap.String("module", path)),
		tokens:     make(map[*token]struct{}),
		backoff:    reinitBackoffMin,
		initString: initArgs,
	}
	if initArgs != "" {
		lib.initArgs = unsafe.Pointer(C.CString(initArgs)) // never freed: see initArgs
	}
	if err := lib.initialize(); err != nil && !isCKR(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		ctx.Destroy()
		return nil, fmt.Errorf("initializing pkcs11 module %q: %w", path, err)
	}
	fns, err := loadFunctionList(resolved)
	if err != nil {
		return nil, err
	}
	lib.fns = fns
	lib.gen.Store(1)
	libraries.m[path] = lib
	finalizeAtExit.Do(func() { caddy.OnExit(finalizeLibraries) })
	return lib, nil
}

// finalizeLibraries calls C_Finalize on every library at process exit. A
// library with a call still stuck in it is left alone: finalizing under a
// running call is undefined behaviour.
func finalizeLibraries(context.Context) {
	libraries.Lock()
	defer libraries.Unlock()
	for _, lib := range libraries.m {
		if lib.tryLockFor(time.Second) {
			_ = lib.ctx.Finalize()
			lib.lifecycle.Unlock()
		}
	}
}

// acquire takes the lifecycle read lock for one PKCS#11 call sequence and
// returns the current generation. It fails fast while the library is down.
func (l *library) acquire() (uint64, bool) {
	if l.down.Load() {
		return 0, false
	}
	l.lifecycle.RLock()
	if l.down.Load() {
		l.lifecycle.RUnlock()
		return 0, false
	}
	return l.gen.Load(), true
}

func (l *library) release() { l.lifecycle.RUnlock() }

// initialize runs C_Initialize with the library's init args.
func (l *library) initialize() error {
	if l.initArgs == nil {
		return l.ctx.Initialize()
	}
	return l.ctx.Initialize(pkcs11.InitializeWithReserved(l.initArgs))
}

// tryLockFor takes the write lock without queueing behind (and so blocking)
// new readers: a pending Lock would make every new RLock wait for calls that
// may be stuck in the HSM.
func (l *library) tryLockFor(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for !l.lifecycle.TryLock() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

func (l *library) register(t *token) {
	l.mu.Lock()
	l.tokens[t] = struct{}{}
	l.mu.Unlock()
}

func (l *library) unregister(t *token) {
	l.mu.Lock()
	delete(l.tokens, t)
	l.mu.Unlock()
}

// status reports whether the library is down, why, and when it last
// recovered.
func (l *library) status() (down bool, reason string, recoveredAt time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.down.Load(), l.downReason, l.recoveredAt
}

// fail records a module-class error seen in generation gen and starts a
// re-initialization unless one is already pending. Errors from an older
// generation are ignored: that generation is gone already.
func (l *library) fail(gen uint64, cause error) {
	l.events.Add(1)
	if gen != l.gen.Load() {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.reinitRunning {
		return
	}
	l.reinitRunning = true
	l.downReason = cause.Error()
	l.down.Store(true)
	l.logger.Error("pkcs11 module failed; reconnecting", zap.Error(cause))
	go l.reinitLoop()
}

// reinitLoop re-initializes the library until it and every token on it work
// again, at most once per backoff interval (a circuit breaker): between
// attempts every call fails fast with ErrUnavailable.
func (l *library) reinitLoop() {
	for {
		l.mu.Lock()
		wait := time.Until(l.lastReinit.Add(l.backoff))
		l.mu.Unlock()
		if wait > 0 {
			time.Sleep(wait)
		}
		refused, err := l.reinit()
		l.mu.Lock()
		l.lastReinit = time.Now()
		if err == nil {
			l.backoff = reinitBackoffMin
			l.reinitRunning = false
			l.downReason = ""
			l.recoveredAt = time.Now()
			l.events.Add(1)
			l.down.Store(false)
			l.mu.Unlock()
			if refused > 0 {
				l.logger.Warn("pkcs11 module reconnected, but a token refused its PIN and stays unavailable",
					zap.Uint64("generation", l.gen.Load()), zap.Int("tokens_refusing_pin", refused))
				return
			}
			l.logger.Info("pkcs11 module reconnected", zap.Uint64("generation", l.gen.Load()))
			return
		}
		l.downReason = err.Error()
		l.backoff = min(2*l.backoff, reinitBackoffMax)
		next := l.backoff
		l.mu.Unlock()
		l.logger.Error("reconnecting pkcs11 module failed", zap.Error(err), zap.Duration("retry_in", next))
	}
}

// reinit runs C_Finalize and C_Initialize under the write lock, then
// reconnects every token still using the library. It returns how many
// tokens refused their PIN: those stay unusable, since retrying would lock
// the PIN, but the library itself works again.
func (l *library) reinit() (refused int, err error) {
	if !l.tryLockFor(reinitLockWait) {
		return 0, errors.New("calls still stuck in the pkcs11 module")
	}
	_ = l.ctx.Finalize()
	err = l.initialize()
	if err != nil && !isCKR(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		l.lifecycle.Unlock()
		return 0, fmt.Errorf("C_Initialize: %w", err)
	}
	gen := l.gen.Add(1)
	l.lifecycle.Unlock()

	l.mu.Lock()
	tokens := make([]*token, 0, len(l.tokens))
	for t := range l.tokens {
		tokens = append(tokens, t)
	}
	l.mu.Unlock()
	l.lifecycle.RLock()
	defer l.lifecycle.RUnlock()
	if l.gen.Load() != gen {
		return 0, errors.New("pkcs11 module re-initialized concurrently")
	}
	for _, t := range tokens {
		t.pool.drain()
		if _, err := t.connect(gen); err != nil {
			if errors.Is(err, errPINRefused) {
				refused++
				continue
			}
			return refused, fmt.Errorf("reconnecting token %s: %w", t.ident, err)
		}
	}
	return refused, nil
}
