package placeholder

import "testing"

func TestIsSecretReference(t *testing.T) {
	for s, want := range map[string]bool{
		"{env.XKS_SECRET}":        true,
		"{file./etc/xks/secret}":  true,
		"FYtE5EFA5FT0mCc3DrGUe2s": false,
		"":                        false,
		"{$XKS_SECRET}":           false,
		"{system.hostname}":       false,
		"{env.A}{env.B}":          false,
		"prefix{env.A}":           false,
		"{env.A}suffix":           false,
	} {
		if got := IsSecretReference(s); got != want {
			t.Errorf("IsSecretReference(%q) = %v, want %v", s, got, want)
		}
	}
}
