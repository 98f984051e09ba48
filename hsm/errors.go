package hsm

import (
	"errors"
	"strings"

	"github.com/miekg/pkcs11"
)

// Error kinds. Every error returned by a Backend is an *Error whose Kind is one
// of these, so callers map them with errors.Is.
var (
	// ErrKeyNotFound: no secret key on the token has the label.
	ErrKeyNotFound = errors.New("key not found")
	// ErrDuplicateKey: more than one secret key has the label; which one
	// would be used is undefined, so none is.
	ErrDuplicateKey = errors.New("duplicate key label")
	// ErrKeyUsage: the key is not an AES-256 key permitted to encrypt and
	// decrypt, or the HSM refused the mechanism for it.
	ErrKeyUsage = errors.New("key usage not permitted")
	// ErrInvalidCiphertext: authentication of the ciphertext failed (wrong
	// key, IV, AAD, tag or ciphertext) or the input is malformed.
	ErrInvalidCiphertext = errors.New("invalid ciphertext")
	// ErrBusy: no session became free within the session wait.
	ErrBusy = errors.New("hsm busy")
	// ErrTimeout: the HSM call did not return before the deadline.
	ErrTimeout = errors.New("hsm call timed out")
	// ErrUnavailable: the HSM or token cannot be used now (reconnecting,
	// closed, login failed).
	ErrUnavailable = errors.New("hsm unavailable")
	// ErrInternal: anything else, including an IV the HSM produced twice.
	ErrInternal = errors.New("hsm internal error")
	// ErrKeyExists: GenerateKey was asked for a label already in use.
	ErrKeyExists = errors.New("key label already exists")
)

// Error is the error type of every Backend operation.
type Error struct {
	// Kind is one of the Err* values above.
	Kind error
	// Op is the operation, e.g. "encrypt".
	Op string
	// Key is the key label involved, if any.
	Key string
	// CKR is the name of the PKCS#11 return value that caused the error,
	// if any, e.g. "CKR_GENERAL_ERROR".
	CKR string
	// Err is the underlying error, if any.
	Err error
}

// Error describes the error. It never contains key material or a PIN.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("hsm")
	if e.Op != "" {
		b.WriteString(" ")
		b.WriteString(e.Op)
	}
	if e.Key != "" {
		b.WriteString(" key ")
		b.WriteString(quote(e.Key))
	}
	b.WriteString(": ")
	if e.Kind != nil {
		b.WriteString(e.Kind.Error())
	} else {
		b.WriteString(ErrInternal.Error())
	}
	if e.CKR != "" {
		b.WriteString(" (")
		b.WriteString(e.CKR)
		b.WriteString(")")
	}
	var pe pkcs11.Error
	if e.Err != nil && !errors.As(e.Err, &pe) {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Is reports whether target is the error's Kind.
func (e *Error) Is(target error) bool { return target == e.Kind }

// Unwrap returns the underlying error.
func (e *Error) Unwrap() error { return e.Err }

// quote quotes a label for an error message, bounding its length because
// labels can come from requests.
func quote(s string) string {
	const max = 128
	if len(s) > max {
		s = s[:max] + "..."
	}
	return "\"" + strings.ReplaceAll(s, "\"", "\\\"") + "\""
}

// ckrOf returns the PKCS#11 return value in err's chain.
func ckrOf(err error) (uint, bool) {
	if pe, ok := errors.AsType[pkcs11.Error](err); ok {
		return uint(pe), true
	}
	return 0, false
}

// errClass says what a PKCS#11 return value means for the session, the key
// handle cache and the library, and so what the pool does next.
type errClass int

const (
	// classRequest: the call failed for this request only; report it.
	classRequest errClass = iota
	// classSession: the session is unusable; close it and retry once.
	classSession
	// classHandle: a cached object handle is stale; forget the handles and
	// retry once.
	classHandle
	// classLogin: the token forgot our login; log in again and retry once.
	classLogin
	// classModule: the device or library failed; reconnect with backoff.
	classModule
	// classPIN: the PIN was refused; never retried, because real HSMs lock
	// the PIN after a few wrong tries.
	classPIN
	// classKeyUsage: the key cannot be used for the mechanism.
	classKeyUsage
	// classBusy: the token has no session to give.
	classBusy
)

func classify(code uint) errClass {
	switch code {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED,
		pkcs11.CKR_OPERATION_ACTIVE, pkcs11.CKR_OPERATION_NOT_INITIALIZED,
		pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_FUNCTION_FAILED:
		return classSession
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID:
		return classHandle
	case pkcs11.CKR_USER_NOT_LOGGED_IN:
		return classLogin
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_DEVICE_MEMORY,
		pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED,
		pkcs11.CKR_SLOT_ID_INVALID, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:
		return classModule
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_EXPIRED,
		pkcs11.CKR_PIN_LEN_RANGE, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_USER_PIN_NOT_INITIALIZED:
		return classPIN
	case pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED, pkcs11.CKR_KEY_TYPE_INCONSISTENT,
		pkcs11.CKR_KEY_SIZE_RANGE, pkcs11.CKR_MECHANISM_INVALID:
		return classKeyUsage
	case pkcs11.CKR_SESSION_COUNT:
		return classBusy
	}
	return classRequest
}

// kindOf maps a PKCS#11 error that is reported to the caller to an error kind.
func kindOf(code uint) error {
	switch classify(code) {
	case classModule, classPIN, classLogin:
		return ErrUnavailable
	case classKeyUsage:
		return ErrKeyUsage
	case classBusy:
		return ErrBusy
	default:
		return ErrInternal
	}
}

// wrapCKR turns a PKCS#11 error into an *Error of the kind its code implies.
func wrapCKR(op, key string, err error) *Error {
	if code, ok := ckrOf(err); ok {
		return &Error{Kind: kindOf(code), Op: op, Key: key, CKR: ckrName(code), Err: err}
	}
	return &Error{Kind: ErrInternal, Op: op, Key: key, Err: err}
}
