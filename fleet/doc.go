// Package fleet holds what a fleet of caddy-xks proxies needs beyond
// Caddyfile.example, and the test that runs one.
//
//   - storage-redis.caddyfile replaces the storage line of
//     Caddyfile.example: the instances share their certificate, its ACME
//     account and locks, and the key usage records through Redis.
//   - haproxy.cfg is the load balancer, standing for an AWS NLB: TCP
//     passthrough, and an HTTP check of each instance's ready_path.
//
// TestFleet runs three proxies (bin/caddy, the build of xcaddy.json) behind
// HAProxy, sharing Redis, with Pebble as the ACME CA, each on a host of its
// own: a network namespace that the test makes, on a bridge, with an
// address from 198.18.0.0/24 and no default route. The test itself runs in
// a network namespace of its own, which it proves has no route off the
// machine before it starts anything, so that a mistake in the test fails
// the test instead of reaching another machine. Its subtests are the
// properties a fleet must hold, each printing its figures:
//
//	T1   one ACME order for the fleet
//	T1b  the lock holder killed mid-order
//	T2   a renewal reaches every instance
//	T3   an instance lost under load (SIGTERM, SIGKILL, its link cut)
//	T4   a rolling reload, then a rolling restart
//	T5   Redis stopped, then frozen, under load
//	T6   a crashed holder's lock is taken over
//	T7   the fleet's key usage counts
//
// `make fleet` (scripts/fleet.sh) runs the same configuration on loopback
// for a person to try.
package fleet
