// Package xkscmd adds the `caddy xks` commands: key generation and listing,
// SigV4 credentials, the KMS console's proxy configuration file, and a
// conformance check and load generator for a running proxy. They read the
// HSM backends and key stores from the same config as `caddy run`.
package xkscmd

import (
	"encoding/json"
	"fmt"
	"slices"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/certmagic"

	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/xkshandler"
)

// proxyConfig is what the commands need from a Caddy config: the hsm app's
// backends and every xks handler's key stores.
type proxyConfig struct {
	hsm       hsm.App
	keyStores []*xkshandler.KeyStore
	storage   json.RawMessage // the config's storage module, if it names one
}

// loadProxyConfig adapts and decodes the config the way `caddy run` would
// (an empty file name finds ./Caddyfile, as Caddy does).
func loadProxyConfig(file, adapter string) (*proxyConfig, error) {
	raw, _, _, err := caddycmd.LoadConfig(file, adapter)
	if err != nil {
		return nil, err
	}
	if len(raw) == 0 {
		return nil, fmt.Errorf("no config: give one with --config")
	}
	var top struct {
		Apps    map[string]json.RawMessage `json:"apps"`
		Storage json.RawMessage            `json:"storage"`
	}
	if err := json.Unmarshal(raw, &top); err != nil {
		return nil, fmt.Errorf("decoding config: %w", err)
	}
	pc := &proxyConfig{storage: top.Storage}
	if app, ok := top.Apps["hsm"]; ok {
		if err := json.Unmarshal(app, &pc.hsm); err != nil {
			return nil, fmt.Errorf("decoding the hsm app: %w", err)
		}
	}
	if httpApp, ok := top.Apps["http"]; ok {
		var tree any
		if err := json.Unmarshal(httpApp, &tree); err != nil {
			return nil, fmt.Errorf("decoding the http app: %w", err)
		}
		if err := collectKeyStores(tree, &pc.keyStores); err != nil {
			return nil, err
		}
	}
	return pc, nil
}

// collectKeyStores walks a decoded JSON tree for xks handlers, wherever
// routes and subroutes put them. A key store that two handlers serve (the
// site KMS calls, and a readiness probe that imports the same key stores)
// is one key store.
func collectKeyStores(node any, out *[]*xkshandler.KeyStore) error {
	switch n := node.(type) {
	case map[string]any:
		if n["handler"] == "xks" {
			raw, err := json.Marshal(n)
			if err != nil {
				return err
			}
			var h xkshandler.Handler
			if err := json.Unmarshal(raw, &h); err != nil {
				return fmt.Errorf("decoding an xks handler: %w", err)
			}
			for _, ks := range h.KeyStores {
				if !slices.ContainsFunc(*out, func(o *xkshandler.KeyStore) bool {
					return xkshandler.CompleteURIPath(o.URIPath) == xkshandler.CompleteURIPath(ks.URIPath)
				}) {
					*out = append(*out, ks)
				}
			}
			return nil
		}
		for _, v := range n {
			if err := collectKeyStores(v, out); err != nil {
				return err
			}
		}
	case []any:
		for _, v := range n {
			if err := collectKeyStores(v, out); err != nil {
				return err
			}
		}
	}
	return nil
}

// backendConfig returns the named backend, or the only one when name is
// empty.
func (pc *proxyConfig) backendConfig(name string) (string, *hsm.Config, error) {
	if name == "" {
		if len(pc.hsm.Backends) != 1 {
			return "", nil, fmt.Errorf("the config has %d HSM backends: choose one with --backend", len(pc.hsm.Backends))
		}
		for n := range pc.hsm.Backends {
			name = n
		}
	}
	cfg, ok := pc.hsm.Backends[name]
	if !ok {
		return "", nil, fmt.Errorf("no HSM backend %q in the config", name)
	}
	return name, cfg, nil
}

// keyStore returns the key store with the given URI path, or the only one
// when path is empty. As in the Caddyfile, the path may leave off
// /kms/xks/v1.
func (pc *proxyConfig) keyStore(path string) (*xkshandler.KeyStore, error) {
	if path == "" {
		if len(pc.keyStores) != 1 {
			return nil, fmt.Errorf("the config has %d key stores: choose one with --key-store", len(pc.keyStores))
		}
		return pc.keyStores[0], nil
	}
	path = xkshandler.CompleteURIPath(path)
	i := slices.IndexFunc(pc.keyStores, func(ks *xkshandler.KeyStore) bool { return ks.URIPath == path })
	if i < 0 {
		return nil, fmt.Errorf("no key store %s in the config", path)
	}
	return pc.keyStores[i], nil
}

// openStorage opens the config's storage as `caddy run` would: its storage
// module, or Caddy's default (file_system in the data directory). release
// releases it.
func (pc *proxyConfig) openStorage() (storage certmagic.Storage, release func(), err error) {
	return xkshandler.OpenStorage(pc.storage)
}
