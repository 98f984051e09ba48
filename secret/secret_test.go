package secret

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestIsPlaceholder(t *testing.T) {
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
		if got := IsPlaceholder(s); got != want {
			t.Errorf("IsPlaceholder(%q) = %v, want %v", s, got, want)
		}
	}
}

// TestResolve: a placeholder gives the secret; a literal is refused
// without being returned, and a placeholder that does not resolve is an
// error that names it and holds no value.
func TestResolve(t *testing.T) {
	t.Setenv("SECRET_TEST_VALUE", "s3cret-from-env")
	t.Setenv("SECRET_TEST_EMPTY", "")
	file := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(file, []byte("s3cret-from-file"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, ref, want string
		wantErr         error
		errHas          string
	}{
		{name: "an env placeholder", ref: "{env.SECRET_TEST_VALUE}", want: "s3cret-from-env"},
		{name: "a file placeholder", ref: "{file." + file + "}", want: "s3cret-from-file"},
		{name: "a literal is refused", ref: "s3cret-literal", wantErr: ErrLiteral},
		{name: "a literal around a placeholder is refused", ref: "x{env.SECRET_TEST_VALUE}", wantErr: ErrLiteral},
		{name: "Caddyfile's {$VAR} is refused: it lands in the JSON", ref: "{$SECRET_TEST_VALUE}", wantErr: ErrLiteral},
		{name: "an empty variable is an error", ref: "{env.SECRET_TEST_EMPTY}", errHas: "SECRET_TEST_EMPTY"},
		{name: "a missing file is an error", ref: "{file." + file + ".missing}", errHas: "secret.missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Resolve(tt.ref)
			switch {
			case tt.wantErr != nil:
				if !errors.Is(err, tt.wantErr) || got != "" {
					t.Fatalf("Resolve(%q) = %q, %v; want %v", tt.ref, got, err, tt.wantErr)
				}
			case tt.errHas != "":
				if err == nil || !strings.Contains(err.Error(), tt.errHas) || got != "" {
					t.Fatalf("Resolve(%q) = %q, %v; want an error naming %s", tt.ref, got, err, tt.errHas)
				}
			default:
				if err != nil || got != tt.want {
					t.Fatalf("Resolve(%q) = %q, %v; want %q", tt.ref, got, err, tt.want)
				}
			}
			if err != nil && strings.Contains(err.Error(), "s3cret") {
				t.Fatalf("the error shows a secret: %v", err)
			}
		})
	}
}
