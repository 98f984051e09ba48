package xkshandler

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// operation is one of the four XKS API calls.
type operation uint8

const (
	opHealth operation = iota + 1
	opMetadata
	opEncrypt
	opDecrypt
)

// String is the XKS API name of the operation, as it appears in logs.
func (op operation) String() string {
	switch op {
	case opHealth:
		return "GetHealthStatus"
	case opMetadata:
		return "GetKeyMetadata"
	case opEncrypt:
		return "Encrypt"
	case opDecrypt:
		return "Decrypt"
	}
	return "unknown"
}

// Field limits from the XKS spec. The spec gives minimums the proxy must
// support (4300-byte plaintext, 8192-byte AAD); the framing of the AAD given
// to the HSM carries the AAD length in two bytes, which is the real ceiling.
const (
	maxAADLen                = 1<<16 - 1
	maxCiphertextMetadataLen = 20
	tagLen                   = 16
)

// requestMetadata is validated only for the presence of the required
// fields; their content is opaque (kmsRequestId in particular MUST NOT be
// validated) and feeds logging and authorization.
type requestMetadata = xksapi.RequestMetadata

// requestBody is the union of the four request shapes. Fields that do not
// belong to an operation are ignored like any other unknown field, as the
// spec requires. Pointers tell a missing field from an empty one.
type requestBody struct {
	RequestMetadata                       *requestMetadata `json:"requestMetadata"`
	Plaintext                             *string          `json:"plaintext"`
	Ciphertext                            *string          `json:"ciphertext"`
	EncryptionAlgorithm                   *string          `json:"encryptionAlgorithm"`
	AdditionalAuthenticatedData           *string          `json:"additionalAuthenticatedData"`
	CiphertextDataIntegrityValueAlgorithm *string          `json:"ciphertextDataIntegrityValueAlgorithm"`
	CiphertextMetadata                    *string          `json:"ciphertextMetadata"`
	InitializationVector                  *string          `json:"initializationVector"`
	AuthenticationTag                     *string          `json:"authenticationTag"`
}

// xksRequest is a decoded and validated request: binary fields are decoded
// from Base64 and checked against the spec's limits.
type xksRequest struct {
	meta requestMetadata

	plaintext  []byte // Encrypt
	ciphertext []byte // Decrypt
	aad        []byte // Encrypt, Decrypt; nil when absent
	iv         []byte // Decrypt
	tag        []byte // Decrypt
	metadata   []byte // Decrypt: ciphertextMetadata as received
	wantCDIV   bool   // Encrypt
}

// decodeRequest parses and validates the body of op. Every failure is a
// ValidationException (UnsupportedOperationException for an AAD too long for
// the HSM framing), whatever the operation, health included.
func decodeRequest(op operation, body []byte) (*xksRequest, *xksError) {
	var b requestBody
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&b); err != nil {
		return nil, validationError("request body is not a valid JSON object")
	}
	if dec.More() {
		return nil, validationError("request body has data after the JSON object")
	}
	if b.RequestMetadata == nil {
		return nil, validationError("requestMetadata is required")
	}
	req := &xksRequest{meta: *b.RequestMetadata}
	m := &req.meta
	switch {
	case m.KMSRequestID == "":
		return nil, validationError("requestMetadata.kmsRequestId is required")
	case m.KMSOperation == "":
		return nil, validationError("requestMetadata.kmsOperation is required")
	case op != opHealth && m.AWSPrincipalARN == "":
		return nil, validationError("requestMetadata.awsPrincipalArn is required")
	case (op == opEncrypt || op == opDecrypt) && m.KMSKeyARN == "":
		return nil, validationError("requestMetadata.kmsKeyArn is required")
	}

	var xerr *xksError
	switch op {
	case opEncrypt:
		if xerr = requireAlgorithm(b.EncryptionAlgorithm); xerr != nil {
			return nil, xerr
		}
		if req.plaintext, xerr = requiredBase64("plaintext", b.Plaintext); xerr != nil {
			return nil, xerr
		}
		if req.aad, xerr = optionalAAD(b.AdditionalAuthenticatedData); xerr != nil {
			return nil, xerr
		}
		if alg := b.CiphertextDataIntegrityValueAlgorithm; alg != nil {
			if *alg != "SHA_256" {
				return nil, validationError("ciphertextDataIntegrityValueAlgorithm must be SHA_256")
			}
			req.wantCDIV = true
		}
	case opDecrypt:
		if xerr = requireAlgorithm(b.EncryptionAlgorithm); xerr != nil {
			return nil, xerr
		}
		if req.ciphertext, xerr = requiredBase64("ciphertext", b.Ciphertext); xerr != nil {
			return nil, xerr
		}
		if req.aad, xerr = optionalAAD(b.AdditionalAuthenticatedData); xerr != nil {
			return nil, xerr
		}
		if req.iv, xerr = requiredBase64("initializationVector", b.InitializationVector); xerr != nil {
			return nil, xerr
		}
		if n := len(req.iv); n != 12 && n != 16 {
			return nil, validationError(fmt.Sprintf("initializationVector must be 12 or 16 bytes, got %d", n))
		}
		if req.tag, xerr = requiredBase64("authenticationTag", b.AuthenticationTag); xerr != nil {
			return nil, xerr
		}
		if n := len(req.tag); n != tagLen {
			return nil, validationError(fmt.Sprintf("authenticationTag must be 16 bytes, got %d", n))
		}
		if b.CiphertextMetadata != nil {
			if req.metadata, xerr = decodeBase64("ciphertextMetadata", *b.CiphertextMetadata); xerr != nil {
				return nil, xerr
			}
			if n := len(req.metadata); n > maxCiphertextMetadataLen {
				return nil, validationError(fmt.Sprintf("ciphertextMetadata must be at most 20 bytes, got %d", n))
			}
		}
	}
	return req, nil
}

func requireAlgorithm(alg *string) *xksError {
	if alg == nil {
		return validationError("encryptionAlgorithm is required")
	}
	if *alg != "AES_GCM" {
		return validationError("encryptionAlgorithm must be AES_GCM")
	}
	return nil
}

func requiredBase64(field string, s *string) ([]byte, *xksError) {
	if s == nil {
		return nil, validationError(field + " is required")
	}
	return decodeBase64(field, *s)
}

func optionalAAD(s *string) ([]byte, *xksError) {
	if s == nil {
		return nil, nil
	}
	aad, xerr := decodeBase64("additionalAuthenticatedData", *s)
	if xerr != nil {
		return nil, xerr
	}
	if len(aad) > maxAADLen {
		return nil, newError(UnsupportedOperationException, fmt.Sprintf("additionalAuthenticatedData longer than %d bytes is not supported", maxAADLen))
	}
	return aad, nil
}

// strictBase64 is standard Base64 with padding (RFC 4648 §4), as the spec
// requires. Strict mode rejects non-zero padding bits, so one value has one
// encoding; line breaks, which the decoder would otherwise skip, are refused
// separately.
var strictBase64 = base64.StdEncoding.Strict()

func decodeBase64(field, s string) ([]byte, *xksError) {
	if strings.ContainsAny(s, "\r\n") {
		return nil, validationError(field + " is not valid Base64")
	}
	out, err := strictBase64.DecodeString(s)
	if err != nil {
		return nil, validationError(field + " is not valid Base64")
	}
	return out, nil
}
