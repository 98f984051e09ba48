package xksapi

import "net/http"

// Error names of the spec's error table ("Error Codes"): the errorName of
// a failed call's ErrorBody. KMS keys its behaviour on the name; the HTTP
// status only has to agree with it (Status).
const (
	ValidationException           = "ValidationException"
	InvalidStateException         = "InvalidStateException"
	InvalidCiphertextException    = "InvalidCiphertextException"
	InvalidKeyUsageException      = "InvalidKeyUsageException"
	AuthenticationFailedException = "AuthenticationFailedException"
	AccessDeniedException         = "AccessDeniedException"
	KeyNotFoundException          = "KeyNotFoundException"
	InvalidURIPathException       = "InvalidUriPathException"
	ThrottlingException           = "ThrottlingException"
	UnsupportedOperationException = "UnsupportedOperationException"
	DependencyTimeoutException    = "DependencyTimeoutException"
	InternalException             = "InternalException"
)

// statuses is the spec's error table: each name's HTTP status.
var statuses = map[string]int{
	ValidationException:           http.StatusBadRequest,
	InvalidStateException:         http.StatusBadRequest,
	InvalidCiphertextException:    http.StatusBadRequest,
	InvalidKeyUsageException:      http.StatusBadRequest,
	AuthenticationFailedException: http.StatusUnauthorized,
	AccessDeniedException:         http.StatusForbidden,
	KeyNotFoundException:          http.StatusNotFound,
	InvalidURIPathException:       http.StatusNotFound,
	ThrottlingException:           http.StatusTooManyRequests,
	UnsupportedOperationException: http.StatusNotImplemented,
	DependencyTimeoutException:    http.StatusServiceUnavailable,
	InternalException:             http.StatusInternalServerError,
}

// Status returns the spec's HTTP status of the error name, or 0 for a name
// the spec does not have.
func Status(name string) int { return statuses[name] }

// StatusWrongMethod is the status of a call to an XKS API path with a
// method other than POST: the spec's 405 for GET. The table has no error
// name for it; the body names ValidationException.
const StatusWrongMethod = http.StatusMethodNotAllowed
