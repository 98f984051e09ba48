package hsm

import (
	"errors"
	"fmt"
	"sort"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/secret"
)

func init() {
	caddy.RegisterModule(new(App))
}

// App is the "hsm" Caddy app: it owns named PKCS#11 backends that HTTP
// handlers look up with ctx.App("hsm") and Backend(name). Tokens are shared
// across config reloads, so a reload neither logs out nor re-opens a token
// the new config still uses.
//
//	{"apps": {"hsm": {"backends": {"primary": {"module": "...", "token": "...", "pin": "{env.XKS_HSM_PIN}"}}}}}
type App struct {
	// Backends maps a backend's name to its configuration. Default: none.
	Backends map[string]*Config `json:"backends,omitempty"`

	// AllowTCPAdmin lets the config load with Caddy's admin endpoint on
	// TCP, where every local user can change the running config without a
	// password, and so read the PIN and secret files and load a PKCS#11
	// module into the logged-in proxy; a warning is logged at every load.
	// Default: false, and such a config fails to load: put the endpoint on
	// a unix socket only the proxy's user can open, or turn it off.
	AllowTCPAdmin bool `json:"allow_tcp_admin,omitempty"`

	backends map[string]*Backend
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "hsm",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision checks where Caddy's admin endpoint listens, then opens every
// backend (OpenConfig). Opening happens here rather than in Start because
// handlers may serve before apps are started.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if err := checkAdminEndpoint(ctx, a.AllowTCPAdmin, a.logger); err != nil {
		return err
	}
	a.backends = make(map[string]*Backend, len(a.Backends))
	names := make([]string, 0, len(a.Backends))
	for name := range a.Backends {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		cfg := a.Backends[name]
		if cfg == nil {
			return fmt.Errorf("hsm backend %q: empty configuration", name)
		}
		b, err := OpenConfig(name, *cfg, a.logger)
		if err != nil {
			return err
		}
		a.backends[name] = b
	}
	// Each config has its own registry; the collector reads this app's
	// backends, so the metrics follow reloads without state of their own.
	if err := ctx.GetMetricsRegistry().Register(backendCollector{app: a}); err != nil {
		return fmt.Errorf("hsm: registering metrics: %w", err)
	}
	return nil
}

// Validate checks every backend's configuration.
func (a *App) Validate() error {
	var errs []error
	for name, cfg := range a.Backends {
		if cfg == nil {
			errs = append(errs, fmt.Errorf("hsm backend %q: empty configuration", name))
			continue
		}
		if err := cfg.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("hsm backend %q: %w", name, err))
		}
		if cfg.PIN != "" && !secret.IsPlaceholder(cfg.PIN) {
			errs = append(errs, fmt.Errorf("hsm backend %q: pin %w", name, secret.ErrLiteral))
		}
	}
	return errors.Join(errs...)
}

// OpenConfig opens a backend from its configuration as Caddy holds it,
// with the PIN a placeholder that it resolves (secret.Resolve) first: a
// literal PIN is refused before the token is opened, so that it never
// costs a login attempt.
func OpenConfig(name string, cfg Config, logger *zap.Logger) (*Backend, error) {
	if cfg.PIN != "" {
		pin, err := secret.Resolve(cfg.PIN)
		if err != nil {
			return nil, fmt.Errorf("hsm backend %q: pin %w", name, err)
		}
		cfg.PIN = pin
	}
	return Open(name, cfg, logger)
}

// Start does nothing: backends are opened in Provision.
func (a *App) Start() error { return nil }

// Stop does nothing: backends are closed in Cleanup, after the old config's
// requests had their chance to finish.
func (a *App) Stop() error { return nil }

// Cleanup closes the backends, each waiting for its operations in flight.
// Caddy calls it on a reload after the new config was provisioned, so tokens
// the new config shares stay open.
func (a *App) Cleanup() error {
	for name, b := range a.backends {
		_ = b.Close()
		delete(a.backends, name)
	}
	return nil
}

// Backend returns the backend named name.
func (a *App) Backend(name string) (*Backend, error) {
	if b, ok := a.backends[name]; ok {
		return b, nil
	}
	return nil, fmt.Errorf("hsm backend %q is not configured", name)
}

// Interface guards.
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.Validator    = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
