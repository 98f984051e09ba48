package caddyfile

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// option is one line of a Caddyfile block: the number of arguments it
// takes and what it does with them.
type option struct {
	// minArgs and maxArgs bound the arguments on the line; maxArgs -1 is
	// any number.
	minArgs, maxArgs int
	// usage is the error for another number of arguments; "" is Caddy's
	// "wrong argument count".
	usage string
	// set applies the arguments; it may read a block of its own.
	set func(d *caddyfile.Dispenser, name string, args []string) error
}

// parseOptions reads the block d is at the start of, one option a line,
// each with the arguments on its line, and refuses an option that opts
// does not name: "unrecognized <block> option".
func parseOptions(d *caddyfile.Dispenser, block string, opts map[string]option) error {
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		o, ok := opts[name]
		if !ok {
			return d.Errf("unrecognized %s option %q", block, name)
		}
		args := d.RemainingArgs()
		if len(args) < o.minArgs || o.maxArgs >= 0 && len(args) > o.maxArgs {
			if o.usage != "" {
				return d.Err(o.usage)
			}
			return d.ArgErr()
		}
		if err := o.set(d, name, args); err != nil {
			return err
		}
	}
	return nil
}

// flagOption is an option without arguments that sets *p.
func flagOption(p *bool) option {
	return option{set: func(*caddyfile.Dispenser, string, []string) error {
		*p = true
		return nil
	}}
}

// stringOption takes one argument into *p.
func stringOption(p *string) option {
	return option{minArgs: 1, maxArgs: 1, set: func(_ *caddyfile.Dispenser, _ string, args []string) error {
		*p = args[0]
		return nil
	}}
}

// listOption takes one or more arguments, added to *p; the option may be
// repeated.
func listOption(p *[]string) option {
	return option{minArgs: 1, maxArgs: -1, set: func(_ *caddyfile.Dispenser, _ string, args []string) error {
		*p = append(*p, args...)
		return nil
	}}
}

// intOption takes one whole number into *p.
func intOption(p *int) option {
	return option{minArgs: 1, maxArgs: 1, set: func(d *caddyfile.Dispenser, name string, args []string) (err error) {
		*p, err = intArg(d, name, args[0])
		return err
	}}
}

// durationOption takes one duration, in Caddy's syntax, into *p.
func durationOption(p *caddy.Duration) option {
	return option{minArgs: 1, maxArgs: 1, set: func(d *caddyfile.Dispenser, name string, args []string) (err error) {
		*p, err = durationArg(d, name, args[0])
		return err
	}}
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
