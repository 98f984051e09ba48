package xkshandler

import (
	"encoding/json"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-xks/caddy-xks/internal/caddyctx"
)

// site is what one server of the config being loaded serves through xks
// handlers.
type site struct {
	listen []string
	// plain is true when the server will not use TLS: it has no TLS
	// connection policy and automatic HTTPS will not add one (it is
	// disabled, the server listens on the HTTP port only, or every host
	// its routes match is skipped, which is what an http:// site address
	// adapts to, or none is named).
	plain bool
	// paths are the key store URI paths its xks handlers serve. A handler
	// that a route limits to its own ready_path serves no key store.
	paths []string
	// serves is true when it serves an API: an xks handler's key store,
	// or an azure_ekm handler (which only mutual TLS reaches).
	serves bool
	// hosts are the names its routes match, but those automatic HTTPS
	// skips (the names of http:// site addresses).
	hosts []string
}

// configSites returns the servers of the config being loaded that serve
// key stores or readiness through xks handlers, or the EKM API through
// azure_ekm handlers; nil if the config cannot be read.
func configSites(ctx caddy.Context) []site {
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
	var sites []site
	for _, srv := range app.Servers {
		var routes any
		if json.Unmarshal(srv.Routes, &routes) != nil {
			continue
		}
		var s site
		found, ekm := walkRoutes(routes, nil, &s.paths, &s.hosts)
		if !found {
			continue
		}
		s.serves = ekm || len(s.paths) > 0
		s.listen = srv.Listen
		hasPolicies := len(srv.TLSPolicies) > 0 && string(srv.TLSPolicies) != "null"
		s.plain = !hasPolicies && (onlyPort(srv.Listen, app.HTTPPort) || len(s.hosts) == 0)
		if srv.AutoHTTPS != nil {
			s.plain = s.plain || (!hasPolicies && srv.AutoHTTPS.Disable)
			s.hosts = slices.DeleteFunc(s.hosts, func(h string) bool { return slices.Contains(srv.AutoHTTPS.Skip, h) })
			s.plain = s.plain || (!hasPolicies && len(s.hosts) == 0)
		}
		sites = append(sites, s)
	}
	return sites
}

// plainHTTPServers returns, for each key store URI path served by a server
// of the config being loaded that will not use TLS, that server's listen
// addresses.
func plainHTTPServers(sites []site) map[string][]string {
	plain := map[string][]string{}
	for _, s := range sites {
		if s.plain {
			for _, p := range s.paths {
				plain[CompleteURIPath(p)] = s.listen
			}
		}
	}
	return plain
}

// certificateNames returns the names of the sites that serve either API
// over TLS: an instance is ready only when Caddy holds a certificate for
// each.
func certificateNames(sites []site) []string {
	var names []string
	for _, s := range sites {
		if s.plain || !s.serves {
			continue
		}
		for _, h := range s.hosts {
			if h = strings.ToLower(h); !slices.Contains(names, h) {
				names = append(names, h)
			}
		}
	}
	return names
}

// walkRoutes collects the key store paths of the xks handlers and the host
// matchers anywhere in a server's routes (subroutes included), and reports
// whether it met a front end's handler, and an azure_ekm one among them.
// only holds the paths the enclosing routes limit requests to, or nil when
// they do not.
func walkRoutes(v any, only []string, paths, hosts *[]string) (found, ekm bool) {
	switch v := v.(type) {
	case map[string]any:
		if m, ok := v["match"]; ok {
			if p := matchedPaths(m); p != nil {
				only = p
			}
		}
		switch v["handler"] {
		case "xks":
			found = true
			ready, _ := v["ready_path"].(string)
			readyOnly := ready != "" && len(only) > 0 && !slices.ContainsFunc(only, func(p string) bool { return p != ready })
			if stores, ok := v["key_stores"].([]any); ok && !readyOnly {
				for _, ks := range stores {
					if m, ok := ks.(map[string]any); ok {
						if p, ok := m["uri_path"].(string); ok {
							*paths = append(*paths, p)
						}
					}
				}
			}
		case "azure_ekm":
			found, ekm = true, true
		}
		if h, ok := v["host"].([]any); ok {
			for _, name := range h {
				if s, ok := name.(string); ok {
					*hosts = append(*hosts, s)
				}
			}
		}
		for _, child := range v {
			f, e := walkRoutes(child, only, paths, hosts)
			found, ekm = found || f, ekm || e
		}
	case []any:
		for _, child := range v {
			f, e := walkRoutes(child, only, paths, hosts)
			found, ekm = found || f, ekm || e
		}
	}
	return found, ekm
}

// matchedPaths returns the exact paths a route's matcher sets let through,
// or nil when some set lets other paths through (no path matcher, or a
// pattern).
func matchedPaths(match any) []string {
	sets, ok := match.([]any)
	if !ok || len(sets) == 0 {
		return nil
	}
	var out []string
	for _, set := range sets {
		m, ok := set.(map[string]any)
		if !ok {
			return nil
		}
		list, ok := m["path"].([]any)
		if !ok || len(list) == 0 {
			return nil
		}
		for _, p := range list {
			s, ok := p.(string)
			if !ok || strings.Contains(s, "*") {
				return nil
			}
			out = append(out, s)
		}
	}
	return out
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
