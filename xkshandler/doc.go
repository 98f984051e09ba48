// Package xkshandler is the Caddy HTTP handler http.handlers.xks: it serves
// the AWS KMS XKS Proxy API v1 (GetHealthStatus, GetKeyMetadata, Encrypt and
// Decrypt) for one or more external key stores, each under its own URI path
// with its own SigV4 credentials, HSM backends and allow-list of keys.
//
// # The request path
//
// Handler.ServeHTTP takes every call through seven steps, in this order; a
// step that fails ends the call with the XKS error named, as XKS JSON with
// the spec's status (package xksapi; errors.go):
//
//  1. Route: the raw path, exactly as on the request line
//     (sigv4auth.RawPath), must be {key store's URI path}/health or
//     .../keys/{externalKeyId}/{metadata|encrypt|decrypt}, else 404
//     InvalidUriPathException, before any authentication; a method other
//     than POST gets 405 (Handler.route, route.go).
//  2. Authenticate: the body, read up to max_request_body (else
//     UnsupportedOperationException), must carry a valid SigV4 signature
//     over that same path, else 401 AuthenticationFailedException
//     (KeyStore.verifier, package sigv4auth).
//  3. Validate: the body must be exactly one JSON object with the fields of
//     the operation, in strict standard Base64, within the spec's limits,
//     else 400 ValidationException (an AAD too long for the HSM's framing:
//     UnsupportedOperationException) (decodeRequest, request.go).
//  4. Allow-list: the external key id must be one of the key store's keys,
//     and never the HSM label of a key's version 2 or later, else 404
//     KeyNotFoundException (KeyStore.allows, keystore.go).
//  5. Authorize: the key store's policy must allow the call, given its
//     requestMetadata, else 403 AccessDeniedException (KeyStore.authorize,
//     package authz). A disabled key then gets InvalidStateException for
//     Encrypt and Decrypt, and the key store's quota and bound on concurrent
//     work ThrottlingException (admitKeyCall). GetHealthStatus skips steps 4
//     and 5.
//  6. HSM: the operation runs on the first available backend within the
//     key store's deadline, never on one the key check found holding
//     another key under the label (operations.go; frontend.KeyCheck with
//     keycheck.go's proof); hsm errors
//     map to XKS errors by the spec's table (fromHSM, errors.go).
//  7. Answer: compact JSON (Handler.respond), one audit line
//     (exchange.log) and the metrics (exchange.observe, metrics.go).
//
// # Where each rule lives
//
//	the spec's sizes and limits      package xksapi (limits.go), shared with the hsm layer and caddy xks check
//	error names and their statuses   package xksapi (errors.go), shared with caddy xks check and bench
//	a failed call, fromHSM           errors.go (xksError, the hsm error kinds to XKS errors)
//	URI path and key id syntax       route.go (APIPathSuffix, uriPathPattern, validKeyID); CompleteURIPath, keystore.go
//	the raw path, SigV4              package sigv4auth (RawPath, Verifier)
//	secrets from the config          package secret (Resolve); Credential.Resolve, keystore.go
//	configuration rules              KeyStore.validate, Handler.Validate; defaults in the Provision methods
//	calls only over TLS              handler.go (serve, 403 for a plain request); plainhttp.go: at load, a key store on a server without TLS fails unless allow_plain_http
//	the admin endpoint               package hsm (admin.go: refused on TCP, unless allowed)
//	reading a body (memory as bytes arrive) frontend.ReadBody; readBody, handler.go
//	request bodies                   request.go (strict decoding: frontend.DecodeObject)
//	the server of the key stores     frontend/server.go (HTTP/2 stream limit, HTTP/3 warning)
//	secondary authorization          package authz; KeyStore.authorize
//	quota, concurrency, deadline     frontend.Limits; KeyStore.admit, keystore.go, answers ThrottlingException
//	the AAD given to the HSM, CDIV   framing.go
//	the four operations, failover    operations.go
//	key labels across backends       keycheck.go (the proof, key versions), frontend/keycheck.go (duplicates, the same key on every backend, the health age)
//	key versions, version metadata   versions.go
//	usage counts and encrypt limits  usage.go (one record per process and HSM key label, summed across a fleet through Caddy's storage, saturating)
//	the usage counters' storage      storage.go (a storage of their own, which a config unload does not close)
//	readiness for a load balancer    Handler.ready, handler.go (ready_path); the certificates it waits for, plainhttp.go; drain and shutdown, frontend/leave.go
//	per-call state, audit, metrics   exchange.go, metrics.go (frontend.AuditLine, RequestMetrics)
//	xksProxyModel                    frontend/version.go
package xkshandler
