// Package caddyfile gives caddy-xks its Caddyfile syntax: the global "hsm"
// option, which defines named PKCS#11 backends (the hsm app), the "xks"
// handler directive, which serves AWS KMS external key stores from them,
// and the "azure_ekm" handler directive, which serves Azure Managed HSM's
// external keys from them.
package caddyfile

import (
	"encoding/json"
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-xks/caddy-xks/authz"
	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/xkshandler"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("hsm", parseHSM)
	httpcaddyfile.RegisterHandlerDirective("xks", parseXKS)
	httpcaddyfile.RegisterHandlerDirective("azure_ekm", parseEKM)
	// xks and azure_ekm answer every request they are given, so they go
	// before respond: a catch-all "respond" in the same site still works
	// for other paths when they are given a matcher.
	httpcaddyfile.RegisterDirectiveOrder("xks", httpcaddyfile.Before, "respond")
	httpcaddyfile.RegisterDirectiveOrder("azure_ekm", httpcaddyfile.Before, "respond")
}

// parseHSM sets up the hsm app from the global option. Syntax:
//
//	hsm {
//		pkcs11 <name> {
//			module       <path to the PKCS#11 library>
//			token        <token label>
//			slot_id      <slot id>
//			serial       <token serial>
//			pin          <{env.VAR} or {file./path}>
//			no_login
//			pin_refused_codes <code>...
//			iv           auto|caller|hsm|hsm_appended
//			max_sessions <n>
//			session_wait <duration>
//			call_timeout <duration>
//			private_keys true|false
//			health_ttl   <duration>
//			env          <NAME> <value>
//			init_args    <string for C_Initialize's pReserved>
//			kwp_mechanism <number, e.g. 0x210B>
//			allow_exportable_keys
//		}
//		allow_tcp_admin
//	}
//
// Several hsm blocks are merged; a backend name may be defined once.
// allow_exportable_keys lets the backend use keys whose value can leave the
// HSM, which it otherwise refuses; it is for tests only. allow_tcp_admin
// lets the config load with Caddy's admin endpoint on TCP, which otherwise
// fails it (see hsm.App.AllowTCPAdmin).
func parseHSM(d *caddyfile.Dispenser, existing any) (any, error) {
	app := new(hsm.App)
	if existing != nil {
		if err := json.Unmarshal(existing.(httpcaddyfile.App).Value, app); err != nil {
			return nil, err
		}
	}
	if app.Backends == nil {
		app.Backends = make(map[string]*hsm.Config)
	}
	d.Next() // consume the option name
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if d.Val() == "allow_tcp_admin" {
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			app.AllowTCPAdmin = true
			continue
		}
		if d.Val() != "pkcs11" {
			return nil, d.Errf("unrecognized hsm option %q (want pkcs11 or allow_tcp_admin)", d.Val())
		}
		var name string
		if !d.Args(&name) {
			return nil, d.Err("pkcs11 needs a backend name")
		}
		if d.NextArg() {
			return nil, d.ArgErr()
		}
		if _, dup := app.Backends[name]; dup {
			return nil, d.Errf("hsm backend %q is defined twice", name)
		}
		cfg, err := parsePKCS11(d)
		if err != nil {
			return nil, err
		}
		app.Backends[name] = cfg
	}
	return httpcaddyfile.App{Name: "hsm", Value: caddyconfig.JSON(app, nil)}, nil
}

func parsePKCS11(d *caddyfile.Dispenser) (*hsm.Config, error) {
	cfg := new(hsm.Config)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		switch opt {
		case "no_login", "allow_exportable_keys":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			if opt == "no_login" {
				cfg.NoLogin = true
			} else {
				cfg.AllowExportableKeys = true
			}
			continue
		case "pin_refused_codes":
			codes := d.RemainingArgs()
			if len(codes) == 0 {
				return nil, d.ArgErr()
			}
			cfg.PINRefusedCodes = append(cfg.PINRefusedCodes, codes...)
			continue
		case "env":
			var k, v string
			if !d.AllArgs(&k, &v) {
				return nil, d.ArgErr()
			}
			if cfg.Env == nil {
				cfg.Env = make(map[string]string)
			}
			cfg.Env[k] = v
			continue
		}
		var val string
		if !d.AllArgs(&val) {
			return nil, d.ArgErr()
		}
		switch opt {
		case "module":
			cfg.Module = val
		case "token":
			cfg.Token = val
		case "serial":
			cfg.Serial = val
		case "slot_id":
			n, err := strconv.ParseUint(val, 10, 0)
			if err != nil {
				return nil, d.Errf("slot_id %q: %v", val, err)
			}
			slot := uint(n)
			cfg.SlotID = &slot
		case "pin":
			cfg.PIN = val
		case "iv":
			cfg.IVMode = val
		case "init_args":
			cfg.InitArgs = val
		case "kwp_mechanism":
			if _, err := hsm.ParseMechanism(val); err != nil {
				return nil, d.Errf("kwp_mechanism: %v", err)
			}
			cfg.KWPMechanism = val
		case "max_sessions":
			n, err := intArg(d, opt, val)
			if err != nil {
				return nil, err
			}
			cfg.MaxSessions = n
		case "private_keys":
			b, err := strconv.ParseBool(val)
			if err != nil {
				return nil, d.Errf("private_keys %q: %v", val, err)
			}
			cfg.PrivateKeys = &b
		case "session_wait", "call_timeout", "health_ttl":
			dur, err := durationArg(d, opt, val)
			if err != nil {
				return nil, err
			}
			switch opt {
			case "session_wait":
				cfg.SessionWait = dur
			case "call_timeout":
				cfg.CallTimeout = dur
			case "health_ttl":
				cfg.HealthTTL = dur
			}
		default:
			return nil, d.Errf("unrecognized pkcs11 option %q", opt)
		}
	}
	return cfg, nil
}

// parseXKS sets up the xks handler. Syntax:
//
//	xks [<matcher>] {
//		max_request_body <bytes>
//		max_concurrent_streams <n>
//		ready_path       <path>
//		hostnames        <name>...
//		usage_flush_interval <duration>
//		key_store <uri path> {
//			hsm                 <backend> [<backend>...]
//			region              <aws region>
//			credential          <access key id> <{env.VAR} or {file./path}>
//			keys                <external key id>...|*
//			disable             <external key id>...
//			ciphertext_metadata <base64>
//			aad_framing         spec|aws_sample
//			fleet_size          <n>
//			max_clock_skew      <duration>
//			deadline            <duration>
//			rate_limit          <requests per second> [<burst>]
//			max_concurrent      <n>
//			allow_plain_http
//			versions <external key id> {
//				version <n> [<hsm key label>] [disabled]
//				current <n>
//			}
//			encrypt_limit       <n>
//			usage_warnings      <fraction>...
//			authorize {
//				deny  <rule name> <CEL expression>
//				allow <rule name> <CEL expression>
//			}
//		}
//	}
//
// The uri path is the key store's XksProxyUriPath, e.g. /demo/kms/xks/v1;
// the /kms/xks/v1 suffix may be left out. credential may be repeated (to
// rotate), as may keys and disable. versions lists an external key's
// versions beyond version 1 (the HSM key labelled as the key id), once per
// key; see xkshandler.KeyVersions.
func parseXKS(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(xkshandler.Handler)
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
		case "ready_path":
			if !h.AllArgs(&handler.ReadyPath) {
				return nil, h.ArgErr()
			}
		case "hostnames":
			names := h.RemainingArgs()
			if len(names) == 0 {
				return nil, h.ArgErr()
			}
			handler.Hostnames = append(handler.Hostnames, names...)
		case "usage_flush_interval":
			var val string
			if !h.AllArgs(&val) {
				return nil, h.ArgErr()
			}
			dur, err := durationArg(h.Dispenser, "usage_flush_interval", val)
			if err != nil {
				return nil, err
			}
			handler.UsageFlushInterval = dur
		case "key_store":
			ks, err := parseKeyStore(h.Dispenser)
			if err != nil {
				return nil, err
			}
			handler.KeyStores = append(handler.KeyStores, ks)
		default:
			return nil, h.Errf("unrecognized xks option %q", h.Val())
		}
	}
	return handler, nil
}

func parseKeyStore(d *caddyfile.Dispenser) (*xkshandler.KeyStore, error) {
	var path string
	if !d.Args(&path) {
		return nil, d.Err("key_store needs its URI path, e.g. /demo/kms/xks/v1")
	}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	ks := &xkshandler.KeyStore{URIPath: xkshandler.CompleteURIPath(path)}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		args := d.RemainingArgs()
		if handled, err := parseKeyStoreCommon(d, opt, args, &ks.Limits, &ks.Authorize); handled || err != nil {
			if err != nil {
				return nil, err
			}
			continue
		}
		switch opt {
		case "allow_plain_http":
			if len(args) != 0 {
				return nil, d.ArgErr()
			}
			ks.AllowPlainHTTP = true
		case "versions":
			if len(args) != 1 {
				return nil, d.Err("versions takes the external key id, then a block of its versions")
			}
			kv, err := parseVersions(d, args[0])
			if err != nil {
				return nil, err
			}
			ks.Versions = append(ks.Versions, kv)
		case "encrypt_limit":
			if len(args) != 1 {
				return nil, d.ArgErr()
			}
			n, err := strconv.ParseUint(args[0], 10, 64)
			if err != nil || n == 0 {
				return nil, d.Errf("encrypt_limit %q: want a whole number above 0", args[0])
			}
			ks.EncryptLimit = n
		case "usage_warnings":
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			for _, a := range args {
				f, err := strconv.ParseFloat(a, 64)
				if err != nil {
					return nil, d.Errf("usage_warnings %q: %v", a, err)
				}
				ks.UsageWarnings = append(ks.UsageWarnings, f)
			}
		case "hsm":
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			ks.HSM = append(ks.HSM, args...)
		case "keys":
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			ks.Keys = append(ks.Keys, args...)
		case "disable":
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			ks.DisabledKeys = append(ks.DisabledKeys, args...)
		case "credential":
			if len(args) != 2 {
				return nil, d.Err("credential takes an access key id and a secret placeholder")
			}
			ks.Credentials = append(ks.Credentials, xkshandler.Credential{AccessKeyID: args[0], SecretAccessKey: args[1]})
		case "region", "ciphertext_metadata", "aad_framing", "fleet_size", "max_clock_skew":
			if len(args) != 1 {
				return nil, d.ArgErr()
			}
			val := args[0]
			switch opt {
			case "region":
				ks.Region = val
			case "ciphertext_metadata":
				ks.CiphertextMetadata = val
			case "aad_framing":
				ks.AADFraming = val
			case "fleet_size":
				n, err := intArg(d, opt, val)
				if err != nil {
					return nil, err
				}
				ks.FleetSize = n
			case "max_clock_skew":
				dur, err := durationArg(d, opt, val)
				if err != nil {
					return nil, err
				}
				ks.MaxClockSkew = dur
			}
		default:
			return nil, d.Errf("unrecognized key_store option %q", opt)
		}
	}
	return ks, nil
}

// parseVersions reads a versions block:
//
//	version <n> [<hsm key label>] [disabled]
//	current <n>
func parseVersions(d *caddyfile.Dispenser, key string) (xkshandler.KeyVersions, error) {
	kv := xkshandler.KeyVersions{Key: key}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		args := d.RemainingArgs()
		switch opt {
		case "version":
			if len(args) < 1 || len(args) > 3 {
				return kv, d.Err("version takes its number, its HSM key label (not for version 1) and optionally disabled")
			}
			n, err := strconv.ParseUint(args[0], 10, 32)
			if err != nil {
				return kv, d.Errf("version %q: want a number from 1 to 4294967295", args[0])
			}
			v := xkshandler.KeyVersion{Version: uint32(n)}
			for _, a := range args[1:] {
				if a == "disabled" {
					v.Disabled = true
				} else {
					v.Label = a
				}
			}
			kv.Versions = append(kv.Versions, v)
		case "current":
			if len(args) != 1 {
				return kv, d.ArgErr()
			}
			n, err := strconv.ParseUint(args[0], 10, 32)
			if err != nil {
				return kv, d.Errf("current %q: want a version number", args[0])
			}
			kv.Current = uint32(n)
		default:
			return kv, d.Errf("unrecognized versions option %q", opt)
		}
	}
	return kv, nil
}

// parseAuthorize reads an authorize block: one rule per line,
//
//	allow|deny <name> <CEL expression>
//
// with the expression as one token (quote it with backticks).
func parseAuthorize(d *caddyfile.Dispenser) ([]authz.Rule, error) {
	var rules []authz.Rule
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		effect := d.Val()
		if effect != authz.EffectAllow && effect != authz.EffectDeny {
			return nil, d.Errf("authorize rule effect %q: want allow or deny", effect)
		}
		var name, expr string
		if !d.AllArgs(&name, &expr) {
			return nil, d.Errf("authorize: %s takes a rule name and one CEL expression (quote it with backticks)", effect)
		}
		rules = append(rules, authz.Rule{Name: name, Effect: effect, Expression: expr})
	}
	return rules, nil
}

// parseHandlerLimit reads the value of the option the dispenser is on,
// which both directives have: max_request_body (bytes) or
// max_concurrent_streams.
func parseHandlerLimit(d *caddyfile.Dispenser, maxBody *int64, streams *int) error {
	opt := d.Val()
	var val string
	if !d.AllArgs(&val) {
		return d.ArgErr()
	}
	if opt == "max_concurrent_streams" {
		n, err := intArg(d, opt, val)
		*streams = n
		return err
	}
	n, err := strconv.ParseInt(val, 10, 64)
	if err != nil {
		return d.Errf("max_request_body %q: %v", val, err)
	}
	*maxBody = n
	return nil
}

// intArg parses the whole-number value of option opt.
func intArg(d *caddyfile.Dispenser, opt, val string) (int, error) {
	n, err := strconv.Atoi(val)
	if err != nil {
		return 0, d.Errf("%s %q: %v", opt, val, err)
	}
	return n, nil
}

// durationArg parses the duration value of option opt, in Caddy's syntax.
func durationArg(d *caddyfile.Dispenser, opt, val string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(val)
	if err != nil {
		return 0, d.Errf("%s %q: %v", opt, val, err)
	}
	return caddy.Duration(dur), nil
}
