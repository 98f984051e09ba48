package xkshandler

import (
	"context"
	"net"
	"net/http"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// defaultMaxConcurrentStreams is the streams an HTTP/2 connection of a
// server with a key store may have open at once. A request holds what the
// server and the proxy keep for it, about 12 KiB, until its body is read,
// and the body comes before the signature is checked: with Go's default of
// 250 streams, one connection of a client that knows only a key store's
// path held 3 MiB, where 32 streams hold some 400 KiB. KMS has a call
// answered in 250 ms, and the HSM serves max_sessions (32 by default) calls
// at once; a connection with more calls waiting gains nothing.
const defaultMaxConcurrentStreams = 32

// streamsMu serializes limitStreams: the first connection of a server sets
// its HTTP/2 configuration, and every later one only reads it.
var streamsMu sync.Mutex

// limitHTTP2Streams makes the HTTP/2 connections of the server the handler
// is provisioned for advertise at most n concurrent streams
// (SETTINGS_MAX_CONCURRENT_STREAMS); a client that opens more has them
// reset. Caddy (v2.11) has no setting for it: its HTTP/2 server takes the
// limit from the http.Server's HTTP2 configuration when a connection
// starts, and the http.Server exists only once the server starts, so the
// limit is set there by the first connection, through a ConnContext hook.
// Several handlers on one server: the smallest limit applies.
func limitHTTP2Streams(ctx caddy.Context, n int) {
	srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok {
		return
	}
	srv.RegisterConnContext(func(c context.Context, _ net.Conn) context.Context {
		if hs, ok := c.Value(http.ServerContextKey).(*http.Server); ok {
			limitStreams(hs, n)
		}
		return c
	})
}

// limitStreams lowers the streams an http.Server's HTTP/2 connections
// allow to n. It writes the configuration only while no connection has
// started: every connection passes here, under streamsMu, before its
// HTTP/2 server reads it, and once the limit is in place nothing writes.
func limitStreams(hs *http.Server, n int) {
	streamsMu.Lock()
	defer streamsMu.Unlock()
	if hs.HTTP2 != nil && hs.HTTP2.MaxConcurrentStreams > 0 && hs.HTTP2.MaxConcurrentStreams <= n {
		return
	}
	var conf http.HTTP2Config
	if hs.HTTP2 != nil {
		conf = *hs.HTTP2
	}
	conf.MaxConcurrentStreams = n
	hs.HTTP2 = &conf
}
