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
	// ErrKeyExportable: the key's value can leave the HSM (CKA_SENSITIVE
	// false or CKA_EXTRACTABLE true) and the backend does not allow such
	// keys (allow_exportable_keys). The proxy does not use it at all.
	ErrKeyExportable = errors.New("key value can leave the hsm")
	// ErrKeyUsage: the key is not an AES-256 key permitted to encrypt and
	// decrypt (for key wrap: not an AES-256 key or an RSA key of 2048, 3072
	// or 4096 bits, permitted to wrap and unwrap), or the HSM refused the
	// mechanism for it.
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
	// ErrInvalidInput: a key wrap input has a length the algorithm does
	// not take, or that the token cannot wrap correctly; the token never
	// saw it.
	ErrInvalidInput = errors.New("invalid input")
	// ErrAlgorithmMismatch: the key wrap algorithm does not fit the key's
	// type (an RSA algorithm with an AES key, or the reverse).
	ErrAlgorithmMismatch = errors.New("algorithm does not fit the key")
	// ErrUnsupportedAlgorithm: the token cannot do the key wrap algorithm:
	// it does not offer it, refuses its parameters, or failed its
	// known-answer test.
	ErrUnsupportedAlgorithm = errors.New("algorithm not supported by the hsm")
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
