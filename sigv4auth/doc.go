// Package sigv4auth verifies the AWS Signature Version 4 that AWS KMS puts on
// every XKS proxy API request.
//
// AWS KMS signs each call to an external key store proxy with an access key id
// and secret access key that the customer configured both in KMS
// (CreateCustomKeyStore, UpdateCustomKeyStore) and on the proxy. Anyone who
// holds the secret can use the keys in the HSM, so the proxy recomputes the
// signature independently and refuses the request unless it matches.
//
// A Verifier checks one request from its method, raw path and query, Host,
// headers and body bytes:
//
//   - The Authorization header must use AWS4-HMAC-SHA256 and appear once;
//     presigned query-string authentication is refused.
//   - The credential scope must be <access key id>/<yyyymmdd>/<region>/<service>/aws4_request
//     with the configured region and service (kms-xks-proxy by default) and the
//     day of the request's X-Amz-Date.
//   - Host and X-Amz-Date (or Date) must be signed. Beyond that the canonical
//     request is built from whatever headers the client says it signed, so
//     KMS (host;x-amz-date), curl --aws-sigv4 (content-type;host;x-amz-date)
//     and the AWS SDKs (which sign more) all verify.
//   - The canonical URI is the path exactly as it appeared on the request
//     line (RawPath, which a server routes on too, so that what it routes is
//     what was signed): "//" is not cleaned and percent-encoded bytes are
//     not decoded. XKS paths contain only unreserved characters; for any
//     other path the form that the AWS SDKs sign for non-S3 services (the
//     received path escaped once more) is accepted as well.
//   - The request time must lie within MaxSkew (five minutes by default) of
//     the proxy's clock in either direction. SigV4 has no nonce, so this
//     window is the only replay protection besides TLS.
//
// Several credentials can be active at once and are looked up by access key
// id, so that a customer can rotate them as the XKS specification describes:
// add the new credential to the proxy, switch KMS to it with
// UpdateCustomKeyStore, then remove the old one.
//
// The derived signing key is cached per credential and day, so a steady stream
// of requests costs one HMAC chain a day plus two SHA-256 passes over each
// request. Signatures are compared in constant time.
//
// Every failure is an *Error whose Reason tells the proxy's log why the
// request was refused. Neither the secret, the signature nor the signing key
// ever appears in an error. Whatever the reason, the caller answers the client
// with the XKS error AuthenticationFailedException (HTTP 401) and nothing more.
package sigv4auth
