package xkshandler

import (
	"context"
	"errors"

	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// xksError is a failed XKS call: the name and message that go on the wire,
// plus the cause, which only goes to the proxy's log.
type xksError struct {
	name    string
	message string
	status  int // overrides the name's status when non-zero (xksapi.StatusWrongMethod)
	cause   error
}

func (e *xksError) Error() string {
	if e.cause != nil {
		return e.name + ": " + e.message + ": " + e.cause.Error()
	}
	return e.name + ": " + e.message
}

func (e *xksError) Unwrap() error { return e.cause }

func (e *xksError) httpStatus() int {
	if e.status != 0 {
		return e.status
	}
	return xksapi.Status(e.name)
}

func newError(name, message string) *xksError {
	return &xksError{name: name, message: message}
}

func validationError(message string) *xksError {
	return newError(xksapi.ValidationException, message)
}

// fromHSM maps an error of the hsm package to the XKS error KMS must see. The
// message names the condition but never carries HSM detail (slot, PIN state,
// CKR codes), which goes to the log through cause.
func fromHSM(err error) *xksError {
	// The key store's own refusals (key versions, usage limits) are XKS
	// errors already.
	if xe, ok := errors.AsType[*xksError](err); ok {
		return xe
	}
	var e *xksError
	switch {
	case errors.Is(err, hsm.ErrKeyNotFound):
		e = newError(xksapi.KeyNotFoundException, "the external key was not found in the HSM")
	case errors.Is(err, hsm.ErrDuplicateKey):
		e = newError(xksapi.KeyNotFoundException, "the external key id matches more than one key in the HSM")
	case errors.Is(err, hsm.ErrKeyExportable):
		// KeyNotFoundException, not InvalidKeyUsageException: the spec
		// allows the latter only for Encrypt and Decrypt, and it tells KMS
		// (and its caller) that an operation is not enabled on the key. A
		// key whose value can leave the HSM is not one this proxy serves at
		// all, for GetKeyMetadata too, so that KMS's CreateKey refuses it.
		e = newError(xksapi.KeyNotFoundException, "the external key's value can leave the HSM, so the proxy does not use it")
	case errors.Is(err, hsm.ErrKeyUsage):
		e = newError(xksapi.InvalidKeyUsageException, "the external key does not support the requested operation")
	case errors.Is(err, hsm.ErrInvalidCiphertext):
		e = newError(xksapi.InvalidCiphertextException, "the ciphertext, initialization vector, additional authenticated data or authentication tag is corrupted, missing, or otherwise invalid")
	case errors.Is(err, hsm.ErrBusy):
		e = newError(xksapi.ThrottlingException, "the HSM is busy; retry later")
	case errors.Is(err, hsm.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		e = newError(xksapi.DependencyTimeoutException, "the HSM did not answer in time")
	case errors.Is(err, hsm.ErrUnavailable):
		e = newError(xksapi.InternalException, "the HSM is unavailable")
	default:
		e = newError(xksapi.InternalException, "internal error while using the HSM")
	}
	e.cause = err
	return e
}
