package xkshandler

import (
	"bytes"
	"context"
	"crypto/rand"
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
)

// The key check proves what a key store's backends hold under its key
// labels, at provision and again from the health check:
//
//   - On each backend, a label names exactly one key. A second key given a
//     label in use (by another process, a key ceremony tool) makes every
//     call with it fail; the check logs it and the backend's health is
//     DEGRADED, so that it is noticed without a restart.
//   - With several backends (hsm a b), every backend holds the same key
//     under each label. Encrypt and Decrypt fall over to the next backend
//     when one is unavailable, so a backend holding another key would write
//     ciphertexts that the others cannot decrypt. The proof is a ciphertext
//     made by one backend that another decrypts, which works in every IV
//     mode: decryption always takes the IV as given. A key store whose
//     backends differ, or where a key is on some backends and not others,
//     is a configuration error at provision; found later, it makes the
//     backend DEGRADED, and calls with that key never fall over to it.
//
// A backend that cannot answer (unavailable, busy, slow) proves nothing
// either way: it is logged and left to the next check, never refused.

// keyIdentityAAD is the AAD of the identity proof's ciphertexts; the
// plaintext is random. The proof must use the key store's own keys (there
// is no other way to prove they are equal), so the HSM's log shows these
// operations once per health interval.
var keyIdentityAAD = []byte("caddy-xks key identity check")

// keyCheckTimeout bounds one whole check.
const keyCheckTimeout = time.Minute

// maxKeyCheckAge is the age past which a health call waits (within its
// deadline) for a new check rather than report the last one: the spec's
// limit on a cached health result.
const maxKeyCheckAge = time.Minute

// keyReport is the outcome of one key check.
type keyReport struct {
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
	// versionsMissing are configured key versions that no backend holds:
	// they also make a configuration fail to load.
	versionsMissing []string
	// unproven says what the check could not find out (a backend that did
	// not answer, a key no backend may both encrypt and decrypt with).
	unproven []string
	// silent[i] is true when backend i did not answer the check: it keeps
	// what the previous check found.
	silent []bool
}

// keyState is what one backend holds under one label.
type keyState struct {
	meta hsm.KeyMetadata
	err  error // nil: exactly one usable key
}

func (s keyState) exists() bool {
	return s.err == nil || errors.Is(s.err, hsm.ErrDuplicateKey) || errors.Is(s.err, hsm.ErrKeyExportable)
}

func (s keyState) missing() bool { return errors.Is(s.err, hsm.ErrKeyNotFound) }

// keyCheck holds a key store's last key report and runs new checks, one at a
// time.
type keyCheck struct {
	current atomic.Pointer[keyReport] // read by the request path

	mu      sync.Mutex
	running chan struct{} // nil when no check runs
}

// differing reports, per backend, whether calls with label must not use it.
func (c *keyCheck) differing(label string) []bool {
	if r := c.current.Load(); r != nil {
		return r.differs[label]
	}
	return nil
}

// checkKeys runs the key check and logs what changed since the previous
// report. A backend that does not answer keeps what the previous check
// found. A backend found holding another key stays so until it is proven
// to hold the same key as a backend that was not found so: one whose
// partner does not answer now, or that only agrees with another backend so
// found, is not cleared by that.
func (ks *KeyStore) checkKeys(ctx context.Context) *keyReport {
	prev := ks.keyCheck.current.Load()
	n := len(ks.backends)
	r := &keyReport{problems: make([][]string, n), differs: make(map[string][]bool), silent: make([]bool, n)}
	labels, states := ks.keyStates(ctx, r)
	same := make(map[string][][2]int, len(labels))
	for _, label := range labels {
		same[label] = ks.compareKey(ctx, r, label, states[label])
	}
	ks.checkVersions(r, states)
	if prev != nil {
		for i := range n {
			if r.silent[i] {
				r.problems[i] = slices.Clone(prev.problems[i])
			}
		}
		for label, was := range prev.differs {
			for i, differed := range was {
				switch {
				case !differed || r.differing(label, i):
				case r.silent[i]:
					r.markDiffering(label, i, n, "") // its reason came with its problems
				case !provenSame(same[label], was, i):
					r.markDiffering(label, i, n, prev.differingProblem(label, i))
				}
			}
		}
	}
	r.at = time.Now()
	ks.logKeyChanges(prev, r)
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

func (r *keyReport) differing(label string, i int) bool {
	return i < len(r.differs[label]) && r.differs[label][i]
}

// markDiffering records that backend i holds another key under label,
// with problem as its reason ("" when its problems already say so).
func (r *keyReport) markDiffering(label string, i, n int, problem string) {
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
func (r *keyReport) differingProblem(label string, i int) string {
	mark := fmt.Sprintf("different keys labelled %q", label)
	for _, p := range r.problems[i] {
		if strings.Contains(p, mark) {
			return p
		}
	}
	return "this backend holds " + mark + " from the backend it was compared with"
}

// down reports whether err says the backend cannot answer now, so that
// the check asks it nothing more this time.
func down(err error) bool {
	return errors.Is(err, hsm.ErrUnavailable) || errors.Is(err, hsm.ErrTimeout) || errors.Is(err, hsm.ErrBusy)
}

// keyStates finds what each backend holds under each label of the key
// store: by a fresh lookup of each label (which also revalidates the
// backend's cached handle), or for "*" from the list of the token's keys.
func (ks *KeyStore) keyStates(ctx context.Context, r *keyReport) ([]string, map[string][]keyState) {
	states := make(map[string][]keyState)
	if ks.keys != nil {
		all := maps.Clone(ks.keys)
		for _, vk := range ks.versioned {
			for _, l := range vk.labels() {
				all[l] = true
			}
		}
		labels := slices.Sorted(maps.Keys(all))
		failed := make([]error, len(ks.backends))
		for _, label := range labels {
			s := make([]keyState, len(ks.backends))
			for i, b := range ks.backends {
				if failed[i] != nil {
					s[i].err = failed[i]
					continue
				}
				s[i].meta, s[i].err = b.CheckKey(ctx, label)
				if down(s[i].err) {
					failed[i], r.silent[i] = s[i].err, true
					r.unproven = append(r.unproven, fmt.Sprintf("backend %s did not answer the key check: %v", b.Name(), s[i].err))
				}
			}
			states[label] = s
		}
		return labels, states
	}
	lists := make([][]hsm.KeyInfo, len(ks.backends))
	errs := make([]error, len(ks.backends))
	labels := make(map[string]bool)
	for i, b := range ks.backends {
		if lists[i], errs[i] = b.ListKeys(ctx); errs[i] != nil {
			r.silent[i] = true
			r.unproven = append(r.unproven, fmt.Sprintf("could not list the keys of backend %s: %v", b.Name(), errs[i]))
		}
		for _, k := range lists[i] {
			labels[k.Label] = true
		}
	}
	for label := range labels {
		s := make([]keyState, len(ks.backends))
		for i, b := range ks.backends {
			if errs[i] != nil {
				s[i].err = errs[i]
				continue
			}
			var found []hsm.KeyInfo
			for _, k := range lists[i] {
				if k.Label == label {
					found = append(found, k)
				}
			}
			switch {
			case len(found) == 0:
				s[i].err = &hsm.Error{Kind: hsm.ErrKeyNotFound, Key: label}
			case len(found) > 1:
				s[i].err = &hsm.Error{Kind: hsm.ErrDuplicateKey, Key: label}
			case found[0].Protection.Exportable() != "" && !b.AllowsExportableKeys():
				s[i].err = &hsm.Error{Kind: hsm.ErrKeyExportable, Key: label}
			default:
				s[i].meta = found[0].KeyMetadata
			}
		}
		states[label] = s
	}
	return slices.Sorted(maps.Keys(labels)), states
}

// compareKey records in r what is wrong with label across the backends,
// and returns the pairs of backends it proved to hold the same key.
func (ks *KeyStore) compareKey(ctx context.Context, r *keyReport, label string, s []keyState) [][2]int {
	var pairs [][2]int
	holder := slices.IndexFunc(s, keyState.exists)
	for i, st := range s {
		switch {
		case errors.Is(st.err, hsm.ErrDuplicateKey):
			r.problems[i] = append(r.problems[i], fmt.Sprintf("more than one key is labelled %q, so calls with it fail", label))
		case st.missing() && holder >= 0:
			msg := fmt.Sprintf("key %q is on backend %s but not on backend %s", label, ks.backends[holder].Name(), ks.backends[i].Name())
			r.problems[i] = append(r.problems[i], msg)
			r.mismatches = append(r.mismatches, msg)
		}
	}
	// The identity proof needs one AES-256 key on each side.
	ref := -1
	for j, st := range s {
		if st.err != nil || st.meta.KeySpec != hsm.KeySpecAES256 {
			continue
		}
		if ref < 0 {
			ref = j
			continue
		}
		same, err := ks.sameKey(ctx, label, ks.backends[ref], ks.backends[j])
		switch {
		case err != nil:
			r.unproven = append(r.unproven, fmt.Sprintf("could not prove that backends %s and %s hold the same key labelled %q: %v",
				ks.backends[ref].Name(), ks.backends[j].Name(), label, err))
		case !same:
			msg := fmt.Sprintf("backends %s and %s hold different keys labelled %q: a ciphertext made by one does not decrypt on the other",
				ks.backends[ref].Name(), ks.backends[j].Name(), label)
			r.mismatches = append(r.mismatches, msg)
			r.markDiffering(label, j, len(s), msg)
		default:
			pairs = append(pairs, [2]int{ref, j})
		}
	}
	return pairs
}

// sameKey proves whether a and b hold the same key under label: a
// ciphertext of one decrypts on the other, whichever way the keys' usage
// allows. An error means neither way could be tried.
func (ks *KeyStore) sameKey(ctx context.Context, label string, a, b *hsm.Backend) (bool, error) {
	same, err := proveSameKey(ctx, label, a, b)
	if errors.Is(err, hsm.ErrKeyUsage) {
		same, err = proveSameKey(ctx, label, b, a)
	}
	if errors.Is(err, hsm.ErrKeyUsage) {
		return false, fmt.Errorf("neither backend may encrypt with the key while the other decrypts: %w", err)
	}
	return same, err
}

// proveSameKey encrypts a random plaintext on from and decrypts it on to.
func proveSameKey(ctx context.Context, label string, from, to *hsm.Backend) (bool, error) {
	pt := make([]byte, 32)
	_, _ = rand.Read(pt) // never fails
	res, err := from.Encrypt(ctx, label, pt, keyIdentityAAD)
	if err != nil {
		return false, err
	}
	got, err := to.Decrypt(ctx, label, res.IV, res.Ciphertext, res.Tag, keyIdentityAAD)
	if errors.Is(err, hsm.ErrInvalidCiphertext) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return bytes.Equal(got, pt), nil
}

// logKeyChanges logs the problems of r that prev did not have, and those of
// prev that are gone, so that a problem lasting across checks is logged once;
// and likewise what r could not prove.
func (ks *KeyStore) logKeyChanges(prev, r *keyReport) {
	for _, u := range r.unproven {
		if prev == nil || !slices.Contains(prev.unproven, u) {
			ks.logger.Warn("key check: "+u+"; the next health check tries again", zap.String("key_store", ks.URIPath))
		}
	}
	for i, b := range ks.backends {
		var before []string
		if prev != nil {
			before = prev.problems[i]
		}
		for _, p := range r.problems[i] {
			if !slices.Contains(before, p) {
				ks.logger.Error("key check: "+p, zap.String("key_store", ks.URIPath), zap.String("backend", b.Name()))
			}
		}
		for _, p := range before {
			if !slices.Contains(r.problems[i], p) {
				ks.logger.Info("key check: resolved: "+p, zap.String("key_store", ks.URIPath), zap.String("backend", b.Name()))
			}
		}
	}
}

// backendProblems returns what the report found wrong with backend i.
func (r *keyReport) backendProblems(i int) []string {
	if r == nil || i >= len(r.problems) {
		return nil
	}
	return r.problems[i]
}

// mismatchError is the configuration error for a key store whose backends
// do not hold the same keys, or nil.
func (r *keyReport) mismatchError(ks *KeyStore) error {
	if len(r.versionsMissing) > 0 {
		return fmt.Errorf("key store %s: %s", ks.URIPath, strings.Join(r.versionsMissing, "; "))
	}
	if len(r.mismatches) == 0 {
		return nil
	}
	return fmt.Errorf("key store %s: %s; list several backends in one key store only if they hold the same key material (for example the modules of one nShield Security World)",
		ks.URIPath, strings.Join(r.mismatches, "; "))
}

// latestKeyReport returns the last key report, running a new check when
// the last one is older than ttl. Like a backend's health,
// it answers with the last report while the new check runs, unless that is
// older than a minute: then it waits for the new one until ctx is done.
func (ks *KeyStore) latestKeyReport(ctx context.Context, ttl time.Duration) *keyReport {
	c := &ks.keyCheck
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
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), keyCheckTimeout)
		go func() {
			defer cancel()
			c.current.Store(ks.checkKeys(cctx))
			c.mu.Lock()
			c.running = nil
			c.mu.Unlock()
			close(running)
		}()
	}
	c.mu.Unlock()
	if last != nil && time.Since(last.at) < maxKeyCheckAge {
		return last
	}
	select {
	case <-running:
	case <-ctx.Done():
	}
	return c.current.Load()
}

// checkVersions records each configured key version that Encrypt or
// Decrypt may need (every one that is not disabled) and that no backend
// that answered holds.
func (ks *KeyStore) checkVersions(r *keyReport, states map[string][]keyState) {
	answered := slices.Contains(r.silent, false)
	for _, k := range slices.Sorted(maps.Keys(ks.versioned)) {
		vk := ks.versioned[k]
		if !vk.configured {
			continue
		}
		for _, v := range vk.versions {
			if v.disabled {
				continue
			}
			if !answered || slices.ContainsFunc(states[v.label], keyState.exists) {
				continue
			}
			msg := fmt.Sprintf("version %d of key %s, the HSM key labelled %q, is on no backend, so calls that need it fail: make it with `caddy xks keygen --label %s`, or disable the version",
				v.n, vk.key, v.label, v.label)
			r.versionsMissing = append(r.versionsMissing, msg)
			for i := range ks.backends {
				if !r.silent[i] {
					r.problems[i] = append(r.problems[i], msg)
				}
			}
		}
	}
}
