package xkshandler

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
)

// OpenStorage opens a storage as `caddy run` opens a config's: the storage
// module the JSON names, provisioned in a context of its own, or Caddy's
// default (file_system in the data directory) when raw is empty. close
// releases it: the module's Cleanup runs (Redis closes its connections).
func OpenStorage(raw json.RawMessage) (storage certmagic.Storage, close func(), err error) {
	if len(raw) == 0 {
		return caddy.DefaultStorage, func() {}, nil
	}
	var named struct {
		Module string `json:"module"`
	}
	if err := json.Unmarshal(raw, &named); err != nil || named.Module == "" {
		// Not the JSON itself: it may hold the storage's password.
		return nil, nil, fmt.Errorf("the config's storage names no module")
	}
	info, err := caddy.GetModule("caddy.storage." + named.Module)
	if err != nil {
		return nil, nil, fmt.Errorf("the config's storage: %w", err)
	}
	mod := info.New()
	if err := json.Unmarshal(raw, mod); err != nil {
		return nil, nil, fmt.Errorf("the config's storage %s: %w", named.Module, err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	close = func() {
		if c, ok := mod.(caddy.CleanerUpper); ok {
			_ = c.Cleanup()
		}
		cancel()
	}
	if p, ok := mod.(caddy.Provisioner); ok {
		if err := p.Provision(ctx); err != nil {
			close()
			return nil, nil, fmt.Errorf("the config's storage %s: %w", named.Module, err)
		}
	}
	conv, ok := mod.(caddy.StorageConverter)
	if !ok {
		close()
		return nil, nil, fmt.Errorf("the config's storage %s is not a storage module", named.Module)
	}
	storage, err = conv.CertMagicStorage()
	if err != nil {
		close()
		return nil, nil, err
	}
	return storage, close, nil
}

// closingStorage returns the JSON of a storage module that a config unload
// cleans up (Redis closes its connections), and false for a storage that
// stays usable after (certmagic's file storage). Caddy keeps no storage
// JSON after loading the module, so it is the module, marshalled: every
// Caddy module's config is its JSON.
func closingStorage(storage certmagic.Storage) (json.RawMessage, bool) {
	mod, ok := storage.(caddy.Module)
	if !ok {
		return nil, false
	}
	if _, closes := mod.(caddy.CleanerUpper); !closes {
		return nil, false
	}
	raw, err := json.Marshal(mod)
	if err != nil {
		return nil, false
	}
	var fields map[string]any
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, false
	}
	fields["module"] = strings.TrimPrefix(string(mod.CaddyModule().ID), "caddy.storage.")
	raw, err = json.Marshal(fields)
	return raw, err == nil
}

// usageStores holds the storages the usage counters write to, by the
// config's storage JSON. The counters open their own instance of the
// config's storage module, shared between them: a config's storage module
// is cleaned up when the config is unloaded, which for Redis closes its
// connections, while the counters live across reloads and write their last
// record after the config that started them is gone.
var usageStores = caddy.NewUsagePool()

// usageStore is one storage of usageStores.
type usageStore struct {
	certmagic.Storage
	close func()
}

// Destruct closes the storage once no counter uses it.
func (s *usageStore) Destruct() error {
	s.close()
	return nil
}

// acquireUsageStore opens, or shares, the storage that raw configures.
// releaseUsageStore must be called with the same raw when done.
func acquireUsageStore(raw json.RawMessage) (certmagic.Storage, error) {
	v, _, err := usageStores.LoadOrNew(string(raw), func() (caddy.Destructor, error) {
		storage, closeStorage, err := OpenStorage(raw)
		if err != nil {
			return nil, fmt.Errorf("opening the storage for key usage records: %w", err)
		}
		return &usageStore{Storage: storage, close: closeStorage}, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*usageStore), nil
}

// releaseUsageStore gives back a storage acquireUsageStore returned.
func releaseUsageStore(raw json.RawMessage) {
	_, _ = usageStores.Delete(string(raw))
}
