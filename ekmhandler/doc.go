// Package ekmhandler is the Caddy HTTP handler http.handlers.azure_ekm: it
// serves the Azure Managed HSM External Key Management (EKM) proxy API,
// v0.1-preview (info, metadata, wrapkey and unwrapkey), for one or more key
// stores, each under the path prefix of one EKM connection, with its own
// client certificate names and roots, HSM backends and allow-list of keys.
// It is the second front end over the hsm app's backends, beside
// xkshandler; what the two share is package frontend's.
//
// # The request path
//
// Handler.ServeHTTP takes every call through these steps, in this order; a
// step that fails ends the call with the ProxyError named, as JSON with
// its status (ekmapi.StatusOf):
//
//  1. Route: the raw path, exactly as on the request line
//     (sigv4auth.RawPath), must be {prefix}/info or {prefix}/{key
//     name}/{metadata|wrapkey|unwrapkey} with the prefix of a key store,
//     matched exactly, else 404 NotFound; a method other than POST gets 405
//     MethodNotAllowed (route.go).
//  2. Authenticate: mutual TLS only. The client certificate must chain to
//     the key store's client_roots for client authentication and carry one
//     of its client_subjects as subject CN, else 401 Unauthorized: the
//     roots are Microsoft's, shared by every Managed HSM, and never
//     authorize alone (KeyStore.authenticate, keystore.go).
//  3. Validate: exactly one api-version query parameter of a supported
//     version, else 400 UnsupportedApiVersion naming the supported ones; a
//     key name of 1 to 64 characters of a-z, A-Z, 0-9 and -, a body read up
//     to max_request_body that is exactly one JSON object with a
//     request_context (correlation_id and pool_name required), and for key
//     wrap an alg of the API and a value in base64url without padding, else
//     400 InvalidRequest or UnsupportedAlgorithm (request.go).
//  4. Allow-list: the key name must be one of the key store's keys, else 404
//     KeyNotFound (KeyStore.allows).
//  5. Authorize: the key store's policy must allow the call, given its
//     operation, key, alg, client subject and request_context, else 403
//     Forbidden (package authz, vocabulary EKM). A disabled key then gets 403
//     KeyDisabled, and the key store's quota and bound on concurrent work
//     429 Throttled with Retry-After (admitKeyCall, handler.go). info skips
//     steps 4 and 5.
//  6. HSM: the operation runs on the first available backend within the
//     key store's deadline, never on one the key check found holding another
//     key under the name (operations.go; frontend.KeyCheck with keys.go's
//     proof); hsm errors map to ProxyErrors (fromHSM, errors.go).
//  7. Answer: compact JSON (Handler.respond), one audit line with every
//     request_context field, the client subject, the alg and the value's
//     length, never the value (exchange.log), and the metrics
//     caddy_xks_ekm_* (exchange.observe).
//
// # Where each rule lives
//
//	the API's names, codes, statuses, base64url  package ekmapi
//	path prefix and key name syntax              ekmapi.ValidPrefix, ValidKeyName; KeyStore.validate
//	routing on the raw path                      route.go
//	mutual TLS: roots and subject names          keystore.go (readRoots, authenticate)
//	api-version, request bodies                  request.go (decoding: frontend.DecodeObject)
//	secondary authorization                      package authz (CompileEKM, EKMInput)
//	the four operations, failover                operations.go, frontend/failover.go
//	the same key on every backend                keys.go (the proof), frontend/keycheck.go
//	codes and statuses, fromHSM                  errors.go, ekmapi/errors.go
//	key wrap in the HSM, its known-answer test   package hsm (keywrap.go, rsa.go)
//	per-call state, audit, metrics               exchange.go, frontend
package ekmhandler
