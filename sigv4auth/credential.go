package sigv4auth

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/base64"
	"fmt"
	"sync/atomic"
)

// Credential is one access key id and secret access key pair that AWS KMS
// may sign XKS requests with.
type Credential struct {
	// AccessKeyID identifies the credential in the Authorization header:
	// 20 to 30 characters of A-Z and 2-7.
	AccessKeyID string
	// SecretAccessKey is the shared secret: 43 to 64 characters of A-Z, a-z,
	// 0-9, '/', '+' and '='. It is used as raw bytes, not Base64-decoded.
	SecretAccessKey string
}

// The bounds that AWS KMS puts on XKS proxy credentials
// (XksProxyAuthenticationCredentialType).
const (
	minAccessKeyIDLen = 20
	maxAccessKeyIDLen = 30
	minSecretLen      = 43
	maxSecretLen      = 64
)

// ValidateCredential reports whether c satisfies the constraints AWS KMS puts
// on XKS proxy credentials. Errors name the access key id, never the secret.
func ValidateCredential(c Credential) error {
	id := accessKeyIDForConfigError(c.AccessKeyID)
	if n := len(c.AccessKeyID); n < minAccessKeyIDLen || n > maxAccessKeyIDLen {
		return fmt.Errorf("access key id %s: must be %d to %d characters long, got %d",
			id, minAccessKeyIDLen, maxAccessKeyIDLen, n)
	}
	if !isAccessKeyIDSyntax(c.AccessKeyID) {
		return fmt.Errorf("access key id %s: must contain only A-Z and 2-7", id)
	}
	if n := len(c.SecretAccessKey); n < minSecretLen || n > maxSecretLen {
		return fmt.Errorf("access key id %s: secret access key must be %d to %d characters long, got %d",
			id, minSecretLen, maxSecretLen, n)
	}
	for i := 0; i < len(c.SecretAccessKey); i++ {
		if !isSecretByte(c.SecretAccessKey[i]) {
			return fmt.Errorf("access key id %s: secret access key must contain only A-Z, a-z, 0-9, '/', '+' and '='", id)
		}
	}
	return nil
}

// NewCredential makes a fresh credential by AWS KMS's rules: an access key
// id of 24 characters of A-Z and 2-7 (Base32 of 120 random bits, unrelated
// to the secret) and a secret access key of 44 characters of A-Z, a-z, 0-9,
// '+' and '/' (Base64 of 264 random bits).
func NewCredential() (Credential, error) {
	var idBytes [15]byte
	var secretBytes [33]byte
	if _, err := rand.Read(idBytes[:]); err != nil {
		return Credential{}, err
	}
	if _, err := rand.Read(secretBytes[:]); err != nil {
		return Credential{}, err
	}
	c := Credential{
		AccessKeyID:     base32.StdEncoding.EncodeToString(idBytes[:]),
		SecretAccessKey: base64.StdEncoding.EncodeToString(secretBytes[:]),
	}
	// The lengths above always satisfy the rules; checking costs nothing
	// and keeps this function honest if they are ever changed.
	return c, ValidateCredential(c)
}

// accessKeyIDForConfigError quotes an access key id for a configuration
// error. A value as long as a secret is not echoed: it is most likely a
// secret pasted into the wrong field.
func accessKeyIDForConfigError(id string) string {
	if len(id) >= minSecretLen {
		return fmt.Sprintf("(%d characters, not shown)", len(id))
	}
	return fmt.Sprintf("%q", id)
}

// isAccessKeyIDSyntax reports whether s is 20 to 30 characters of A-Z and 2-7.
func isAccessKeyIDSyntax(s string) bool {
	if len(s) < minAccessKeyIDLen || len(s) > maxAccessKeyIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < 'A' || c > 'Z') && (c < '2' || c > '7') {
			return false
		}
	}
	return true
}

func isSecretByte(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' ||
		c == '/' || c == '+' || c == '='
}

// credentialState is a configured credential with its signing-key cache.
type credentialState struct {
	accessKeyID string
	secret      string
	keys        atomic.Pointer[signingKeys]
}

// signingKeys holds the signing keys of the two most recent days a
// credential was used on, so that requests from either side of midnight UTC
// (within the clock skew) do not evict each other's key.
type signingKeys struct {
	latest, previous signingKey
}

// signingKey is a derived SigV4 signing key for one day, kept as the HMAC
// inner and outer pad blocks so that each signature costs two SHA-256 calls.
type signingKey struct {
	date       [8]byte
	ipad, opad [sha256.BlockSize]byte
}

// signingKeyFor returns the signing key for the day date (yyyymmdd) in the
// verifier's region and service, deriving and caching it on first use.
func (c *credentialState) signingKeyFor(date, region, service string) *signingKey {
	cached := c.keys.Load()
	if cached != nil {
		if string(cached.latest.date[:]) == date {
			return &cached.latest
		}
		if string(cached.previous.date[:]) == date {
			return &cached.previous
		}
	}
	next := &signingKeys{}
	if cached != nil {
		next.previous = cached.latest
	}
	copy(next.latest.date[:], date)
	key := deriveSigningKey(c.secret, date, region, service)
	for i := range sha256.BlockSize {
		var b byte
		if i < len(key) {
			b = key[i]
		}
		next.latest.ipad[i] = b ^ 0x36
		next.latest.opad[i] = b ^ 0x5c
	}
	// Concurrent first uses of a day may each derive the key; the last store
	// wins and every derived key is the same, so no lock is needed.
	c.keys.Store(next)
	return &next.latest
}

// deriveSigningKey computes
// HMAC(HMAC(HMAC(HMAC("AWS4"+secret, date), region), service), "aws4_request").
func deriveSigningKey(secret, date, region, service string) []byte {
	key := hmacSHA256([]byte("AWS4"+secret), date)
	key = hmacSHA256(key, region)
	key = hmacSHA256(key, service)
	return hmacSHA256(key, "aws4_request")
}

func hmacSHA256(key []byte, data string) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(data))
	return mac.Sum(nil)
}

// sign returns HMAC-SHA256(key, message). scratch is a buffer the caller
// lends so that signing does not allocate; it is returned, possibly grown.
func (k *signingKey) sign(message []byte, scratch []byte) ([sha256.Size]byte, []byte) {
	scratch = append(scratch[:0], k.ipad[:]...)
	scratch = append(scratch, message...)
	inner := sha256.Sum256(scratch)
	var outer [sha256.BlockSize + sha256.Size]byte
	copy(outer[:], k.opad[:])
	copy(outer[sha256.BlockSize:], inner[:])
	return sha256.Sum256(outer[:]), scratch
}
