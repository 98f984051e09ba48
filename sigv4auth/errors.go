package sigv4auth

// Reason says why a request failed SigV4 verification. It is meant for the
// proxy's log; the client only ever learns AuthenticationFailedException.
type Reason string

// The reasons a Verifier refuses a request.
const (
	// ReasonMissingAuthorization means the request carries no Authorization
	// header.
	ReasonMissingAuthorization Reason = "missing authorization"
	// ReasonDuplicateAuthorization means the request carries more than one
	// Authorization header, which would make the signer's identity ambiguous.
	ReasonDuplicateAuthorization Reason = "duplicate authorization header"
	// ReasonMalformedAuthorization means the Authorization header is not a
	// well-formed AWS4-HMAC-SHA256 header.
	ReasonMalformedAuthorization Reason = "malformed authorization"
	// ReasonUnsupportedAlgorithm means the Authorization header names an
	// algorithm other than AWS4-HMAC-SHA256.
	ReasonUnsupportedAlgorithm Reason = "unsupported algorithm"
	// ReasonPresigned means the request carries query-string (presigned)
	// authentication, which KMS never uses.
	ReasonPresigned Reason = "presigned request"
	// ReasonMalformedQuery means the query string cannot be decoded, so no
	// canonical query string can be built from it.
	ReasonMalformedQuery Reason = "malformed query"
	// ReasonUnknownAccessKeyID means no configured credential has the access
	// key id named in the credential scope.
	ReasonUnknownAccessKeyID Reason = "unknown access key id"
	// ReasonScopeMismatch means the credential scope's date, region or service
	// differs from the request date or the configured region and service.
	ReasonScopeMismatch Reason = "scope mismatch"
	// ReasonMissingSignedHeader means Host or the request date is not among
	// the signed headers, or a signed header is absent from the request.
	ReasonMissingSignedHeader Reason = "missing signed header"
	// ReasonMalformedDate means the X-Amz-Date (or Date) header cannot be
	// parsed or appears more than once.
	ReasonMalformedDate Reason = "malformed date"
	// ReasonClockSkew means the request time is further from the proxy's
	// clock than the configured maximum skew.
	ReasonClockSkew Reason = "clock skew"
	// ReasonPayloadHashMismatch means the X-Amz-Content-Sha256 header does not
	// equal the SHA-256 of the body received.
	ReasonPayloadHashMismatch Reason = "payload hash mismatch"
	// ReasonSignatureMismatch means the signature recomputed from the request
	// and the credential's secret differs from the one in the request.
	ReasonSignatureMismatch Reason = "signature mismatch"
)

// Error is the error returned for every request that fails verification.
// It never contains the secret access key, the signature or the signing key.
type Error struct {
	// Reason is the class of failure.
	Reason Reason
	// AccessKeyID is the configured access key id the request was signed
	// with, or empty if the request named none that is configured.
	AccessKeyID string
	// Detail explains the failure for the proxy's log.
	Detail string
}

// Error returns the reason, the access key id if known and the detail.
func (e *Error) Error() string {
	s := "sigv4 verification failed: " + string(e.Reason)
	if e.AccessKeyID != "" {
		s += " (access key id " + e.AccessKeyID + ")"
	}
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

func failure(reason Reason, accessKeyID, detail string) error {
	return &Error{Reason: reason, AccessKeyID: accessKeyID, Detail: detail}
}
