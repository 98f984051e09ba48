package frontend

import (
	"context"
	"net"
	"net/http"
	"slices"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// DefaultMaxConcurrentStreams is the streams an HTTP/2 connection of a
// server with a key store may have open at once. A request holds what the
// server and the proxy keep for it, about 12 KiB, until its body is read,
// and for XKS the body comes before the signature is checked: with Go's
// default of 250 streams, one connection of a client that knows only a key
// store's path held 3 MiB, where 32 streams hold some 400 KiB. The clouds
// give a call 250 ms, and the HSM serves max_sessions (32 by default) calls
// at once: a connection with more calls open than that could not have them
// all in the HSM anyway.
const DefaultMaxConcurrentStreams = 32

// streamsMu serializes limitStreams: the first connection of a server sets
// its HTTP/2 configuration, and every later one only reads it.
var streamsMu sync.Mutex

// ProvisionServer applies to the server a front end's handler is
// provisioned for (as Caddy's context says during provisioning) what a key
// store's site needs of it: at most streams concurrent HTTP/2 streams per
// connection, and a warning if it offers HTTP/3, which client (the cloud
// service calling frontEnd's key stores, e.g. "KMS" for "XKS") never uses.
func ProvisionServer(ctx caddy.Context, streams int, frontEnd, client string, logger *zap.Logger) {
	endDrain(logger)
	srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok {
		return
	}
	limitHTTP2Streams(srv, streams)
	warnOfHTTP3(srv, frontEnd, client, logger)
}

// limitHTTP2Streams makes the HTTP/2 connections of srv advertise at most
// n concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS); a client that
// opens more has them reset. Caddy (v2.11) has no setting for it: its
// HTTP/2 server takes the limit from the http.Server's HTTP2 configuration
// when a connection starts, and the http.Server exists only once the
// server starts, so the limit is set there by the first connection, through
// a ConnContext hook. Several handlers on one server: the smallest limit
// applies.
func limitHTTP2Streams(srv *caddyhttp.Server, n int) {
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

// warnOfHTTP3 logs a warning when srv offers HTTP/3, as Caddy's servers do
// unless told otherwise. KMS calls over HTTP/1.1 and HTTP/2 only, Managed
// HSM over HTTP/1.1, and Caddy's HTTP/3 accepts 0-RTT by default: anyone on
// the network path can replay a request sent as early data, without
// breaking TLS.
func warnOfHTTP3(srv *caddyhttp.Server, frontEnd, client string, logger *zap.Logger) {
	offered := srv.Protocols == nil || slices.Contains(srv.Protocols, "h3")
	for _, p := range srv.ListenProtocols {
		offered = offered || slices.Contains(p, "h3")
	}
	if !offered {
		return
	}
	zeroRTT := srv.Allow0RTT == nil || *srv.Allow0RTT
	logger.Warn("the server of the "+frontEnd+" key stores offers HTTP/3, which "+client+" never uses; "+
		"set protocols h1 h2 in the servers global option, as Caddyfile.example does",
		zap.String("server", srv.Name()), zap.Bool("accepts_0rtt_requests", zeroRTT))
}
