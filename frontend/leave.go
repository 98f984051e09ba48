package frontend

import (
	"encoding/json"
	"net/http"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(drainAPI{})
}

// draining is true while this process is being drained: every answer of
// either front end then asks the client to close its connection, so that
// the clients a load balancer pinned to the instance move to others without
// a failed call. The next configuration load ends it, as does DELETE.
var draining atomic.Bool

// DrainPath is the admin API endpoint that drains the process: POST starts
// draining, DELETE ends it, GET tells whether it drains.
const DrainPath = "/xks/drain"

// drainAPI is the admin API module that serves DrainPath. Caddy loads
// every admin.api module with the admin endpoint, so it needs no config.
type drainAPI struct{}

// CaddyModule returns the Caddy module information.
func (drainAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.xks_drain",
		New: func() caddy.Module { return drainAPI{} },
	}
}

// Routes serves DrainPath.
func (drainAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: DrainPath, Handler: caddy.AdminHandlerFunc(serveDrain)}}
}

// DrainState is the answer of DrainPath.
type DrainState struct {
	// Draining is true while every answer asks its client to close the
	// connection.
	Draining bool `json:"draining"`
}

// serveDrain starts, ends or reports draining.
func serveDrain(w http.ResponseWriter, r *http.Request) error {
	switch r.Method {
	case http.MethodPost:
		if !draining.Swap(true) {
			caddy.Log().Named("frontend").Info("draining: every answer asks its client to close the connection, until the next config load")
		}
	case http.MethodDelete:
		if draining.Swap(false) {
			caddy.Log().Named("frontend").Info("draining ended")
		}
	case http.MethodGet:
	default:
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Message: "use POST to drain, DELETE to stop, GET to ask"}
	}
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(DrainState{Draining: draining.Load()})
}

// endDrain ends draining when a new configuration is loaded: a reload
// ends the maintenance that drained the instance.
func endDrain(logger *zap.Logger) {
	if draining.Swap(false) {
		logger.Info("draining ended by a config load")
	}
}

// ShuttingDown reports whether the server that received r is shutting
// down: stopping, and serving only for the http app's shutdown_delay.
func ShuttingDown(r *http.Request) bool {
	repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if !ok {
		return false
	}
	v, _ := repl.Get("http.shutting_down")
	down, _ := v.(bool)
	return down
}

// AskToLeave asks the client to take its next call elsewhere while the
// process drains or shuts down: the load balancer sends no new connections
// here then (it drains the instance, or the readiness probe said 503), and
// the clients' open connections must move too, before the instance stops
// or reloads, or the balancer gives up on it and cuts them. Over HTTP/1.1
// the connection closes after the answer; over HTTP/2 the server sends
// GOAWAY and closes it once it is idle. Call it before the answer's
// header is written.
func AskToLeave(w http.ResponseWriter, r *http.Request) {
	if draining.Load() || ShuttingDown(r) {
		w.Header().Set("Connection", "close")
	}
}

// Interface guards
var _ caddy.AdminRouter = drainAPI{}
