package xksapi

import "time"

// MaxHealthAge is the oldest a deep health result that GetHealthStatus
// reports may be: the spec lets a proxy answer from a cached check, which
// "MUST not be older than one minute". The HSM layer's health_ttl and the
// key store's key check both keep to it.
const MaxHealthAge = time.Minute

// The spec's sizes and limits of the binary fields, in bytes before Base64,
// and of errorMessage. The proxy's handler, its HSM layer and `caddy xks
// check` all take them from here.
const (
	// IVLen is the length of a 96-bit initializationVector, the one every
	// HSM supports; LongIVLen that of a 128-bit one. No other length is
	// allowed.
	IVLen     = 12
	LongIVLen = 16

	// TagLen is the length of an authenticationTag, exactly.
	TagLen = 16

	// MaxCiphertextMetadataLen bounds ciphertextMetadata, which KMS
	// refuses above it.
	MaxCiphertextMetadataLen = 20

	// SupportedPlaintextLen is the plaintext (and ciphertext) length a
	// proxy MUST support at the least: KMS sends its own ciphertext of a
	// data key as the plaintext.
	SupportedPlaintextLen = 4300

	// SupportedAADLen is the additionalAuthenticatedData length a proxy
	// MUST support at the least.
	SupportedAADLen = 8192

	// MaxAADLen is the longest additionalAuthenticatedData the spec's
	// framing of the HSM's AAD can carry: it gives the length in two bytes.
	MaxAADLen = 1<<16 - 1

	// MaxErrorMessageLen is the longest errorMessage: the spec asks for
	// fewer than 512 characters.
	MaxErrorMessageLen = 511
)

// ValidIVLen reports whether n is a length an initializationVector may
// have: 12 or 16 bytes.
func ValidIVLen(n int) bool {
	return n == IVLen || n == LongIVLen
}

// ValidErrorMessage reports whether s meets the spec's rules for an
// errorMessage: at most MaxErrorMessageLen characters, each printable ASCII
// (0x20 to 0x7E).
func ValidErrorMessage(s string) bool {
	if len(s) > MaxErrorMessageLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !printableASCII(s[i]) {
			return false
		}
	}
	return true
}

// ErrorMessage makes s a valid errorMessage: it keeps the first
// MaxErrorMessageLen bytes and writes '?' for each one that is not
// printable ASCII.
func ErrorMessage(s string) string {
	out := []byte(s[:min(len(s), MaxErrorMessageLen)])
	for i, c := range out {
		if !printableASCII(c) {
			out[i] = '?'
		}
	}
	return string(out)
}

func printableASCII(c byte) bool {
	return c >= 0x20 && c <= 0x7e
}
