package xkshandler

import (
	"encoding/json"
	"slices"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-xks/caddy-xks/internal/caddyctx"
)

// plainHTTPServers returns, for each key store URI path served by a server
// of the config being loaded that will not use TLS, that server's listen
// addresses. A server uses no TLS when it has no TLS connection policy and
// automatic HTTPS will not add one: it is disabled, the server listens on
// the HTTP port only, or every host the server's routes match is skipped
// (what an http:// site address adapts to) or none is named.
func plainHTTPServers(ctx caddy.Context) map[string][]string {
	cfg := caddyctx.LoadingConfig(ctx)
	if cfg == nil || cfg.AppsRaw["http"] == nil {
		return nil
	}
	var app struct {
		HTTPPort int `json:"http_port"`
		Servers  map[string]struct {
			Listen      []string        `json:"listen"`
			Routes      json.RawMessage `json:"routes"`
			TLSPolicies json.RawMessage `json:"tls_connection_policies"`
			AutoHTTPS   *struct {
				Disable bool     `json:"disable"`
				Skip    []string `json:"skip"`
			} `json:"automatic_https"`
		} `json:"servers"`
	}
	if err := json.Unmarshal(cfg.AppsRaw["http"], &app); err != nil {
		return nil
	}
	if app.HTTPPort == 0 {
		app.HTTPPort = caddyhttp.DefaultHTTPPort
	}
	plain := map[string][]string{}
	for _, srv := range app.Servers {
		var routes any
		if json.Unmarshal(srv.Routes, &routes) != nil {
			continue
		}
		var paths, hosts []string
		walkRoutes(routes, &paths, &hosts)
		if len(paths) == 0 || (len(srv.TLSPolicies) > 0 && string(srv.TLSPolicies) != "null") {
			continue
		}
		isPlain := srv.AutoHTTPS != nil && srv.AutoHTTPS.Disable
		isPlain = isPlain || onlyPort(srv.Listen, app.HTTPPort) || len(hosts) == 0
		if !isPlain && srv.AutoHTTPS != nil {
			isPlain = !slices.ContainsFunc(hosts, func(h string) bool { return !slices.Contains(srv.AutoHTTPS.Skip, h) })
		}
		if isPlain {
			for _, p := range paths {
				plain[CompleteURIPath(p)] = srv.Listen
			}
		}
	}
	return plain
}

// walkRoutes collects the key store paths of the xks handlers and the host
// matchers anywhere in a server's routes (subroutes included).
func walkRoutes(v any, paths, hosts *[]string) {
	switch v := v.(type) {
	case map[string]any:
		if v["handler"] == "xks" {
			if stores, ok := v["key_stores"].([]any); ok {
				for _, ks := range stores {
					if m, ok := ks.(map[string]any); ok {
						if p, ok := m["uri_path"].(string); ok {
							*paths = append(*paths, p)
						}
					}
				}
			}
		}
		if h, ok := v["host"].([]any); ok {
			for _, name := range h {
				if s, ok := name.(string); ok {
					*hosts = append(*hosts, s)
				}
			}
		}
		for _, child := range v {
			walkRoutes(child, paths, hosts)
		}
	case []any:
		for _, child := range v {
			walkRoutes(child, paths, hosts)
		}
	}
}

// onlyPort reports whether every listen address is on port.
func onlyPort(listen []string, port int) bool {
	if len(listen) == 0 {
		return false
	}
	for _, l := range listen {
		addr, err := caddy.ParseNetworkAddress(l)
		if err != nil || addr.IsUnixNetwork() || addr.IsFdNetwork() {
			return false
		}
		if addr.StartPort != uint(port) || addr.EndPort != uint(port) {
			return false
		}
	}
	return true
}
