// Package placeholder recognises how caddy-xks configurations must carry
// secrets: as one Caddy runtime placeholder of the env or file provider,
// resolved when the config is loaded, so that the secret itself never
// appears in the JSON config that the admin API serves and autosave writes.
package placeholder

import "strings"

// IsSecretReference reports whether s is exactly one {env.*} or {file.*}
// placeholder.
func IsSecretReference(s string) bool {
	if !strings.HasPrefix(s, "{") || !strings.HasSuffix(s, "}") || strings.Count(s, "{") != 1 {
		return false
	}
	return strings.HasPrefix(s, "{env.") || strings.HasPrefix(s, "{file.")
}
