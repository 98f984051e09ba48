// Package ekmapi holds the wire format of the Azure Managed HSM External
// Key Management (EKM) proxy API, v0.1-preview: the JSON bodies of the four
// operations (info, metadata, wrapkey, unwrapkey) and of errors, the
// syntax of key names and path prefixes, the algorithm and key type names,
// and the API versions the proxy serves. Field names are the API's. Every
// binary value is base64url without padding (RFC 7515), both ways: Value
// is the one type that carries bytes, and it refuses padding, the standard
// alphabet and anything else that is not that encoding.
//
// The proxy's handler (package ekmhandler) answers with these types and
// tests call it with them, so both speak one format. Like xksapi it
// imports nothing of the project.
package ekmapi

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"regexp"
	"slices"
	"strings"
)

// APIVersion is the only version of the API published: the proxy serves it
// and answers it as /info's api_version.
const APIVersion = "0.1-preview"

// SupportedAPIVersions are the api-version values the proxy serves.
var SupportedAPIVersions = []string{APIVersion}

// SupportsAPIVersion reports whether v is one of SupportedAPIVersions.
func SupportsAPIVersion(v string) bool { return slices.Contains(SupportedAPIVersions, v) }

// The key wrap algorithms, as alg names them.
const (
	// AlgA256KW is AES key wrap (RFC 3394) with an AES-256 key.
	AlgA256KW = "A256KW"
	// AlgA256KWP is AES key wrap with padding (RFC 5649) with an AES-256
	// key.
	AlgA256KWP = "A256KWP"
	// AlgRSAOAEP256 is RSAES-OAEP with SHA-256 and MGF1-SHA-256.
	AlgRSAOAEP256 = "RSA-OAEP-256"
	// AlgRSAOAEP is RSAES-OAEP with SHA-1 and MGF1-SHA-1, which Azure
	// Storage sends.
	AlgRSAOAEP = "RSA-OAEP"
)

// Algorithms are the alg values the API defines.
var Algorithms = []string{AlgA256KW, AlgA256KWP, AlgRSAOAEP256, AlgRSAOAEP}

// The key types of KeyMetadata.
const (
	KeyTypeOct = "oct"
	KeyTypeRSA = "RSA"
)

// KeyOps is key_ops of every key's metadata, exactly.
var KeyOps = []string{"wrapKey", "unwrapKey"}

// MaxKeyNameLen and MaxPrefixLen bound a key name and a path prefix.
const (
	MaxKeyNameLen = 64
	MaxPrefixLen  = 64
)

var (
	keyNamePattern = regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`)
	prefixPattern  = regexp.MustCompile(`^[a-zA-Z0-9/-]{0,64}$`)
)

// ValidKeyName reports whether name is a key name (the external key
// identifier): 1 to 64 characters of a-z, A-Z, 0-9 and -. It is
// case-sensitive.
func ValidKeyName(name string) bool { return keyNamePattern.MatchString(name) }

// ValidPrefix reports whether prefix is a path prefix as an EKM connection
// names it: at most 64 characters of a-z, A-Z, 0-9, / and -, empty for
// none.
func ValidPrefix(prefix string) bool { return prefixPattern.MatchString(prefix) }

// RequestContext is in every request body. RequestID is optional; the
// other two are required.
type RequestContext struct {
	RequestID     string `json:"request_id,omitempty"`
	CorrelationID string `json:"correlation_id"`
	PoolName      string `json:"pool_name"`
}

// ContextRequest is the body of info and metadata.
type ContextRequest struct {
	RequestContext *RequestContext `json:"request_context"`
}

// WrapRequest is the body of wrapkey and unwrapkey.
type WrapRequest struct {
	RequestContext *RequestContext `json:"request_context"`
	Alg            string          `json:"alg"`
	Value          *Value          `json:"value"`
}

// ProxyInfo answers info.
type ProxyInfo struct {
	APIVersion  string `json:"api_version"`
	ProxyVendor string `json:"proxy_vendor"`
	ProxyName   string `json:"proxy_name"`
	EKMVendor   string `json:"ekm_vendor"`
	EKMProduct  string `json:"ekm_product"`
}

// KeyMetadata answers metadata. N and E are an RSA key's public key and
// are left out for an oct key.
type KeyMetadata struct {
	KeyType string   `json:"key_type"`
	KeySize int      `json:"key_size"`
	KeyOps  []string `json:"key_ops"`
	N       Value    `json:"n,omitempty"`
	E       Value    `json:"e,omitempty"`
}

// WrapResult answers wrapkey and unwrapkey.
type WrapResult struct {
	Value Value `json:"value"`
}

// ProxyError is the body of every answer that is not 200.
type ProxyError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Value is binary data, base64url without padding on the wire.
type Value []byte

// base64url is RFC 7515's encoding: the URL alphabet, no padding, and
// strict, so that a string with bits left over in its last character is
// not read as another's bytes.
var base64url = base64.RawURLEncoding.Strict()

// ErrNotBase64url is the error of a value that is not base64url without
// padding.
var ErrNotBase64url = errors.New("not base64url without padding")

// MarshalJSON writes v as a base64url string without padding.
func (v Value) MarshalJSON() ([]byte, error) {
	return json.Marshal(base64url.EncodeToString(v))
}

// UnmarshalJSON reads a base64url string without padding, and nothing
// else: padding, + and /, white space, PEM and the like are
// ErrNotBase64url.
func (v *Value) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return ErrNotBase64url
	}
	b, err := DecodeValue(s)
	if err != nil {
		return err
	}
	*v = b
	return nil
}

// DecodeValue decodes a base64url string without padding. Go's decoder
// skips line breaks, which the encoding does not have: they are refused
// first, with every other character outside its alphabet.
func DecodeValue(s string) ([]byte, error) {
	if strings.IndexFunc(s, notBase64url) >= 0 {
		return nil, ErrNotBase64url
	}
	b, err := base64url.DecodeString(s)
	if err != nil {
		return nil, ErrNotBase64url
	}
	return b, nil
}

func notBase64url(c rune) bool {
	return (c < 'A' || c > 'Z') && (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' && c != '_'
}

// EncodeValue encodes bytes as base64url without padding.
func EncodeValue(b []byte) string { return base64url.EncodeToString(b) }
