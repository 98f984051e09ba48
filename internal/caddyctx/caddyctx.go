// Package caddyctx reads from a Caddy provisioning context what Caddy knows
// there but does not export: the config being loaded, which modules check
// as a whole (its admin endpoint, the servers that would serve a key store
// without TLS).
package caddyctx

import (
	"reflect"

	"github.com/caddyserver/caddy/v2"
)

// LoadingConfig returns the config a module is being provisioned for, or
// nil. Caddy has no accessor for it during provisioning, so this reads the
// context's config field; if a Caddy release renames it, the checks that
// use it find nothing rather than something wrong (and the tests of those
// checks fail: TestAdminEndpointRules, TestPlainHTTPGetsNoXKSService).
func LoadingConfig(ctx caddy.Context) *caddy.Config {
	field := reflect.ValueOf(&ctx).Elem().FieldByName("cfg")
	if !field.IsValid() || field.Type() != reflect.TypeFor[*caddy.Config]() || field.IsNil() {
		return nil
	}
	return (*caddy.Config)(field.UnsafePointer())
}
