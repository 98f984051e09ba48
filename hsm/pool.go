package hsm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
	"go.uber.org/zap"
)

// session is a pooled PKCS#11 session and the library generation it was
// opened in. A session of an older generation is dead (the library was
// re-initialized) and its handle may already name someone else's session, so
// it is dropped without C_CloseSession.
type session struct {
	h   pkcs11.SessionHandle
	gen uint64
}

// sessionPool hands out one session per in-flight operation. Its slots are a
// semaphore: a slot is held from before the session is taken until the
// PKCS#11 call returns, even after the caller gave up on it, so the slots
// also cap the threads that can be stuck inside the HSM.
type sessionPool struct {
	size  int
	slots chan struct{}

	mu   sync.Mutex
	idle []session

	inUse, waiters, stuck atomic.Int32
}

func newSessionPool(size int) *sessionPool {
	return &sessionPool{size: size, slots: make(chan struct{}, size)}
}

// acquire takes a slot, waiting at most wait.
func (p *sessionPool) acquire(ctx context.Context, wait time.Duration) error {
	select {
	case p.slots <- struct{}{}:
		p.inUse.Add(1)
		return nil
	default:
	}
	p.waiters.Add(1)
	defer p.waiters.Add(-1)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case p.slots <- struct{}{}:
		p.inUse.Add(1)
		return nil
	case <-timer.C:
		return ErrBusy
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (p *sessionPool) releaseSlot() {
	p.inUse.Add(-1)
	<-p.slots
}

// get pops an idle session of generation gen, dropping older ones.
func (p *sessionPool) get(gen uint64) (session, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for n := len(p.idle); n > 0; n = len(p.idle) {
		s := p.idle[n-1]
		p.idle = p.idle[:n-1]
		if s.gen == gen {
			return s, true
		}
	}
	return session{}, false
}

func (p *sessionPool) put(s session) {
	p.mu.Lock()
	p.idle = append(p.idle, s)
	p.mu.Unlock()
}

// drain empties the idle stack and returns what it held.
func (p *sessionPool) drain() []session {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.idle
	p.idle = nil
	return s
}

func (p *sessionPool) idleCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// callSession is what an operation's body works with: one session, used by
// this operation alone (SoftHSM2 crashes the process when two threads share
// a session).
type callSession struct {
	// b is the backend the operation runs for: backends sharing a token
	// share its sessions and key cache, not their policies (such as
	// allow_exportable_keys).
	b   *Backend
	t   *token
	ctx *pkcs11.Ctx
	st  *tokenState
	gen uint64
	h   pkcs11.SessionHandle
	// discard is set when the session must not go back to the pool even
	// though the operation succeeded: it holds an object that could not be
	// destroyed.
	discard bool
}

const (
	callRunning int32 = iota
	callFinished
	callAbandoned
)

// call connects a caller and the worker goroutine making the PKCS#11 calls;
// whichever moves state away from callRunning first decides whether the
// result is delivered or the work is abandoned.
type call struct {
	state atomic.Int32
	done  chan error
}

var errTokenClosed = errors.New("token closed: no configuration uses it")

// run executes body on a pooled session in a worker goroutine, and returns
// when it finished or the deadline passed, whichever is first. A PKCS#11
// call cannot be cancelled: a call past its deadline is abandoned, and its
// worker closes the session when the call finally returns.
func (b *Backend) run(ctx context.Context, op, key string, timeout time.Duration, body func(*callSession) error) error {
	if !b.enter() {
		return &Error{Kind: ErrUnavailable, Op: op, Key: key, Err: errTokenClosed}
	}
	defer b.leave()
	t := b.tok
	if pe := t.pinFailed.Load(); pe != nil {
		return &Error{Kind: ErrUnavailable, Op: op, Key: key, CKR: pe.CKR, Err: pe.Err}
	}
	if t.lib.down.Load() {
		_, reason, _ := t.lib.status()
		return &Error{Kind: ErrUnavailable, Op: op, Key: key, Err: fmt.Errorf("pkcs11 module is reconnecting: %s", reason)}
	}
	if err := t.pool.acquire(ctx, b.sessionWait); err != nil {
		if errors.Is(err, ErrBusy) {
			return &Error{Kind: ErrBusy, Op: op, Key: key, Err: fmt.Errorf("no session free within %s", b.sessionWait)}
		}
		return &Error{Kind: ErrTimeout, Op: op, Key: key, Err: err}
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	c := &call{done: make(chan error, 1)}
	go b.work(c, op, key, body)

	timer := time.NewTimer(time.Until(deadline))
	select {
	case err := <-c.done:
		timer.Stop()
		return err
	case <-timer.C:
	case <-ctx.Done():
		timer.Stop()
	}
	t.pool.stuck.Add(1)
	if c.state.CompareAndSwap(callRunning, callAbandoned) {
		return &Error{Kind: ErrTimeout, Op: op, Key: key, Err: fmt.Errorf("no answer from the hsm within %s", timeout)}
	}
	t.pool.stuck.Add(-1)
	return <-c.done
}

// work is the worker side of run. It holds the library's lifecycle read
// lock for the whole call sequence, so no re-initialization can finalize the
// library under it.
func (b *Backend) work(c *call, op, key string, body func(*callSession) error) {
	t := b.tok
	defer t.pool.releaseSlot()
	gen, ok := t.lib.acquire()
	if !ok {
		_, reason, _ := t.lib.status()
		b.deliver(c, &Error{Kind: ErrUnavailable, Op: op, Key: key, Err: fmt.Errorf("pkcs11 module is reconnecting: %s", reason)})
		return
	}
	defer t.lib.release()
	s, err := b.attempt(c, gen, op, key, body)
	if b.deliver(c, err) {
		if s != nil {
			t.pool.put(*s)
		}
		return
	}
	t.pool.stuck.Add(-1)
	if s != nil {
		_ = t.lib.ctx.CloseSession(s.h)
	}
	b.logger.Warn("abandoned pkcs11 call returned; session closed",
		zap.String("op", op), zap.String("key", key), zap.Error(err))
}

// deliver hands err to the caller unless the caller abandoned the call.
func (b *Backend) deliver(c *call, err error) bool {
	if c.state.CompareAndSwap(callRunning, callFinished) {
		c.done <- err
		return true
	}
	return false
}

// attempt runs body, retrying once on a fresh session after a session-class
// error. It returns the session to put back into the pool, if it is fit for
// reuse.
func (b *Backend) attempt(c *call, gen uint64, op, key string, body func(*callSession) error) (*session, error) {
	t := b.tok
	ctx := t.lib.ctx
	st, err := t.connect(gen)
	if err != nil {
		return nil, withOp(err, op, key)
	}
	for try := 0; ; try++ {
		s, ok := t.pool.get(gen)
		if !ok {
			h, err := ctx.OpenSession(st.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
			if err != nil {
				if code, ok := ckrOf(err); ok && classify(code) == classModule {
					t.pool.drain()
					t.lib.fail(gen, err)
				}
				return nil, wrapCKR(op, key, err)
			}
			s = session{h: h, gen: gen}
		}
		cs := &callSession{b: b, t: t, ctx: ctx, st: st, gen: gen, h: s.h}
		err := body(cs)
		// reusable is the session to put back, nil when it holds an object
		// that could not be destroyed, which is closed with it.
		reusable := &s
		if cs.discard {
			_ = ctx.CloseSession(s.h)
			reusable = nil
		}
		if err == nil {
			return reusable, nil
		}
		if final, ok := errors.AsType[*Error](err); ok {
			if final.CKR != "" && reusable != nil {
				// The session saw an error in the middle of an operation;
				// not every vendor ends the operation, so it is not reused.
				_ = ctx.CloseSession(s.h)
				reusable = nil
			}
			return reusable, final
		}
		code, ok := ckrOf(err)
		if !ok {
			return reusable, &Error{Kind: ErrInternal, Op: op, Key: key, Err: err}
		}
		if reusable != nil {
			_ = ctx.CloseSession(s.h)
		}
		retry := try == 0 && c.state.Load() == callRunning
		switch classify(code) {
		case classModule:
			t.pool.drain()
			t.lib.fail(gen, err)
			return nil, wrapCKR(op, key, err)
		case classHandle:
			t.clearKeys()
		case classLogin:
			if lerr := t.relogin(st); lerr != nil {
				return nil, withOp(lerr, op, key)
			}
		case classSession:
		default:
			retry = false
		}
		if !retry {
			return nil, wrapCKR(op, key, err)
		}
		b.logger.Debug("retrying on a new session", zap.String("op", op), zap.String("ckr", ckrName(code)))
	}
}

// withOp names op and key in an *Error produced outside of them.
func withOp(err error, op, key string) error {
	if e, ok := errors.AsType[*Error](err); ok {
		c := *e
		c.Op, c.Key = op, key
		return &c
	}
	return &Error{Kind: ErrInternal, Op: op, Key: key, Err: err}
}
