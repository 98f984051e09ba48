package hsm

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/faultshim"
)

// TestLiteralPINIsRefusedBeforeTheTokenIsOpened: a config whose pin is the
// PIN itself, not a placeholder, fails to load without a session opened or
// a C_Login tried, which would cost an attempt toward the HSM's lockout.
// The fault shim in front of SoftHSM2 counts the calls; a pin placeholder
// shows that it sees the login when there is one.
func TestLiteralPINIsRefusedBeforeTheTokenIsOpened(t *testing.T) {
	tk := hsmtest.NewToken(t)
	t.Setenv("HSMTEST_PIN", tk.PIN)
	tests := []struct {
		name, pin, wantErr string
		logins             int
	}{
		{name: "a literal pin", pin: tk.PIN, wantErr: `hsm backend "primary": pin must be an {env.*} or {file.*} placeholder`},
		{name: "a placeholder of an unset variable", pin: "{env.HSMTEST_NO_SUCH_VAR}", wantErr: "HSMTEST_NO_SUCH_VAR"},
		{name: "a pin placeholder", pin: "{env.HSMTEST_PIN}", logins: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			faults := faultshim.New(t, tk.Module)
			cfg, _ := json.Marshal(map[string]any{
				"admin": map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
				"apps": map[string]any{"hsm": map[string]any{"backends": map[string]any{
					"primary": map[string]any{"module": faults.Path, "token": tk.Label, "pin": tt.pin, "iv": "caller"},
				}}},
			})
			err := caddy.Load(cfg, true)
			t.Cleanup(func() { _ = caddy.Stop() })
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("load: %v, want %q", err, tt.wantErr)
			}
			if err != nil && strings.Contains(err.Error(), tk.PIN) {
				t.Fatalf("the error shows the PIN: %v", err)
			}
			if n := faults.Calls("C_Login"); n != tt.logins {
				t.Errorf("%d C_Login calls, want %d", n, tt.logins)
			}
			if tt.logins == 0 && faults.Calls("C_OpenSession") != 0 {
				t.Errorf("%d sessions opened for a config that cannot load", faults.Calls("C_OpenSession"))
			}
		})
	}
}
