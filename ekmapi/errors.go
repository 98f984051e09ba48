package ekmapi

import "net/http"

// The code of each ProxyError the proxy answers with. The API leaves code
// a free string and gives only the statuses (400, 401, 403, 404, 429 and
// 5xx; Microsoft's troubleshooting guide adds 408, 500, 502 and 503 with
// their causes); these names are Microsoft's symbolic ones where it has
// one, and say the cause where one status has several. Managed HSM passes
// code and message unchanged into its diagnostic logs.
const (
	// CodeInvalidRequest: a malformed body, a missing field, a key name or
	// a value's length the API does not take (400).
	CodeInvalidRequest = "InvalidRequest"
	// CodeUnsupportedAPIVersion: api-version missing or not one of
	// SupportedAPIVersions (400).
	CodeUnsupportedAPIVersion = "UnsupportedApiVersion"
	// CodeUnsupportedAlgorithm: alg is not an algorithm of the API, does
	// not fit the key's type, or the HSM cannot do it (400).
	CodeUnsupportedAlgorithm = "UnsupportedAlgorithm"
	// CodeInvalidCiphertext: the wrapped key does not unwrap (400).
	CodeInvalidCiphertext = "InvalidCiphertext"
	// CodeUnauthorized: no client certificate, one that does not chain to
	// the key store's roots, or one whose subject it does not accept (401).
	CodeUnauthorized = "Unauthorized"
	// CodeForbidden: the key store's authorization policy denies the call
	// (403).
	CodeForbidden = "Forbidden"
	// CodeKeyDisabled: the key is disabled in the key store's
	// configuration (403).
	CodeKeyDisabled = "KeyDisabled"
	// CodeOperationNotAllowed: the key is of a type or size the API does
	// not take, or may not wrap and unwrap (403).
	CodeOperationNotAllowed = "OperationNotAllowed"
	// CodeKeyNotFound: no such key in the key store or the HSM (404).
	CodeKeyNotFound = "KeyNotFound"
	// CodeNotFound: the path is not an API path of a key store (404).
	CodeNotFound = "NotFound"
	// CodeMethodNotAllowed: a method other than POST (405).
	CodeMethodNotAllowed = "MethodNotAllowed"
	// CodeRequestTimeout: the HSM did not answer within the key store's
	// deadline (408).
	CodeRequestTimeout = "RequestTimeout"
	// CodeThrottled: the key store's quota or bound on concurrent work, or
	// the HSM's session pool, is full; the answer has Retry-After (429).
	CodeThrottled = "Throttled"
	// CodeInternalServerError: an unexpected failure of the proxy (500).
	CodeInternalServerError = "InternalServerError"
	// CodeBadGateway: the HSM is unreachable or failing (502).
	CodeBadGateway = "BadGateway"
)

// StatusOf is the HTTP status of each code.
var StatusOf = map[string]int{
	CodeInvalidRequest:        http.StatusBadRequest,
	CodeUnsupportedAPIVersion: http.StatusBadRequest,
	CodeUnsupportedAlgorithm:  http.StatusBadRequest,
	CodeInvalidCiphertext:     http.StatusBadRequest,
	CodeUnauthorized:          http.StatusUnauthorized,
	CodeForbidden:             http.StatusForbidden,
	CodeKeyDisabled:           http.StatusForbidden,
	CodeOperationNotAllowed:   http.StatusForbidden,
	CodeKeyNotFound:           http.StatusNotFound,
	CodeNotFound:              http.StatusNotFound,
	CodeMethodNotAllowed:      http.StatusMethodNotAllowed,
	CodeRequestTimeout:        http.StatusRequestTimeout,
	CodeThrottled:             http.StatusTooManyRequests,
	CodeInternalServerError:   http.StatusInternalServerError,
	CodeBadGateway:            http.StatusBadGateway,
}

// RetryAfterSeconds is the Retry-After of a Throttled answer.
const RetryAfterSeconds = 1

// MaxContextFieldLen bounds each field of request_context, which goes into
// every audit line.
const MaxContextFieldLen = 256
