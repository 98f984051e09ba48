// Package hsm does the cryptography of the proxy's front ends in an HSM over
// PKCS#11 (AES-256-GCM for AWS XKS; AES key wrap and RSA-OAEP for Azure
// Managed HSM's external keys), and provides the "hsm" Caddy app that owns
// named backends.
//
// A Backend is opened from a Config (module path, token, PIN, IV mode, pool
// limits) by Open or by the app, and offers Encrypt, Decrypt, Metadata,
// GenerateKey, ListKeys, WrapKey, UnwrapKey, WrapKeyMetadata,
// GenerateWrapKey, Health and Stats. Every error it returns is an
// *Error whose Kind (ErrKeyNotFound, ErrBusy, ErrTimeout, ...) says what the
// caller should answer; the CKR name is kept for logs.
//
// The rules below each come from a failure seen on a real token.
//
// Libraries. C_Initialize runs once per module path per process
// (CKR_CRYPTOKI_ALREADY_INITIALIZED counts as success) and C_Finalize only at
// process exit: every pkcs11.New of one path shares the module's state, so a
// finalize, or a C_Logout, would break every other config using it. A
// re-initialization after a device error is the one exception; it runs under
// the library's lifecycle write lock, which every PKCS#11 call holds for
// reading, and bumps a generation counter that invalidates all sessions and
// cached handles of the library.
//
// Tokens. A token is shared by all backends naming the same module and token
// identity, across config reloads, through a caddy.UsagePool: Caddy
// provisions the new config before it cleans up the old one, so the token's
// reference count never drops to zero on a reload. The token keeps a
// logged-in anchor session open for its whole life, because closing an
// application's last session logs it out and invalidates private keys'
// handles. A backend counts its operations in flight; Close refuses new ones
// and waits (boundedly) for those running before it releases the token.
//
// Sessions. Each operation takes a session of its own from a bounded pool:
// SoftHSM2 crashes the whole process when two threads share one. Waiting
// for a session is bounded (ErrBusy, for XKS ThrottlingException). A PKCS#11
// call cannot be cancelled, so an operation runs on a worker goroutine and
// the caller stops waiting at the deadline (ErrTimeout, for
// DependencyTimeoutException); the abandoned session is closed when the call
// returns, never reused. The worker keeps its pool slot until then, so the
// pool size also caps the threads stuck in the HSM. A module whose
// C_Encrypt and C_Decrypt take milliseconds (a network HSM; the shortest
// call of each window of 32 decides) has them made on threads of the
// package's own, lanes, while the worker waits in Go's network poller: a
// goroutine inside a cgo call keeps a Go P, and a few such calls left the
// HTTP side of a 2-CPU proxy without one (crypt.go). After any error in the
// middle of an operation the session is closed, since not every vendor ends
// the operation. Session-class errors (SESSION_HANDLE_INVALID,
// OPERATION_ACTIVE, GENERAL_ERROR, ...) are retried once on a new session,
// after dropping cached key handles or logging in again where the error
// says so. Module-class errors (DEVICE_ERROR, DEVICE_REMOVED,
// TOKEN_NOT_PRESENT, CRYPTOKI_NOT_INITIALIZED, ...) drain the pool and start
// a re-initialization with exponential backoff, at most one per interval;
// meanwhile every call fails fast with ErrUnavailable, and a device error or
// a reconnection makes the cached health result stale. A CKR_GENERAL_ERROR
// or CKR_FUNCTION_FAILED from C_Decrypt is a bad tag (ErrInvalidCiphertext)
// only if the token answers a cheap check right after; otherwise the
// check's error is handled as above.
//
// Logins. A PIN the token refuses is never tried again by the package
// (real HSMs lock the PIN, or zeroize the partition, after a few tries):
// the token stays unavailable, which is logged at ERROR and counted, until
// a configuration load opens a backend on it, which is one deliberate
// attempt with the PIN that load brings. A refusal is PKCS#11's PIN codes,
// and the codes the backend's pin_refused_codes names: an HSM may report a
// wrong PIN in a vendor-defined code. Every other failed login is tried
// again only after a backoff, 1s doubling to 5m: with the fault shim
// answering C_Login with a vendor's code, 20 requests made 20 logins
// before, and make one now.
//
// Keys. A key is the one CKO_SECRET_KEY token object whose CKA_LABEL is the
// external key id; two with one label is ErrDuplicateKey, never "first one
// wins". Handles and metadata are cached per library generation, and Encrypt
// and Decrypt check from the cache that the key is an enabled AES-256 key
// permitted to encrypt and decrypt, because an HSM happily runs AES-GCM with
// an AES-128 key. A key whose value can leave the HSM (CKA_SENSITIVE false,
// CKA_EXTRACTABLE true, or a token that will not say) is refused for every
// operation with ErrKeyExportable, and the log says why once, unless the
// backend sets allow_exportable_keys (for tests that check the HSM's output
// against Go's AES-GCM); a key whose value existed outside the HSM once
// (imported: CKA_ALWAYS_SENSITIVE or CKA_NEVER_EXTRACTABLE false) is served,
// with a warning. Another process can delete a key, replace it, or give a
// second key its label: a cached handle is searched again after ten
// seconds, by one call while the others go on with it, and Metadata always
// searches afresh, so that a change is noticed without a restart, and a
// second key with the label fails every call, as it would after one. A
// missing label is searched again at most once a second.
// nShield shows only keys loaded at C_Initialize unless
// CKNFAST_ASSUME_SINGLE_PROCESS=0 is set (through Config.Env); keys created
// by another process otherwise need a restart.
//
// IVs. How a GCM IV is made depends on the vendor: "caller" (random bytes
// from crypto/rand; SoftHSM2 never generates one and silently encrypts with
// whatever it is given, zeros included), "hsm" (pass 12 zero bytes, the HSM
// writes its IV back; nShield, CloudHSM) or "hsm_appended" (Luna in FIPS
// mode appends a 16-byte IV). A start-up self-test on a throw-away session
// key proves the mode (two encryptions, different non-zero IVs, both
// decrypt), and "auto" uses it to detect one. Every IV returned is checked
// against zeros and against the recent IVs of the token; a repeat is a hard
// error, never a silent nonce reuse.
//
// Key wrap. AES key wrap (RFC 3394) and AES key wrap with padding (RFC
// 5649) run as C_Encrypt/C_Decrypt on a token whose C_GetMechanismInfo
// flags offer that (NSS softokn), else as C_WrapKey/C_UnwrapKey with the
// data key in a session object that is destroyed on every path out of the
// call (SoftHSM2, nShield); never a token object. RFC 5649's mechanism
// number differs by token (0x210B, CKM_AES_KEY_WRAP_KWP, on NSS and in
// PKCS#11 3.x; 0x210A on SoftHSM2, where NSS and PKCS#11 3.x mean PKCS#7
// padding by it), so it is the setting kwp_mechanism, probed when unset.
// Open runs a known-answer test of every path and number on the RFCs' own
// vectors: a mechanism that gives other bytes is not used, and a
// configured one fails the backend with the number that passes. SoftHSM2
// 2.6.1 pads data keys with zeros to whole 8-byte blocks before it wraps
// them, silently: RFC 3394 inputs that are not whole blocks are refused
// before the token sees them, and RFC 5649 lengths the test found wrong.
// RSA-OAEP unwraps on the private key in the HSM with the algorithm's hash
// and MGF (never a raw decryption padded on the host); it wraps in software
// with the public key read from the token, once the key pair is proven to
// unwrap what it wraps, so that a token that cannot do a hash (SoftHSM2
// does OAEP with SHA-1 only) or a public key of another pair never yields
// a wrapped key that cannot be unwrapped (keywrap.go, wrapkeys.go, rsa.go).
//
// Tests use real SoftHSM2 tokens and NSS softokn from package hsmtest, and
// a fault-injection shim module (internal/faultshim) for device errors,
// dead sessions and hangs.
package hsm
