package sigv4auth

import (
	"net/http"
	"net/url"
	"slices"
	"strings"
)

const upperHex = "0123456789ABCDEF"

// isUnreserved reports whether c is an RFC 3986 unreserved character, the
// only bytes SigV4 leaves unescaped in URIs and query strings.
func isUnreserved(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_' || c == '~'
}

// needsPathEscape reports whether escaping the path once more, as the AWS
// SDKs do for every service but S3, would change it.
func needsPathEscape(path string) bool {
	for i := 0; i < len(path); i++ {
		if c := path[i]; c != '/' && !isUnreserved(c) {
			return true
		}
	}
	return false
}

// appendEscapedPath appends path with every byte but '/' and the unreserved
// characters percent-encoded, which is how aws-sdk-go-v2 (without
// DisableURIPathEscaping), botocore and the Java SDK build the canonical URI
// from the path they send.
func appendEscapedPath(dst []byte, path string) []byte {
	for i := 0; i < len(path); i++ {
		c := path[i]
		if c == '/' || isUnreserved(c) {
			dst = append(dst, c)
		} else {
			dst = append(dst, '%', upperHex[c>>4], upperHex[c&15])
		}
	}
	return dst
}

// presignedParams are the query parameters of query-string authentication.
var presignedParams = []string{
	"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature", "X-Amz-SignedHeaders",
}

// canonicalQuery builds the SigV4 canonical query string from a raw query:
// each name and value decoded, then encoded with every byte outside the
// unreserved set as %XX, the pairs sorted by name and then value. XKS
// requests carry no query, so this path is not optimized.
func canonicalQuery(rawQuery string) (string, Reason, string) {
	type param struct{ name, value string }
	var params []param
	for rest := rawQuery; rest != ""; {
		var pair string
		pair, rest, _ = strings.Cut(rest, "&")
		if pair == "" {
			continue
		}
		name, value, _ := strings.Cut(pair, "=")
		name, err1 := url.QueryUnescape(name)
		value, err2 := url.QueryUnescape(value)
		if err1 != nil || err2 != nil {
			return "", ReasonMalformedQuery, "query has an invalid percent-encoding"
		}
		for _, p := range presignedParams {
			if strings.EqualFold(name, p) {
				return "", ReasonPresigned, "query carries " + p
			}
		}
		params = append(params, param{encodeQueryComponent(name), encodeQueryComponent(value)})
	}
	slices.SortFunc(params, func(a, b param) int {
		if c := strings.Compare(a.name, b.name); c != 0 {
			return c
		}
		return strings.Compare(a.value, b.value)
	})
	var b strings.Builder
	for i, p := range params {
		if i > 0 {
			b.WriteByte('&')
		}
		b.WriteString(p.name)
		b.WriteByte('=')
		b.WriteString(p.value)
	}
	return b.String(), "", ""
}

func encodeQueryComponent(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if isUnreserved(c) {
			b.WriteByte(c)
		} else {
			b.WriteByte('%')
			b.WriteByte(upperHex[c>>4])
			b.WriteByte(upperHex[c&15])
		}
	}
	return b.String()
}

// appendCanonicalValue appends a header value trimmed of surrounding spaces
// with each inner run of spaces folded to one, as SigV4 and aws-sdk-go-v2
// do. Only the ASCII space counts: trimming Unicode white space as well
// would let "v\u00a0" or "v\u0085" verify under a signature made for "v".
func appendCanonicalValue(dst []byte, v string) []byte {
	v = strings.Trim(v, " ")
	space := false
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c == ' ' {
			if space {
				continue
			}
			space = true
		} else {
			space = false
		}
		dst = append(dst, c)
	}
	return dst
}

// headerValues returns the values of the header with the lower-case name.
// net/http stores names in canonical form, which is tried first without
// allocating; a header map built by hand may hold other spellings, which
// are then found by a case-insensitive scan.
func headerValues(h http.Header, name string) []string {
	var buf [64]byte
	if len(name) <= len(buf) {
		upper := true
		for i := 0; i < len(name); i++ {
			c := name[i]
			if upper && 'a' <= c && c <= 'z' {
				c -= 'a' - 'A'
			}
			buf[i] = c
			upper = c == '-'
		}
		if v, ok := h[string(buf[:len(name)])]; ok {
			return v
		}
	}
	var values []string
	var keys []string
	for k := range h {
		if strings.EqualFold(k, name) {
			keys = append(keys, k)
		}
	}
	// Sorted so that several spellings of one name join in a fixed order.
	slices.Sort(keys)
	for _, k := range keys {
		values = append(values, h[k]...)
	}
	return values
}
