package frontend

import (
	"runtime/debug"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
)

// Version is the caddy-xks release this source is. A build from a
// published module version reports that version instead.
const Version = "v0.1.0"

// ProxyModel names the proxy to the clouds (XKS's xksProxyModel, Azure
// EKM's proxy_name): the product and its version, and Caddy's.
var ProxyModel = sync.OnceValue(func() string {
	version := Version
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, m := range append([]*debug.Module{&info.Main}, info.Deps...) {
			// A local build (replaced module, or "(devel)") has no version
			// of its own to report.
			if m.Path == "github.com/caddy-xks/caddy-xks" && m.Replace == nil && strings.HasPrefix(m.Version, "v") && !strings.HasPrefix(m.Version, "v0.0.0-") {
				version = m.Version
			}
		}
	}
	caddyVersion, _ := caddy.Version()
	return "caddy-xks " + version + " (Caddy " + caddyVersion + ")"
})

// ProxyVendor is the proxy's vendor, as both APIs report it.
const ProxyVendor = "caddy-xks"
