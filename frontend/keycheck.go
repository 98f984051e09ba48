package frontend

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// The key check proves what a key store's backends hold under its key
// labels, at provision and again from the health check:
//
//   - On each backend, a label names exactly one key. A second key given a
//     label in use (by another process, a key ceremony tool) makes every
//     call with it fail; the check logs it and the backend's health is
//     DEGRADED, so that it is noticed without a restart.
//   - With several backends, every backend holds the same key under each
//     label. Calls fall over to the next backend when one is unavailable,
//     so a backend holding another key would answer with results that the
//     others cannot undo (a ciphertext they cannot decrypt, a wrapped key
//     they cannot unwrap). The proof is the front end's (Keys.Same): a
//     result of one backend that another undoes. A key store whose backends
//     differ, or where a key is on some backends and not others, is a
//     configuration error at provision; found later, it makes the backend
//     DEGRADED, and calls with that key never fall over to it.
//
// A backend that cannot answer (unavailable, busy, slow) proves nothing
// either way: it is logged and left to the next check, never refused.

// KeyCheckTimeout bounds one whole check.
const KeyCheckTimeout = time.Minute

// KeyState is what one backend holds under one label.
type KeyState struct {
	// Provable says the key is one the identity proof works with (for XKS,
	// an AES-256 key); only such keys are compared across backends.
	Provable bool
	// Err is nil when the backend holds exactly one usable key under the
	// label; otherwise the hsm error that says why not.
	Err error
}

// Exists reports whether the backend holds a key under the label, usable
// or not.
func (s KeyState) Exists() bool {
	return s.Err == nil || errors.Is(s.Err, hsm.ErrDuplicateKey) || errors.Is(s.Err, hsm.ErrKeyExportable) ||
		errors.Is(s.Err, hsm.ErrKeyUsage) || errors.Is(s.Err, hsm.ErrUnsupportedAlgorithm)
}

func (s KeyState) missing() bool { return errors.Is(s.Err, hsm.ErrKeyNotFound) }

// Listed is one key a backend lists, for a key store that allows every key.
type Listed struct {
	Label string
	State KeyState
}

// Keys is a front end's kind of key, as the key check sees it.
type Keys interface {
	// State looks label up on b afresh, even if it was found missing a
	// moment ago.
	State(ctx context.Context, b *hsm.Backend, label string) KeyState
	// List returns every key of the kind on b, one entry per key (two keys
	// with one label are two entries).
	List(ctx context.Context, b *hsm.Backend) ([]Listed, error)
	// Same proves whether a and b hold the same key under label, which
	// both hold as a provable key. An error means neither way could be
	// tried.
	Same(ctx context.Context, label string, a, b *hsm.Backend) (bool, error)
}

// KeyReport is the outcome of one key check.
type KeyReport struct {
	at time.Time
	// problems holds, per backend (in the key store's order), what makes
	// its health DEGRADED.
	problems [][]string
	// differs[label][i] is true when backend i holds another key under the
	// label than the backend it was compared with: calls never fall over
	// to it.
	differs map[string][]bool
	// mismatches are the problems that make a configuration fail to load.
	mismatches []string
	// refusals are the front end's own problems (Extra) that make a
	// configuration fail to load, said without the hint of mismatches.
	refusals []string
	// unproven says what the check could not find out (a backend that did
	// not answer, a key no backend may both encrypt and decrypt with).
	unproven []string
	// silent[i] is true when backend i did not answer the check: it keeps
	// what the previous check found.
	silent []bool
}

// KeyCheck is a key store's HSM backends, in the order calls try them
// (WithBackend), and the key check that proves they hold the same keys: it
// runs checks one at a time and holds the last report. Configure it, then
// call Run once at provision.
type KeyCheck struct {
	// Store names the key store in logs and errors.
	Store    string
	Backends []*hsm.Backend
	Keys     Keys
	// Differ says what a backend holding another key than the others
	// breaks, after "backends a and b hold different keys labelled ...: ",
	// e.g. "a ciphertext made by one does not decrypt on the other".
	Differ string
	// Labels returns the labels to check; nil checks every key the
	// backends list (a key store of "*").
	Labels func() []string
	// Extra, when set, adds the front end's own findings to a report from
	// what each backend holds under each label.
	Extra  func(r *KeyReport, states map[string][]KeyState)
	Logger *zap.Logger

	current atomic.Pointer[KeyReport] // read by the request path

	mu      sync.Mutex
	running chan struct{} // nil when no check runs
}

// differing reports, per backend, whether calls with label must not use it.
func (c *KeyCheck) differing(label string) []bool {
	if r := c.current.Load(); r != nil {
		return r.differs[label]
	}
	return nil
}

// Current returns the last report, nil before the first.
func (c *KeyCheck) Current() *KeyReport { return c.current.Load() }

// Run runs a key check, keeps its report and returns it.
func (c *KeyCheck) Run(ctx context.Context) *KeyReport {
	r := c.check(ctx)
	c.current.Store(r)
	return r
}

// check runs the key check and logs what changed since the previous
// report. A backend that does not answer keeps what the previous check
// found. A backend found holding another key stays so until it is proven
// to hold the same key as a backend that was not found so: one whose
// partner does not answer now, or that only agrees with another backend so
// found, is not cleared by that.
func (c *KeyCheck) check(ctx context.Context) *KeyReport {
	prev := c.current.Load()
	n := len(c.Backends)
	r := &KeyReport{problems: make([][]string, n), differs: make(map[string][]bool), silent: make([]bool, n)}
	labels, states := c.keyStates(ctx, r)
	same := make(map[string][][2]int, len(labels))
	for _, label := range labels {
		same[label] = c.compareKey(ctx, r, label, states[label])
	}
	if c.Extra != nil {
		c.Extra(r, states)
	}
	if prev != nil {
		for i := range n {
			if r.silent[i] {
				r.problems[i] = slices.Clone(prev.problems[i])
			}
		}
		for label, was := range prev.differs {
			for i, differed := range was {
				switch {
				case !differed || r.Differing(label, i):
				case r.silent[i]:
					r.markDiffering(label, i, n, "") // its reason came with its problems
				case !provenSame(same[label], was, i):
					r.markDiffering(label, i, n, prev.differingProblem(label, i))
				}
			}
		}
	}
	r.at = time.Now()
	c.logChanges(prev, r)
	return r
}

// provenSame reports whether a proof of this check (a pair of backends
// found to hold the same key) puts backend i beside one that flagged does
// not mark.
func provenSame(pairs [][2]int, flagged []bool, i int) bool {
	for _, p := range pairs {
		other := -1
		switch i {
		case p[0]:
			other = p[1]
		case p[1]:
			other = p[0]
		}
		if other >= 0 && (other >= len(flagged) || !flagged[other]) {
			return true
		}
	}
	return false
}

// Differing reports whether the check found backend i holding another key
// under label than the others: calls with it never fall over to i.
func (r *KeyReport) Differing(label string, i int) bool {
	return i < len(r.differs[label]) && r.differs[label][i]
}

// Silent reports whether backend i did not answer the check: it keeps what
// the previous check found.
func (r *KeyReport) Silent(i int) bool { return r.silent[i] }

// markDiffering records that backend i holds another key under label,
// with problem as its reason ("" when its problems already say so).
func (r *KeyReport) markDiffering(label string, i, n int, problem string) {
	if r.differs[label] == nil {
		r.differs[label] = make([]bool, n)
	}
	r.differs[label][i] = true
	if problem != "" {
		r.problems[i] = append(r.problems[i], problem)
	}
}

// differingProblem is the problem r gave for backend i holding another key
// under label.
func (r *KeyReport) differingProblem(label string, i int) string {
	mark := fmt.Sprintf("different keys labelled %q", label)
	for _, p := range r.problems[i] {
		if strings.Contains(p, mark) {
			return p
		}
	}
	return "this backend holds " + mark + " from the backend it was compared with"
}

// Answered reports whether any backend answered the check.
func (r *KeyReport) Answered() bool { return slices.Contains(r.silent, false) }

// Refuse records a problem of the front end's own that makes the
// configuration fail to load and makes every backend that answered the
// check DEGRADED.
func (r *KeyReport) Refuse(problem string) {
	r.refusals = append(r.refusals, problem)
	for i := range r.problems {
		if !r.silent[i] {
			r.problems[i] = append(r.problems[i], problem)
		}
	}
}

// down reports whether err says the backend cannot answer now, so that
// the check asks it nothing more this time.
func down(err error) bool {
	return errors.Is(err, hsm.ErrUnavailable) || errors.Is(err, hsm.ErrTimeout) || errors.Is(err, hsm.ErrBusy)
}

// keyStates finds what each backend holds under each label of the key
// store: by a fresh lookup of each label (which also revalidates the
// backend's cached handle), or for "*" from the list of the token's keys.
func (c *KeyCheck) keyStates(ctx context.Context, r *KeyReport) ([]string, map[string][]KeyState) {
	states := make(map[string][]KeyState)
	if c.Labels != nil {
		labels := slices.Sorted(slices.Values(c.Labels()))
		labels = slices.Compact(labels)
		failed := make([]error, len(c.Backends))
		for _, label := range labels {
			s := make([]KeyState, len(c.Backends))
			for i, b := range c.Backends {
				if failed[i] != nil {
					s[i].Err = failed[i]
					continue
				}
				s[i] = c.Keys.State(ctx, b, label)
				if down(s[i].Err) {
					failed[i], r.silent[i] = s[i].Err, true
					r.unproven = append(r.unproven, fmt.Sprintf("backend %s did not answer the key check: %v", b.Name(), s[i].Err))
				}
			}
			states[label] = s
		}
		return labels, states
	}
	lists := make([][]Listed, len(c.Backends))
	errs := make([]error, len(c.Backends))
	labels := make(map[string]bool)
	for i, b := range c.Backends {
		if lists[i], errs[i] = c.Keys.List(ctx, b); errs[i] != nil {
			r.silent[i] = true
			r.unproven = append(r.unproven, fmt.Sprintf("could not list the keys of backend %s: %v", b.Name(), errs[i]))
		}
		for _, k := range lists[i] {
			labels[k.Label] = true
		}
	}
	for label := range labels {
		s := make([]KeyState, len(c.Backends))
		for i := range c.Backends {
			if errs[i] != nil {
				s[i].Err = errs[i]
				continue
			}
			var found []KeyState
			for _, k := range lists[i] {
				if k.Label == label {
					found = append(found, k.State)
				}
			}
			switch len(found) {
			case 0:
				s[i].Err = &hsm.Error{Kind: hsm.ErrKeyNotFound, Key: label}
			case 1:
				s[i] = found[0]
			default:
				s[i].Err = &hsm.Error{Kind: hsm.ErrDuplicateKey, Key: label}
			}
		}
		states[label] = s
	}
	return slices.Sorted(maps.Keys(labels)), states
}

// compareKey records in r what is wrong with label across the backends,
// and returns the pairs of backends it proved to hold the same key.
func (c *KeyCheck) compareKey(ctx context.Context, r *KeyReport, label string, s []KeyState) [][2]int {
	var pairs [][2]int
	holder := slices.IndexFunc(s, KeyState.Exists)
	for i, st := range s {
		switch {
		case errors.Is(st.Err, hsm.ErrDuplicateKey):
			r.problems[i] = append(r.problems[i], fmt.Sprintf("more than one key is labelled %q, so calls with it fail", label))
		case st.missing() && holder >= 0:
			msg := fmt.Sprintf("key %q is on backend %s but not on backend %s", label, c.Backends[holder].Name(), c.Backends[i].Name())
			r.problems[i] = append(r.problems[i], msg)
			r.mismatches = append(r.mismatches, msg)
		}
	}
	// The identity proof needs a provable key on each side.
	ref := -1
	for j, st := range s {
		if st.Err != nil || !st.Provable {
			continue
		}
		if ref < 0 {
			ref = j
			continue
		}
		same, err := c.Keys.Same(ctx, label, c.Backends[ref], c.Backends[j])
		switch {
		case err != nil:
			r.unproven = append(r.unproven, fmt.Sprintf("could not prove that backends %s and %s hold the same key labelled %q: %v",
				c.Backends[ref].Name(), c.Backends[j].Name(), label, err))
		case !same:
			msg := fmt.Sprintf("backends %s and %s hold different keys labelled %q: %s",
				c.Backends[ref].Name(), c.Backends[j].Name(), label, c.Differ)
			r.mismatches = append(r.mismatches, msg)
			r.markDiffering(label, j, len(s), msg)
		default:
			pairs = append(pairs, [2]int{ref, j})
		}
	}
	return pairs
}

// logChanges logs the problems of r that prev did not have, and those of
// prev that are gone, so that a problem lasting across checks is logged
// once; and likewise what r could not prove.
func (c *KeyCheck) logChanges(prev, r *KeyReport) {
	for _, u := range r.unproven {
		if prev == nil || !slices.Contains(prev.unproven, u) {
			c.Logger.Warn("key check: "+u+"; the next health check tries again", zap.String("key_store", c.Store))
		}
	}
	for i, b := range c.Backends {
		var before []string
		if prev != nil {
			before = prev.problems[i]
		}
		for _, p := range r.problems[i] {
			if !slices.Contains(before, p) {
				c.Logger.Error("key check: "+p, zap.String("key_store", c.Store), zap.String("backend", b.Name()))
			}
		}
		for _, p := range before {
			if !slices.Contains(r.problems[i], p) {
				c.Logger.Info("key check: resolved: "+p, zap.String("key_store", c.Store), zap.String("backend", b.Name()))
			}
		}
	}
}

// BackendProblems returns what the report found wrong with backend i.
func (r *KeyReport) BackendProblems(i int) []string {
	if r == nil || i >= len(r.problems) {
		return nil
	}
	return r.problems[i]
}

// Err is the configuration error of a key store whose backends do not hold
// the same keys, or whose front end refused something, or nil.
func (r *KeyReport) Err(store string) error {
	if len(r.refusals) > 0 {
		return fmt.Errorf("key store %s: %s", store, strings.Join(r.refusals, "; "))
	}
	if len(r.mismatches) == 0 {
		return nil
	}
	return fmt.Errorf("key store %s: %s; list several backends in one key store only if they hold the same key material (for example the modules of one nShield Security World)",
		store, strings.Join(r.mismatches, "; "))
}

// Latest returns the last key report, running a new check when the last
// one is older than ttl. Like a backend's health, it answers with the last
// report while the new check runs, unless that is older than a minute:
// then it waits for the new one until ctx is done.
func (c *KeyCheck) Latest(ctx context.Context, ttl time.Duration) *KeyReport {
	last := c.current.Load()
	if last != nil && time.Since(last.at) < ttl {
		return last
	}
	c.mu.Lock()
	running := c.running
	if running == nil {
		running = make(chan struct{})
		c.running = running
		// The check outlives the request that starts it.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), KeyCheckTimeout)
		go func() {
			defer cancel()
			c.current.Store(c.check(cctx))
			c.mu.Lock()
			c.running = nil
			c.mu.Unlock()
			close(running)
		}()
	}
	c.mu.Unlock()
	// Past XKS's age for a cached health result (the stricter front end's),
	// a health call waits (within its deadline) for the new check rather
	// than report the last.
	if last != nil && time.Since(last.at) < xksapi.MaxHealthAge {
		return last
	}
	select {
	case <-running:
	case <-ctx.Done():
	}
	return c.current.Load()
}
