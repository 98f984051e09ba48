package hsm

import (
	"fmt"
	"io/fs"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/internal/caddyctx"
)

// checkAdminEndpoint refuses a config whose Caddy admin endpoint listens on
// TCP, unless allowTCP, and warns of a unix socket that users other than
// the proxy's may connect to. The endpoint changes the running config
// without authentication: whoever can reach it, which on loopback is every
// local user, can load a site that answers with the PIN and secret files
// (the {file.*} placeholders the proxy reads as its own user), or load a
// PKCS#11 module of their own into the logged-in proxy. A unix socket that
// only the proxy's user can write (connecting takes write permission), or
// admin off, keeps that to the proxy's user.
func checkAdminEndpoint(ctx caddy.Context, allowTCP bool, logger *zap.Logger) error {
	listen, ok := adminListen(caddyctx.LoadingConfig(ctx))
	if !ok {
		return nil
	}
	addr, err := caddy.ParseNetworkAddress(listen)
	if err != nil || addr.IsFdNetwork() {
		// Caddy refuses an address it cannot parse; a socket handed over
		// by systemd is whatever the unit made it.
		return nil
	}
	if addr.IsUnixNetwork() {
		if mode := unixSocketMode(addr.Host); mode&0o022 != 0 {
			logger.Warn("Caddy's admin endpoint is a unix socket that users other than the proxy's may connect to: they can rewrite the running config, "+
				"make it serve the HSM PIN and SigV4 secrets, or load a PKCS#11 module into the logged-in proxy; give it mode 0600",
				zap.String("admin", listen), zap.String("mode", fmt.Sprintf("%04o", mode)))
		}
		return nil
	}
	const risk = "without authentication: any local user can rewrite the running config, make it serve the HSM PIN and SigV4 secrets, " +
		"or load a PKCS#11 module into the logged-in proxy"
	if allowTCP {
		logger.Warn("Caddy's admin endpoint listens on TCP, "+risk+" (allow_tcp_admin is set)", zap.String("admin", listen))
		return nil
	}
	return fmt.Errorf("hsm: Caddy's admin endpoint listens on TCP (%s), %s; put it on a unix socket only the proxy's user can open "+
		"(admin unix//run/caddy/admin.sock|0600; caddy reload finds it in the config) or turn it off (admin off), "+
		"or, to accept that risk, set allow_tcp_admin in the hsm global option", listen, risk)
}

// adminListen returns the admin endpoint's listen address in cfg, and false
// when the endpoint is off or cfg is nil.
func adminListen(cfg *caddy.Config) (string, bool) {
	switch {
	case cfg == nil:
		return "", false
	case cfg.Admin == nil:
		return caddy.DefaultAdminListen, true
	case cfg.Admin.Disabled:
		return "", false
	case cfg.Admin.Listen == "":
		return caddy.DefaultAdminListen, true
	}
	return cfg.Admin.Listen, true
}

// unixSocketMode is the mode Caddy gives a unix socket of host, "path" or
// "path|bits": bits in octal, 0200 if none (Caddy's default).
func unixSocketMode(host string) fs.FileMode {
	_, bits, found := strings.Cut(host, "|")
	if !found {
		return 0o200
	}
	mode, err := strconv.ParseUint(bits, 8, 32)
	if err != nil {
		return 0o200 // Caddy refuses it
	}
	return fs.FileMode(mode)
}
