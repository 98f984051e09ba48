// Package caddyfile gives caddy-xks its Caddyfile syntax: the global "hsm"
// option, which defines named PKCS#11 backends (the hsm app), the "xks"
// handler directive, which serves AWS KMS external key stores from them,
// and the "azure_ekm" handler directive, which serves Azure Managed HSM's
// external keys from them.
package caddyfile

import (
	"encoding/json"
	"maps"
	"strconv"

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
	err := parseOptions(d, "pkcs11", map[string]option{
		"module":                stringOption(&cfg.Module),
		"token":                 stringOption(&cfg.Token),
		"serial":                stringOption(&cfg.Serial),
		"pin":                   stringOption(&cfg.PIN),
		"iv":                    stringOption(&cfg.IVMode),
		"init_args":             stringOption(&cfg.InitArgs),
		"no_login":              flagOption(&cfg.NoLogin),
		"allow_exportable_keys": flagOption(&cfg.AllowExportableKeys),
		"pin_refused_codes":     listOption(&cfg.PINRefusedCodes),
		"max_sessions":          intOption(&cfg.MaxSessions),
		"session_wait":          durationOption(&cfg.SessionWait),
		"call_timeout":          durationOption(&cfg.CallTimeout),
		"health_ttl":            durationOption(&cfg.HealthTTL),
		"slot_id": {minArgs: 1, maxArgs: 1, set: func(d *caddyfile.Dispenser, _ string, args []string) error {
			n, err := strconv.ParseUint(args[0], 10, 0)
			if err != nil {
				return d.Errf("slot_id %q: %v", args[0], err)
			}
			slot := uint(n)
			cfg.SlotID = &slot
			return nil
		}},
		"private_keys": {minArgs: 1, maxArgs: 1, set: func(d *caddyfile.Dispenser, _ string, args []string) error {
			b, err := strconv.ParseBool(args[0])
			if err != nil {
				return d.Errf("private_keys %q: %v", args[0], err)
			}
			cfg.PrivateKeys = &b
			return nil
		}},
		"kwp_mechanism": {minArgs: 1, maxArgs: 1, set: func(d *caddyfile.Dispenser, _ string, args []string) error {
			if _, err := hsm.ParseMechanism(args[0]); err != nil {
				return d.Errf("kwp_mechanism: %v", err)
			}
			cfg.KWPMechanism = args[0]
			return nil
		}},
		"env": {minArgs: 2, maxArgs: 2, set: func(_ *caddyfile.Dispenser, _ string, args []string) error {
			if cfg.Env == nil {
				cfg.Env = make(map[string]string)
			}
			cfg.Env[args[0]] = args[1]
			return nil
		}},
	})
	return cfg, err
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
	opts := handlerLimitOptions(&handler.MaxRequestBody, &handler.MaxConcurrentStreams)
	opts["ready_path"] = stringOption(&handler.ReadyPath)
	opts["hostnames"] = listOption(&handler.Hostnames)
	opts["usage_flush_interval"] = durationOption(&handler.UsageFlushInterval)
	opts["key_store"] = option{maxArgs: -1, set: func(d *caddyfile.Dispenser, _ string, args []string) error {
		switch {
		case len(args) == 0:
			return d.Err("key_store needs its URI path, e.g. /demo/kms/xks/v1")
		case len(args) > 1:
			return d.ArgErr()
		}
		ks, err := parseKeyStore(d, args[0])
		handler.KeyStores = append(handler.KeyStores, ks)
		return err
	}}
	return handler, parseOptions(h.Dispenser, "xks", opts)
}

func parseKeyStore(d *caddyfile.Dispenser, path string) (*xkshandler.KeyStore, error) {
	ks := &xkshandler.KeyStore{URIPath: xkshandler.CompleteURIPath(path)}
	opts := keyStoreCommonOptions(&ks.Limits, &ks.Authorize)
	maps.Copy(opts, map[string]option{
		"hsm":                 listOption(&ks.HSM),
		"keys":                listOption(&ks.Keys),
		"disable":             listOption(&ks.DisabledKeys),
		"region":              stringOption(&ks.Region),
		"ciphertext_metadata": stringOption(&ks.CiphertextMetadata),
		"aad_framing":         stringOption(&ks.AADFraming),
		"fleet_size":          intOption(&ks.FleetSize),
		"max_clock_skew":      durationOption(&ks.MaxClockSkew),
		"allow_plain_http":    flagOption(&ks.AllowPlainHTTP),
		"credential": {minArgs: 2, maxArgs: 2, usage: "credential takes an access key id and a secret placeholder",
			set: func(_ *caddyfile.Dispenser, _ string, args []string) error {
				ks.Credentials = append(ks.Credentials, xkshandler.Credential{AccessKeyID: args[0], SecretAccessKey: args[1]})
				return nil
			}},
		"encrypt_limit": {minArgs: 1, maxArgs: 1, set: func(d *caddyfile.Dispenser, _ string, args []string) error {
			n, err := strconv.ParseUint(args[0], 10, 64)
			if err != nil || n == 0 {
				return d.Errf("encrypt_limit %q: want a whole number above 0", args[0])
			}
			ks.EncryptLimit = n
			return nil
		}},
		"usage_warnings": {minArgs: 1, maxArgs: -1, set: func(d *caddyfile.Dispenser, _ string, args []string) error {
			for _, a := range args {
				f, err := strconv.ParseFloat(a, 64)
				if err != nil {
					return d.Errf("usage_warnings %q: %v", a, err)
				}
				ks.UsageWarnings = append(ks.UsageWarnings, f)
			}
			return nil
		}},
		"versions": {minArgs: 1, maxArgs: 1, usage: "versions takes the external key id, then a block of its versions",
			set: func(d *caddyfile.Dispenser, _ string, args []string) error {
				kv, err := parseVersions(d, args[0])
				ks.Versions = append(ks.Versions, kv)
				return err
			}},
	})
	return ks, parseOptions(d, "key_store", opts)
}

// parseVersions reads a versions block:
//
//	version <n> [<hsm key label>] [disabled]
//	current <n>
func parseVersions(d *caddyfile.Dispenser, key string) (xkshandler.KeyVersions, error) {
	kv := xkshandler.KeyVersions{Key: key}
	err := parseOptions(d, "versions", map[string]option{
		"version": {minArgs: 1, maxArgs: 3, usage: "version takes its number, its HSM key label (not for version 1) and optionally disabled",
			set: func(d *caddyfile.Dispenser, _ string, args []string) error {
				n, err := strconv.ParseUint(args[0], 10, 32)
				if err != nil {
					return d.Errf("version %q: want a number from 1 to 4294967295", args[0])
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
				return nil
			}},
		"current": {minArgs: 1, maxArgs: 1, set: func(d *caddyfile.Dispenser, _ string, args []string) error {
			n, err := strconv.ParseUint(args[0], 10, 32)
			if err != nil {
				return d.Errf("current %q: want a version number", args[0])
			}
			kv.Current = uint32(n)
			return nil
		}},
	})
	return kv, err
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
