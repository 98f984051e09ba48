package ekmhandler

import (
	"context"
	"errors"
	"net/http"
	"strconv"

	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
)

// ekmError is a failed call: the code and message that go on the wire as
// a ProxyError, plus the cause, which only goes to the proxy's log.
type ekmError struct {
	code    string
	message string
	cause   error
}

func (e *ekmError) Error() string {
	if e.cause != nil {
		return e.code + ": " + e.message + ": " + e.cause.Error()
	}
	return e.code + ": " + e.message
}

func (e *ekmError) Unwrap() error { return e.cause }

func (e *ekmError) status() int { return ekmapi.StatusOf[e.code] }

func newError(code, message string) *ekmError { return &ekmError{code: code, message: message} }

func invalid(message string) *ekmError { return newError(ekmapi.CodeInvalidRequest, message) }

func unauthorized(message string, cause error) *ekmError {
	return &ekmError{code: ekmapi.CodeUnauthorized, message: message, cause: cause}
}

// throttled is the answer to a request the key store's limits refuse.
func throttled(err error) *ekmError {
	return &ekmError{code: ekmapi.CodeThrottled, message: err.Error(), cause: err}
}

// fromHSM maps an error of the hsm package to the ProxyError Managed HSM
// must see. The message names the condition but never carries HSM detail
// (slot, PIN state, CKR codes), which goes to the log through cause.
func fromHSM(err error) *ekmError {
	if ee, ok := errors.AsType[*ekmError](err); ok {
		return ee
	}
	var e *ekmError
	switch {
	case errors.Is(err, hsm.ErrKeyNotFound):
		e = newError(ekmapi.CodeKeyNotFound, "the key was not found in the HSM")
	case errors.Is(err, hsm.ErrDuplicateKey):
		e = newError(ekmapi.CodeKeyNotFound, "the key name matches more than one key in the HSM")
	case errors.Is(err, hsm.ErrKeyExportable):
		// Not served at all, so that creating an external key on it fails.
		e = newError(ekmapi.CodeKeyNotFound, "the key's value can leave the HSM, so the proxy does not use it")
	case errors.Is(err, hsm.ErrKeyUsage):
		e = newError(ekmapi.CodeOperationNotAllowed, "the key is not an AES-256 key or an RSA key of 2048, 3072 or 4096 bits permitted to wrap and unwrap")
	case errors.Is(err, hsm.ErrAlgorithmMismatch):
		e = newError(ekmapi.CodeUnsupportedAlgorithm, "alg does not fit the key's type: A256KW and A256KWP take an oct key, RSA-OAEP and RSA-OAEP-256 an RSA key")
	case errors.Is(err, hsm.ErrUnsupportedAlgorithm):
		e = newError(ekmapi.CodeUnsupportedAlgorithm, "the HSM holding the key cannot do this algorithm")
	case errors.Is(err, hsm.ErrInvalidInput):
		e = invalid("the value's length is not one the algorithm takes with this key and HSM")
	case errors.Is(err, hsm.ErrInvalidCiphertext):
		e = newError(ekmapi.CodeInvalidCiphertext, "the wrapped key does not unwrap with this key and algorithm")
	case errors.Is(err, hsm.ErrBusy):
		e = newError(ekmapi.CodeThrottled, "the HSM is busy; retry later")
	case errors.Is(err, hsm.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		e = newError(ekmapi.CodeRequestTimeout, "the HSM did not answer in time")
	case errors.Is(err, hsm.ErrUnavailable):
		e = newError(ekmapi.CodeBadGateway, "the HSM is unavailable")
	default:
		e = newError(ekmapi.CodeInternalServerError, "internal error while using the HSM")
	}
	e.cause = err
	return e
}

// fromLimits maps a refusal of the key store's limits.
func fromLimits(err error) *ekmError {
	if errors.Is(err, frontend.ErrQuota) || errors.Is(err, frontend.ErrTooManyInFlight) {
		return throttled(err)
	}
	return &ekmError{code: ekmapi.CodeInternalServerError, message: "internal error", cause: err}
}

// header sets the headers an error's answer carries besides its body.
func (e *ekmError) header(h http.Header) {
	switch e.code {
	case ekmapi.CodeThrottled:
		h.Set("Retry-After", strconv.Itoa(ekmapi.RetryAfterSeconds))
	case ekmapi.CodeMethodNotAllowed:
		h.Set("Allow", http.MethodPost)
	}
}
