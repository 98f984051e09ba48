package sigv4auth

import (
	"crypto/sha256"
	"strconv"
	"strings"
)

// algorithm is the only signing algorithm KMS uses and this package accepts.
const algorithm = "AWS4-HMAC-SHA256"

// authorization is a parsed Authorization header. Its strings point into
// the header value.
type authorization struct {
	accessKeyID   string
	date          string // yyyymmdd
	region        string
	service       string
	signedHeaders string // lower-case names, sorted, ';'-separated
	signature     [sha256.Size]byte
}

// scope returns the credential scope without the access key id:
// <date>/<region>/<service>/aws4_request.
func (a *authorization) scope(credential string) string {
	return credential[len(a.accessKeyID)+1:]
}

// parseAuthorization parses an Authorization header of the form
//
//	AWS4-HMAC-SHA256 Credential=<akid>/<yyyymmdd>/<region>/<service>/aws4_request, SignedHeaders=<h1;h2>, Signature=<64 hex>
//
// The three components may appear in any order, separated by ',' with or
// without spaces (curl and botocore write ", "). On failure it returns the
// reason and a detail that never repeats the signature.
func parseAuthorization(value string) (auth authorization, credential string, reason Reason, detail string) {
	algo, rest, _ := strings.Cut(value, " ")
	if algo != algorithm {
		if !isToken(algo) {
			return auth, "", ReasonMalformedAuthorization, "no signing algorithm"
		}
		return auth, "", ReasonUnsupportedAlgorithm, "algorithm " + quoteForLog(algo) + " is not " + algorithm
	}
	var haveCredential, haveSignedHeaders, haveSignature bool
	var signature string
	for rest != "" {
		var part string
		part, rest, _ = strings.Cut(rest, ",")
		part = strings.Trim(part, " ")
		name, val, ok := strings.Cut(part, "=")
		if !ok {
			return auth, "", ReasonMalformedAuthorization, "component without '='"
		}
		switch name {
		case "Credential":
			if haveCredential {
				return auth, "", ReasonMalformedAuthorization, "Credential given twice"
			}
			haveCredential = true
			credential = val
		case "SignedHeaders":
			if haveSignedHeaders {
				return auth, "", ReasonMalformedAuthorization, "SignedHeaders given twice"
			}
			haveSignedHeaders = true
			auth.signedHeaders = val
		case "Signature":
			if haveSignature {
				return auth, "", ReasonMalformedAuthorization, "Signature given twice"
			}
			haveSignature = true
			signature = val
		default:
			return auth, "", ReasonMalformedAuthorization, "unknown component " + quoteForLog(name)
		}
	}
	switch {
	case !haveCredential:
		return auth, "", ReasonMalformedAuthorization, "no Credential"
	case !haveSignedHeaders:
		return auth, "", ReasonMalformedAuthorization, "no SignedHeaders"
	case !haveSignature:
		return auth, "", ReasonMalformedAuthorization, "no Signature"
	}
	if !decodeSignature(&auth.signature, signature) {
		return auth, "", ReasonMalformedAuthorization, "Signature is not 64 lower-case hex digits"
	}
	if d := parseCredential(&auth, credential); d != "" {
		return auth, "", ReasonMalformedAuthorization, d
	}
	if d := checkSignedHeaders(auth.signedHeaders); d != "" {
		return auth, "", ReasonMalformedAuthorization, d
	}
	return auth, credential, "", ""
}

// parseCredential splits <akid>/<yyyymmdd>/<region>/<service>/aws4_request
// into auth and returns a detail if it is malformed.
func parseCredential(auth *authorization, credential string) string {
	var fields [5]string
	rest := credential
	for i := range fields {
		var ok bool
		fields[i], rest, ok = strings.Cut(rest, "/")
		if ok == (i == len(fields)-1) {
			return "Credential is not <access key id>/<date>/<region>/<service>/aws4_request"
		}
	}
	if fields[4] != "aws4_request" {
		return "Credential does not end in aws4_request"
	}
	if fields[0] == "" || fields[2] == "" || fields[3] == "" {
		return "Credential has an empty field"
	}
	if len(fields[1]) != 8 || !isDigits(fields[1]) {
		return "Credential date is not yyyymmdd"
	}
	auth.accessKeyID, auth.date, auth.region, auth.service = fields[0], fields[1], fields[2], fields[3]
	return ""
}

// maxSignedHeaders bounds the work an unauthenticated request can cause.
// KMS signs two headers, curl three and the AWS SDKs every header they send.
const maxSignedHeaders = 100

// checkSignedHeaders requires the lower-case, sorted, duplicate-free list of
// header names that every SigV4 signer writes.
func checkSignedHeaders(list string) string {
	if list == "" {
		return "SignedHeaders is empty"
	}
	if strings.Count(list, ";") >= maxSignedHeaders {
		return "SignedHeaders lists more than " + strconv.Itoa(maxSignedHeaders) + " names"
	}
	prev := ""
	for rest := list; ; {
		name, more, found := strings.Cut(rest, ";")
		if name == "" {
			return "SignedHeaders has an empty name"
		}
		for i := 0; i < len(name); i++ {
			if c := name[i]; 'A' <= c && c <= 'Z' || !isTokenByte(c) {
				return "SignedHeaders has a name that is not a lower-case header name"
			}
		}
		if prev != "" && name <= prev {
			return "SignedHeaders is not sorted or repeats a name"
		}
		prev = name
		if !found {
			return ""
		}
		rest = more
	}
}

// hasSignedHeader reports whether the ';'-separated list contains name.
func hasSignedHeader(list, name string) bool {
	for rest := list; ; {
		n, more, found := strings.Cut(rest, ";")
		if n == name {
			return true
		}
		if !found {
			return false
		}
		rest = more
	}
}

// decodeSignature decodes 64 lower-case hex digits into sig.
func decodeSignature(sig *[sha256.Size]byte, s string) bool {
	if len(s) != 2*sha256.Size {
		return false
	}
	for i := range sig {
		hi, ok1 := fromLowerHex(s[2*i])
		lo, ok2 := fromLowerHex(s[2*i+1])
		if !ok1 || !ok2 {
			return false
		}
		sig[i] = hi<<4 | lo
	}
	return true
}

func fromLowerHex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// isTokenByte reports whether c may appear in an HTTP header name (RFC 9110
// tchar).
func isTokenByte(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isTokenByte(s[i]) {
			return false
		}
	}
	return true
}

// quoteForLog quotes a client-supplied value for an error detail, cut short
// so that a hostile client cannot flood the log.
func quoteForLog(s string) string {
	const maxLen = 64
	if len(s) > maxLen {
		return strconv.Quote(s[:maxLen]) + "..."
	}
	return strconv.Quote(s)
}
