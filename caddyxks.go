// Package caddyxks registers every caddy-xks module with Caddy, so that
//
//	xcaddy build --with github.com/caddy-xks/caddy-xks
//
// (or the repository's xcaddy.json) gives a caddy binary that serves the AWS
// KMS External Key Store proxy API and the Azure Managed HSM External Key
// Management proxy API from an HSM over PKCS#11.
package caddyxks

import (
	_ "github.com/caddy-xks/caddy-xks/caddyfile"
	_ "github.com/caddy-xks/caddy-xks/ekmhandler"
	_ "github.com/caddy-xks/caddy-xks/hsm"
	_ "github.com/caddy-xks/caddy-xks/tlscheck"
	_ "github.com/caddy-xks/caddy-xks/xkscmd"
	_ "github.com/caddy-xks/caddy-xks/xkshandler"
)
