package xkshandler

import (
	"regexp"
	"strings"
)

// APIPathSuffix ends every key store's URI path (XksProxyUriPath); v1 is
// the only version of the XKS API.
const APIPathSuffix = "/kms/xks/v1"

// uriPathPattern is KMS's rule for XksProxyUriPath (CreateCustomKeyStore),
// narrowed to the API version this proxy serves.
var uriPathPattern = regexp.MustCompile(`^(/[a-zA-Z0-9/_-]+)?/kms/xks/v1$`)

// keyIDPattern is KMS's rule for an external key id (XksKeyId).
var keyIDPattern = regexp.MustCompile(`^[a-zA-Z0-9._-]{1,128}$`)

// validKeyID applies KMS's rule, less "." and "..": as path segments they
// would be resolved away by any proxy or client that normalizes paths, so a
// key with such an id could be reached by another path than the one signed.
func validKeyID(id string) bool {
	return id != "." && id != ".." && keyIDPattern.MatchString(id)
}

// ValidKeyID reports whether id is an external key id the proxy serves: 1
// to 128 characters of a-z, A-Z, 0-9, ., - and _, not . or .. . Only such
// an id names a usage record in storage.
func ValidKeyID(id string) bool { return validKeyID(id) }

// operation is one of the four XKS API calls.
type operation uint8

const (
	opHealth operation = iota + 1
	opMetadata
	opEncrypt
	opDecrypt
)

// String is the XKS API name of the operation, as it appears in logs.
func (op operation) String() string {
	switch op {
	case opHealth:
		return "GetHealthStatus"
	case opMetadata:
		return "GetKeyMetadata"
	case opEncrypt:
		return "Encrypt"
	case opDecrypt:
		return "Decrypt"
	}
	return "unknown"
}

// route splits a raw request path (sigv4auth.RawPath) into its key store,
// operation and external key id. Routing is on the path exactly as
// received: nothing is cleaned or decoded, so what is routed is what was
// signed.
func (h *Handler) route(path string) (ks *KeyStore, op operation, keyID string, ok bool) {
	marker := APIPathSuffix + "/"
	i := strings.LastIndex(path, marker)
	if i < 0 {
		return nil, 0, "", false
	}
	ks = h.stores[path[:i+len(APIPathSuffix)]]
	if ks == nil {
		return nil, 0, "", false
	}
	rest := path[i+len(marker):]
	if rest == "health" {
		return ks, opHealth, "", true
	}
	id, action, found := strings.Cut(strings.TrimPrefix(rest, "keys/"), "/")
	if !found || !strings.HasPrefix(rest, "keys/") || !validKeyID(id) {
		return nil, 0, "", false
	}
	switch action {
	case "metadata":
		op = opMetadata
	case "encrypt":
		op = opEncrypt
	case "decrypt":
		op = opDecrypt
	default:
		return nil, 0, "", false
	}
	return ks, op, id, true
}
