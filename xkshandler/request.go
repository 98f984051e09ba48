package xkshandler

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// requestBody is the union of the four request shapes. Fields that do not
// belong to an operation are ignored like any other unknown field, as the
// spec requires. Pointers tell a missing field from an empty one. decodeBody
// matches names against the json tags, here and in xksapi.RequestMetadata.
type requestBody struct {
	RequestMetadata                       *xksapi.RequestMetadata `json:"requestMetadata"`
	Plaintext                             *string                 `json:"plaintext"`
	Ciphertext                            *string                 `json:"ciphertext"`
	EncryptionAlgorithm                   *string                 `json:"encryptionAlgorithm"`
	AdditionalAuthenticatedData           *string                 `json:"additionalAuthenticatedData"`
	CiphertextDataIntegrityValueAlgorithm *string                 `json:"ciphertextDataIntegrityValueAlgorithm"`
	CiphertextMetadata                    *string                 `json:"ciphertextMetadata"`
	InitializationVector                  *string                 `json:"initializationVector"`
	AuthenticationTag                     *string                 `json:"authenticationTag"`
}

// xksRequest is a decoded and validated request: binary fields are decoded
// from Base64 and checked against the spec's limits.
type xksRequest struct {
	// requestMetadata is validated only for the presence of the required
	// fields; their content is opaque (kmsRequestId in particular MUST NOT
	// be validated) and feeds logging and authorization.
	requestMetadata xksapi.RequestMetadata

	plaintext          []byte // Encrypt
	ciphertext         []byte // Decrypt
	aad                []byte // Encrypt, Decrypt; nil when absent
	iv                 []byte // Decrypt
	tag                []byte // Decrypt
	ciphertextMetadata []byte // Decrypt, as received
	wantCDIV           bool   // Encrypt
}

// decodeRequest parses and validates the body of op. Every failure is a
// ValidationException (UnsupportedOperationException for an AAD too long for
// the HSM framing), whatever the operation, health included.
func decodeRequest(op operation, body []byte) (*xksRequest, *xksError) {
	b, xerr := decodeBody(body)
	if xerr != nil {
		return nil, xerr
	}
	if b.RequestMetadata == nil {
		return nil, validationError("requestMetadata is required")
	}
	req := &xksRequest{requestMetadata: *b.RequestMetadata}
	m := &req.requestMetadata
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

	switch op {
	case opHealth, opMetadata:
		// requestMetadata is all they carry.
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
		if n := len(req.iv); !xksapi.ValidIVLen(n) {
			return nil, validationError(fmt.Sprintf("initializationVector must be %d or %d bytes, got %d", xksapi.IVLen, xksapi.LongIVLen, n))
		}
		if req.tag, xerr = requiredBase64("authenticationTag", b.AuthenticationTag); xerr != nil {
			return nil, xerr
		}
		if n := len(req.tag); n != xksapi.TagLen {
			return nil, validationError(fmt.Sprintf("authenticationTag must be %d bytes, got %d", xksapi.TagLen, n))
		}
		if b.CiphertextMetadata != nil {
			if req.ciphertextMetadata, xerr = decodeBase64("ciphertextMetadata", *b.CiphertextMetadata); xerr != nil {
				return nil, xerr
			}
			if n := len(req.ciphertextMetadata); n > xksapi.MaxCiphertextMetadataLen {
				return nil, validationError(fmt.Sprintf("ciphertextMetadata must be at most %d bytes, got %d", xksapi.MaxCiphertextMetadataLen, n))
			}
		}
	}
	return req, nil
}

// decodeBody reads body as exactly one JSON object into a requestBody,
// with frontend.DecodeObject's strict rules: a name fills a field only if
// it is spelled as the field's json tag, case included ("PLAINTEXT" is an
// unknown field, not plaintext); a name given twice in the body or in
// requestMetadata is refused, where encoding/json would keep the last; and
// only white space may follow the object. Unknown names are skipped, as the
// spec requires, whatever their value.
func decodeBody(body []byte) (*requestBody, *xksError) {
	var b requestBody
	if err := frontend.DecodeObject(body, &b); err != nil {
		if de, ok := errors.AsType[*frontend.DecodeError](err); ok {
			return nil, validationError(de.Message)
		}
		return nil, validationError(frontend.ErrNotJSON)
	}
	return &b, nil
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
	if len(aad) > xksapi.MaxAADLen {
		return nil, newError(xksapi.UnsupportedOperationException, fmt.Sprintf("additionalAuthenticatedData longer than %d bytes is not supported", xksapi.MaxAADLen))
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
