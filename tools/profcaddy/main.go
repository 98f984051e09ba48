// Command profcaddy is cmd/caddy with the runtime's block and mutex
// profiles switched on, for scripts/profile.sh: Caddy's admin endpoint
// serves /debug/pprof/block and /debug/pprof/mutex, but they stay empty
// unless the process sets a sampling rate, which Caddy does not. Sampling
// costs a little on every blocking event, so production builds leave it
// off; this binary is for measuring only.
package main

import (
	"runtime"
	_ "time/tzdata"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-xks/caddy-xks"
)

func main() {
	// One blocking event sampled per 10 µs blocked, one mutex contention
	// event in 10: enough to see what the slowest calls wait for.
	runtime.SetBlockProfileRate(10_000)
	runtime.SetMutexProfileFraction(10)
	caddycmd.Main()
}
