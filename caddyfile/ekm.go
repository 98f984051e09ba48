package caddyfile

import (
	"strconv"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-xks/caddy-xks/authz"
	"github.com/caddy-xks/caddy-xks/ekmhandler"
	"github.com/caddy-xks/caddy-xks/frontend"
)

// parseEKM sets up the azure_ekm handler. Syntax:
//
//	azure_ekm [<matcher>] {
//		max_request_body <bytes>
//		max_concurrent_streams <n>
//		key_store [<path prefix>] {
//			hsm             <backend> [<backend>...]
//			client_subjects <subject common name>...
//			client_roots    <CA certificate file>...
//			keys            <key name>...|*
//			disable         <key name>...
//			deadline        <duration>
//			rate_limit      <requests per second> [<burst>]
//			max_concurrent  <n>
//			authorize {
//				deny  <rule name> <CEL expression>
//				allow <rule name> <CEL expression>
//			}
//		}
//	}
//
// The path prefix is the EKM connection's (--path-prefix), e.g.
// /contoso/prod; without one the key store serves the API at the root.
// client_subjects, client_roots, keys and disable may be repeated.
func parseEKM(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(ekmhandler.Handler)
	h.Next() // consume the directive name
	if h.NextArg() {
		return nil, h.ArgErr()
	}
	for nesting := h.Nesting(); h.NextBlock(nesting); {
		switch h.Val() {
		case "max_request_body", "max_concurrent_streams":
			if err := parseHandlerLimit(h.Dispenser, &handler.MaxRequestBody, &handler.MaxConcurrentStreams); err != nil {
				return nil, err
			}
		case "key_store":
			ks, err := parseEKMKeyStore(h.Dispenser)
			if err != nil {
				return nil, err
			}
			handler.KeyStores = append(handler.KeyStores, ks)
		default:
			return nil, h.Errf("unrecognized azure_ekm option %q", h.Val())
		}
	}
	return handler, nil
}

func parseEKMKeyStore(d *caddyfile.Dispenser) (*ekmhandler.KeyStore, error) {
	ks := new(ekmhandler.KeyStore)
	if d.NextArg() {
		ks.PathPrefix = d.Val()
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		args := d.RemainingArgs()
		if handled, err := parseKeyStoreCommon(d, opt, args, &ks.Limits, &ks.Authorize); handled || err != nil {
			if err != nil {
				return nil, err
			}
			continue
		}
		if len(args) == 0 {
			return nil, d.ArgErr()
		}
		switch opt {
		case "hsm":
			ks.HSM = append(ks.HSM, args...)
		case "client_subjects":
			ks.ClientSubjects = append(ks.ClientSubjects, args...)
		case "client_roots":
			ks.ClientRoots = append(ks.ClientRoots, args...)
		case "keys":
			ks.Keys = append(ks.Keys, args...)
		case "disable":
			ks.DisabledKeys = append(ks.DisabledKeys, args...)
		default:
			return nil, d.Errf("unrecognized azure_ekm key_store option %q", opt)
		}
	}
	return ks, nil
}

// parseKeyStoreCommon reads the options every front end's key stores
// share: their limits (deadline, rate_limit, max_concurrent) and their
// authorize block. It reports whether opt was one of them.
func parseKeyStoreCommon(d *caddyfile.Dispenser, opt string, args []string, l *frontend.Limits, rules *[]authz.Rule) (bool, error) {
	switch opt {
	case "authorize":
		if len(args) != 0 {
			return true, d.ArgErr()
		}
		parsed, err := parseAuthorize(d)
		if err != nil {
			return true, err
		}
		*rules = append(*rules, parsed...)
	case "rate_limit":
		if len(args) < 1 || len(args) > 2 {
			return true, d.Err("rate_limit takes requests per second and an optional burst")
		}
		r, err := strconv.ParseFloat(args[0], 64)
		if err != nil {
			return true, d.Errf("rate_limit %q: %v", args[0], err)
		}
		l.RateLimit = r
		if len(args) == 2 {
			if l.RateBurst, err = intArg(d, "rate_limit burst", args[1]); err != nil {
				return true, err
			}
		}
	case "max_concurrent":
		if len(args) != 1 {
			return true, d.ArgErr()
		}
		n, err := intArg(d, opt, args[0])
		if err != nil {
			return true, err
		}
		l.MaxConcurrent = n
	case "deadline":
		if len(args) != 1 {
			return true, d.ArgErr()
		}
		dur, err := durationArg(d, opt, args[0])
		if err != nil {
			return true, err
		}
		l.Deadline = dur
	default:
		return false, nil
	}
	return true, nil
}
