package hsm

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/miekg/pkcs11"
)

// The PKCS#11 return values (CKR_*) in one vocabulary: what code an error
// carries (ckrOf, isCKR), its name for errors, logs and metrics (ckrName,
// ckrNameOf), how an operator writes one (parseCKR), what it means for the
// session, the handle cache and the library (classify), and which error
// kind a caller sees (kindOf, wrapCKR).

// ckrOf returns the PKCS#11 return value in err's chain.
func ckrOf(err error) (uint, bool) {
	if pe, ok := errors.AsType[pkcs11.Error](err); ok {
		return uint(pe), true
	}
	return 0, false
}

// isCKR reports whether err carries the PKCS#11 return value code.
func isCKR(err error, code uint) bool {
	c, ok := ckrOf(err)
	return ok && c == code
}

// ckrNameOf names the PKCS#11 return value in err's chain, or is "" when
// there is none.
func ckrNameOf(err error) string {
	if c, ok := ckrOf(err); ok {
		return ckrName(c)
	}
	return ""
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

// classify says what a PKCS#11 return value means for the session, the
// key handle cache and the library.
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

// ckrNames names every return value of the PKCS#11 v2.40 headers. It is our
// own because miekg/pkcs11 prints some codes (CKR_ACTION_PROHIBITED, 0x1B)
// without a name, and logs and metrics need a stable name for each.
var ckrNames = map[uint]string{
	0x00000000: "CKR_OK",
	0x00000001: "CKR_CANCEL",
	0x00000002: "CKR_HOST_MEMORY",
	0x00000003: "CKR_SLOT_ID_INVALID",
	0x00000005: "CKR_GENERAL_ERROR",
	0x00000006: "CKR_FUNCTION_FAILED",
	0x00000007: "CKR_ARGUMENTS_BAD",
	0x00000008: "CKR_NO_EVENT",
	0x00000009: "CKR_NEED_TO_CREATE_THREADS",
	0x0000000A: "CKR_CANT_LOCK",
	0x00000010: "CKR_ATTRIBUTE_READ_ONLY",
	0x00000011: "CKR_ATTRIBUTE_SENSITIVE",
	0x00000012: "CKR_ATTRIBUTE_TYPE_INVALID",
	0x00000013: "CKR_ATTRIBUTE_VALUE_INVALID",
	0x0000001B: "CKR_ACTION_PROHIBITED",
	0x00000020: "CKR_DATA_INVALID",
	0x00000021: "CKR_DATA_LEN_RANGE",
	0x00000030: "CKR_DEVICE_ERROR",
	0x00000031: "CKR_DEVICE_MEMORY",
	0x00000032: "CKR_DEVICE_REMOVED",
	0x00000040: "CKR_ENCRYPTED_DATA_INVALID",
	0x00000041: "CKR_ENCRYPTED_DATA_LEN_RANGE",
	0x00000050: "CKR_FUNCTION_CANCELED",
	0x00000051: "CKR_FUNCTION_NOT_PARALLEL",
	0x00000054: "CKR_FUNCTION_NOT_SUPPORTED",
	0x00000060: "CKR_KEY_HANDLE_INVALID",
	0x00000062: "CKR_KEY_SIZE_RANGE",
	0x00000063: "CKR_KEY_TYPE_INCONSISTENT",
	0x00000064: "CKR_KEY_NOT_NEEDED",
	0x00000065: "CKR_KEY_CHANGED",
	0x00000066: "CKR_KEY_NEEDED",
	0x00000067: "CKR_KEY_INDIGESTIBLE",
	0x00000068: "CKR_KEY_FUNCTION_NOT_PERMITTED",
	0x00000069: "CKR_KEY_NOT_WRAPPABLE",
	0x0000006A: "CKR_KEY_UNEXTRACTABLE",
	0x00000070: "CKR_MECHANISM_INVALID",
	0x00000071: "CKR_MECHANISM_PARAM_INVALID",
	0x00000082: "CKR_OBJECT_HANDLE_INVALID",
	0x00000090: "CKR_OPERATION_ACTIVE",
	0x00000091: "CKR_OPERATION_NOT_INITIALIZED",
	0x000000A0: "CKR_PIN_INCORRECT",
	0x000000A1: "CKR_PIN_INVALID",
	0x000000A2: "CKR_PIN_LEN_RANGE",
	0x000000A3: "CKR_PIN_EXPIRED",
	0x000000A4: "CKR_PIN_LOCKED",
	0x000000B0: "CKR_SESSION_CLOSED",
	0x000000B1: "CKR_SESSION_COUNT",
	0x000000B3: "CKR_SESSION_HANDLE_INVALID",
	0x000000B4: "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
	0x000000B5: "CKR_SESSION_READ_ONLY",
	0x000000B6: "CKR_SESSION_EXISTS",
	0x000000B7: "CKR_SESSION_READ_ONLY_EXISTS",
	0x000000B8: "CKR_SESSION_READ_WRITE_SO_EXISTS",
	0x000000C0: "CKR_SIGNATURE_INVALID",
	0x000000C1: "CKR_SIGNATURE_LEN_RANGE",
	0x000000D0: "CKR_TEMPLATE_INCOMPLETE",
	0x000000D1: "CKR_TEMPLATE_INCONSISTENT",
	0x000000E0: "CKR_TOKEN_NOT_PRESENT",
	0x000000E1: "CKR_TOKEN_NOT_RECOGNIZED",
	0x000000E2: "CKR_TOKEN_WRITE_PROTECTED",
	0x000000F0: "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
	0x000000F1: "CKR_UNWRAPPING_KEY_SIZE_RANGE",
	0x000000F2: "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
	0x00000100: "CKR_USER_ALREADY_LOGGED_IN",
	0x00000101: "CKR_USER_NOT_LOGGED_IN",
	0x00000102: "CKR_USER_PIN_NOT_INITIALIZED",
	0x00000103: "CKR_USER_TYPE_INVALID",
	0x00000104: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
	0x00000105: "CKR_USER_TOO_MANY_TYPES",
	0x00000110: "CKR_WRAPPED_KEY_INVALID",
	0x00000112: "CKR_WRAPPED_KEY_LEN_RANGE",
	0x00000113: "CKR_WRAPPING_KEY_HANDLE_INVALID",
	0x00000114: "CKR_WRAPPING_KEY_SIZE_RANGE",
	0x00000115: "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
	0x00000120: "CKR_RANDOM_SEED_NOT_SUPPORTED",
	0x00000121: "CKR_RANDOM_NO_RNG",
	0x00000130: "CKR_DOMAIN_PARAMS_INVALID",
	0x00000140: "CKR_CURVE_NOT_SUPPORTED",
	0x00000150: "CKR_BUFFER_TOO_SMALL",
	0x00000160: "CKR_SAVED_STATE_INVALID",
	0x00000170: "CKR_INFORMATION_SENSITIVE",
	0x00000180: "CKR_STATE_UNSAVEABLE",
	0x00000190: "CKR_CRYPTOKI_NOT_INITIALIZED",
	0x00000191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
	0x000001A0: "CKR_MUTEX_BAD",
	0x000001A1: "CKR_MUTEX_NOT_LOCKED",
	0x000001B0: "CKR_NEW_PIN_MODE",
	0x000001B1: "CKR_NEXT_OTP",
	0x000001B5: "CKR_EXCEEDED_MAX_ITERATIONS",
	0x000001B6: "CKR_FIPS_SELF_TEST_FAILED",
	0x000001B7: "CKR_LIBRARY_LOAD_FAILED",
	0x000001B8: "CKR_PIN_TOO_WEAK",
	0x000001B9: "CKR_PUBLIC_KEY_INVALID",
	0x00000200: "CKR_FUNCTION_REJECTED",
	0x80000000: "CKR_VENDOR_DEFINED",
}

// ckrName returns the CKR_* name of a PKCS#11 return value.
func ckrName(code uint) string {
	if name, ok := ckrNames[code]; ok {
		return name
	}
	if code > 0x80000000 {
		return fmt.Sprintf("CKR_VENDOR_DEFINED+0x%X", code-0x80000000)
	}
	return fmt.Sprintf("CKR_0x%X", code)
}

// parseCKR reads a PKCS#11 return value as an operator writes it: a name
// (CKR_FUNCTION_FAILED), the name logs give a vendor-defined code
// (CKR_VENDOR_DEFINED+0x1), or a number in decimal or 0x hex.
func parseCKR(s string) (uint, error) {
	for code, name := range ckrNames {
		if name == s {
			return code, nil
		}
	}
	base := uint64(0)
	num := s
	if rest, ok := strings.CutPrefix(s, "CKR_VENDOR_DEFINED+"); ok {
		base, num = 0x80000000, rest
	}
	n, err := strconv.ParseUint(num, 0, 32)
	if err != nil || base+n == 0 || base+n > 0xFFFFFFFF {
		return 0, fmt.Errorf("%q is not a PKCS#11 error code: give a number such as 0x80000001 or a name such as CKR_FUNCTION_FAILED", s)
	}
	return uint(base + n), nil
}
