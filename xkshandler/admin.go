package xkshandler

import (
	"reflect"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// warnOfTCPAdmin logs a warning when Caddy's admin endpoint listens on TCP.
// Anyone who can reach it, which on loopback is every local user, can
// change the running configuration without a password: make a site answer
// with the contents of the PIN and secret files (the {file.*} placeholders
// the proxy reads as root), or load a PKCS#11 module of their own into the
// logged-in proxy. A unix socket with mode 0600 (or admin off) limits that
// to the proxy's own user.
func warnOfTCPAdmin(ctx caddy.Context, logger *zap.Logger) {
	listen, ok := adminListen(ctx)
	if !ok {
		return
	}
	addr, err := caddy.ParseNetworkAddress(listen)
	if err != nil || addr.IsUnixNetwork() || addr.IsFdNetwork() {
		return
	}
	logger.Warn("Caddy's admin endpoint listens on TCP, without authentication: any local user can rewrite the running config, "+
		"make it serve the HSM PIN and SigV4 secrets, or load a PKCS#11 module into the logged-in proxy; "+
		"set admin unix//run/caddy/admin.sock|0600 (caddy reload finds it in the config) or admin off",
		zap.String("admin", listen))
}

// adminListen returns the admin endpoint's listen address of the config
// being loaded, and false when the endpoint is off or the config cannot be
// read.
func adminListen(ctx caddy.Context) (string, bool) {
	cfg := loadingConfig(ctx)
	if cfg == nil {
		return "", false
	}
	if cfg.Admin == nil {
		return caddy.DefaultAdminListen, true
	}
	if cfg.Admin.Disabled {
		return "", false
	}
	if cfg.Admin.Listen == "" {
		return caddy.DefaultAdminListen, true
	}
	return cfg.Admin.Listen, true
}

// loadingConfig returns the config a module is being provisioned for, or
// nil. Caddy has no accessor for it during provisioning, so this reads the
// context's config field; if a Caddy release renames it, the checks that
// use it find nothing rather than something wrong (and
// TestAdminEndpointOnTCPIsWarnedOf and TestPlainHTTPSiteFailsToLoad fail).
func loadingConfig(ctx caddy.Context) *caddy.Config {
	field := reflect.ValueOf(&ctx).Elem().FieldByName("cfg")
	if !field.IsValid() || field.Type() != reflect.TypeFor[*caddy.Config]() || field.IsNil() {
		return nil
	}
	return (*caddy.Config)(field.UnsafePointer())
}
