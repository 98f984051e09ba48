package frontend

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/caddy-xks/caddy-xks/hsm"
)

// LookupBackends returns the backends of app that names lists, in its
// order.
func LookupBackends(app *hsm.App, names []string) ([]*hsm.Backend, error) {
	out := make([]*hsm.Backend, 0, len(names))
	for _, name := range names {
		b, err := app.Backend(name)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

// WithBackend runs fn on the first backend that can serve the HSM key
// label, falling over to the next one only when a backend reports the HSM
// unavailable. A backend that the key check found holding another key under
// the label is never used for it: what it did could not be undone on the
// others.
func (c *KeyCheck) WithBackend(label string, fn func(*hsm.Backend) error) error {
	var err error
	var skipped []string
	differs := c.differing(label)
	for i, b := range c.Backends {
		if i < len(differs) && differs[i] {
			skipped = append(skipped, b.Name())
			continue
		}
		if err = fn(b); !errors.Is(err, hsm.ErrUnavailable) {
			return err
		}
	}
	if len(skipped) > 0 {
		reason := fmt.Errorf("backends %s hold another key labelled %q and are not used for it", strings.Join(skipped, ", "), label)
		if err == nil {
			return &hsm.Error{Kind: hsm.ErrUnavailable, Key: label, Err: reason}
		}
		return fmt.Errorf("%w; %w", err, reason)
	}
	return err
}

// Health returns the health of each backend, in order: what the backend
// reports (its cached round trip), made DEGRADED at best by what the key
// check found wrong with it, which is added to the reason. The key check
// runs again when its report is older than the shortest health TTL of the
// backends.
func (c *KeyCheck) Health(ctx context.Context) []hsm.Health {
	ttl := time.Duration(0)
	for _, b := range c.Backends {
		if ttl == 0 || b.HealthTTL() < ttl {
			ttl = b.HealthTTL()
		}
	}
	keys := c.Latest(ctx, ttl)
	out := make([]hsm.Health, len(c.Backends))
	for i, b := range c.Backends {
		h := b.Health(ctx)
		if problems := keys.BackendProblems(i); len(problems) > 0 {
			if h.Status == hsm.HealthActive {
				h.Status = hsm.HealthDegraded
			}
			if h.Reason != "" {
				problems = append([]string{h.Reason}, problems...)
			}
			h.Reason = strings.Join(problems, "; ")
		}
		out[i] = h
	}
	return out
}
