// Package secret is how caddy-xks takes a secret (an HSM PIN, a SigV4
// secret access key) from its configuration: as exactly one Caddy runtime
// placeholder of the env or file provider, {env.NAME} or {file./path},
// resolved when the configuration is loaded, so that the secret itself
// never appears in the JSON config that the admin API serves and autosave
// writes. A literal secret is refused before it is used: a PIN that is
// tried costs an attempt toward the HSM's lockout.
package secret

import (
	"errors"
	"fmt"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// ErrLiteral is Resolve's error for a value that is not one placeholder;
// it reads after the setting's name: "pin must be ...".
var ErrLiteral = errors.New("must be an {env.*} or {file.*} placeholder, so that it never appears in the config")

// IsPlaceholder reports whether s is exactly one {env.*} or {file.*}
// placeholder.
func IsPlaceholder(s string) bool {
	if !strings.HasPrefix(s, "{") || !strings.HasSuffix(s, "}") || strings.Count(s, "{") != 1 {
		return false
	}
	return strings.HasPrefix(s, "{env.") || strings.HasPrefix(s, "{file.")
}

// Resolve returns the secret that placeholder ref stands for. A ref that
// is not exactly one {env.*} or {file.*} placeholder is ErrLiteral, and an
// unset variable, an unreadable or empty file is an error too. Errors name
// the placeholder, never a value.
func Resolve(ref string) (string, error) {
	if !IsPlaceholder(ref) {
		return "", ErrLiteral
	}
	v, err := caddy.NewReplacer().ReplaceOrErr(ref, true, true)
	if err != nil {
		return "", fmt.Errorf("cannot be resolved: %w", err)
	}
	return v, nil
}
