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
	opts := handlerLimitOptions(&handler.MaxRequestBody, &handler.MaxConcurrentStreams)
	opts["key_store"] = option{maxArgs: 1, set: func(d *caddyfile.Dispenser, _ string, args []string) error {
		ks, err := parseEKMKeyStore(d, args)
		handler.KeyStores = append(handler.KeyStores, ks)
		return err
	}}
	return handler, parseOptions(h.Dispenser, "azure_ekm", opts)
}

// parseEKMKeyStore reads a key_store block; args holds its path prefix, if
// any.
func parseEKMKeyStore(d *caddyfile.Dispenser, args []string) (*ekmhandler.KeyStore, error) {
	ks := new(ekmhandler.KeyStore)
	if len(args) == 1 {
		ks.PathPrefix = args[0]
	}
	opts := keyStoreCommonOptions(&ks.Limits, &ks.Authorize)
	opts["hsm"] = listOption(&ks.HSM)
	opts["client_subjects"] = listOption(&ks.ClientSubjects)
	opts["client_roots"] = listOption(&ks.ClientRoots)
	opts["keys"] = listOption(&ks.Keys)
	opts["disable"] = listOption(&ks.DisabledKeys)
	return ks, parseOptions(d, "azure_ekm key_store", opts)
}

// keyStoreCommonOptions are the options every front end's key stores
// share: their limits (deadline, rate_limit, max_concurrent) and their
// authorize block.
func keyStoreCommonOptions(l *frontend.Limits, rules *[]authz.Rule) map[string]option {
	return map[string]option{
		"max_concurrent": intOption(&l.MaxConcurrent),
		"deadline":       durationOption(&l.Deadline),
		"rate_limit": {minArgs: 1, maxArgs: 2, usage: "rate_limit takes requests per second and an optional burst",
			set: func(d *caddyfile.Dispenser, _ string, args []string) error {
				r, err := strconv.ParseFloat(args[0], 64)
				if err != nil {
					return d.Errf("rate_limit %q: %v", args[0], err)
				}
				l.RateLimit = r
				if len(args) == 2 {
					l.RateBurst, err = intArg(d, "rate_limit burst", args[1])
				}
				return err
			}},
		"authorize": {set: func(d *caddyfile.Dispenser, _ string, _ []string) error {
			parsed, err := parseAuthorize(d)
			*rules = append(*rules, parsed...)
			return err
		}},
	}
}

// handlerLimitOptions are the options both directives have:
// max_request_body (bytes) and max_concurrent_streams.
func handlerLimitOptions(maxBody *int64, streams *int) map[string]option {
	return map[string]option{
		"max_concurrent_streams": intOption(streams),
		"max_request_body": {minArgs: 1, maxArgs: 1, set: func(d *caddyfile.Dispenser, _ string, args []string) (err error) {
			*maxBody, err = strconv.ParseInt(args[0], 10, 64)
			if err != nil {
				return d.Errf("max_request_body %q: %v", args[0], err)
			}
			return nil
		}},
	}
}
