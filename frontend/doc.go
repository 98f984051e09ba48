// Package frontend holds what the proxy's API front ends share: package
// xkshandler for AWS KMS XKS and package ekmhandler for Azure Managed HSM
// EKM serve the same hsm app backends, and each key store of either has
//
//   - its HSM backends in failover order, with the key check that proves
//     they hold the same keys under each label (KeyCheck, keycheck.go;
//     WithBackend and Health, failover.go), the proof itself being the
//     front end's (Keys.Same);
//   - a request quota, a bound on concurrent HSM work and a deadline
//     (Limits, limits.go);
//
// and each front end sets up its server (an HTTP/2 stream limit, a warning
// of HTTP/3: ProvisionServer, server.go), reads a bounded body (ReadBody,
// body.go), decodes it
// strictly (DecodeObject, decode.go), writes one audit line per call
// (AuditLine, audit.go), counts calls in its metrics (RequestMetrics,
// metrics.go) and names the proxy (Version, ProxyModel, version.go).
// Secondary authorization is package authz, with one vocabulary per API.
//
// What belongs to one API stays in its handler: routing, the wire format,
// authentication (SigV4; mutual TLS), error names and statuses.
package frontend
