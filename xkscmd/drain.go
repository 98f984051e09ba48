package xkscmd

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-xks/caddy-xks/frontend"
)

// cmdDrain starts or stops draining the running proxy.
func cmdDrain(fl caddycmd.Flags, out io.Writer) (int, error) {
	method := http.MethodPost
	if fl.Bool("off") {
		method = http.MethodDelete
	}
	// As 'caddy reload' finds it: the address given, or the config's
	// admin listen address, or Caddy's default.
	addr, err := caddycmd.DetermineAdminAPIAddress(fl.String("address"), nil, fl.String("config"), fl.String("adapter"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	resp, err := caddycmd.AdminAPIRequest(addr, method, frontend.DrainPath, nil, nil)
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("asking the proxy at %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return caddy.ExitCodeFailedStartup, fmt.Errorf("the proxy at %s answered %s: %s", addr, resp.Status, body)
	}
	var state frontend.DrainState
	if err := json.NewDecoder(resp.Body).Decode(&state); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("reading the proxy's answer: %w", err)
	}
	if state.Draining {
		fmt.Fprintln(out, "draining: every XKS answer asks its client to close the connection, until the next config load or drain --off")
	} else {
		fmt.Fprintln(out, "not draining")
	}
	return caddy.ExitCodeSuccess, nil
}
