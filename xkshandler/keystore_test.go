package xkshandler

import (
	"errors"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/secret"
)

// TestCredentialResolve: a credential's secret comes only from its
// placeholder; the access key id may be one or be written out.
func TestCredentialResolve(t *testing.T) {
	const akid, key = "AKIAIOSFODNN7EXAMPLE2345", "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE" //nolint:gosec // test values
	t.Setenv("XKS_TEST_AKID", akid)
	t.Setenv("XKS_TEST_SECRET", key)
	env := func(name string) string { return "{env." + name + "}" }
	tests := []struct {
		name    string
		c       Credential
		wantErr error
		errHas  string
	}{
		{name: "both from placeholders", c: Credential{AccessKeyID: env("XKS_TEST_AKID"), SecretAccessKey: env("XKS_TEST_SECRET")}},
		{name: "an access key id written out", c: Credential{AccessKeyID: akid, SecretAccessKey: env("XKS_TEST_SECRET")}},
		{name: "a secret written out is refused", c: Credential{AccessKeyID: akid, SecretAccessKey: key}, wantErr: secret.ErrLiteral},
		{name: "an unset secret variable", c: Credential{AccessKeyID: akid, SecretAccessKey: env("XKS_TEST_UNSET")}, errHas: "XKS_TEST_UNSET"},
		{name: "an unset access key id variable", c: Credential{AccessKeyID: env("XKS_TEST_UNSET"), SecretAccessKey: env("XKS_TEST_SECRET")}, errHas: "XKS_TEST_UNSET"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.c.Resolve()
			switch {
			case tt.wantErr != nil || tt.errHas != "":
				if err == nil || tt.wantErr != nil && !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.errHas) {
					t.Fatalf("err = %v, want %v %q", err, tt.wantErr, tt.errHas)
				}
				if strings.Contains(err.Error(), key) {
					t.Fatalf("the error shows the secret: %v", err)
				}
			case err != nil || got.AccessKeyID != akid || got.SecretAccessKey != key:
				t.Fatalf("Resolve() = %s, %v", got.AccessKeyID, err)
			}
		})
	}
}
