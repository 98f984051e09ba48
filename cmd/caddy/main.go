// Command caddy is Caddy with the caddy-xks modules compiled in, and the
// Redis storage module a fleet shares its certificates through. It is the
// plain `go build` entry; release builds use the xcaddy manifest
// (xcaddy.json) instead, which produces the same modules.
package main

import (
	_ "time/tzdata"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/pberkel/caddy-storage-redis"

	_ "github.com/caddy-xks/caddy-xks"
)

func main() {
	caddycmd.Main()
}
