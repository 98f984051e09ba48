package xkshandler

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"unicode/utf8"

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

// decodeBody reads body as exactly one JSON object into a requestBody. It
// is stricter than encoding/json in three ways: a name fills a field only if
// it is spelled as the field's json tag, case included ("PLAINTEXT" is an
// unknown field, not plaintext); a name given twice in the body or in
// requestMetadata is refused, where encoding/json would keep the last; and
// only white space may follow the object. Unknown names are skipped, as the
// spec requires, whatever their value.
//
// encoding/json checks the body first (json.Valid, which allocates
// nothing); the walk below then only has to find the members of a valid
// JSON text, and strings with escapes or bytes past ASCII are unquoted by
// encoding/json itself, so every value reads as encoding/json reads it.
func decodeBody(body []byte) (*requestBody, *xksError) {
	if !json.Valid(body) {
		var first json.RawMessage
		if json.NewDecoder(bytes.NewReader(body)).Decode(&first) == nil {
			return nil, validationError("request body has data after the JSON object")
		}
		return nil, validationError(errNotJSON)
	}
	w := walker{buf: body}
	w.space()
	if w.peek() != '{' {
		return nil, validationError("request body is not a JSON object")
	}
	w.i++
	var b requestBody
	if xerr := w.object("", bodyFields, reflect.ValueOf(&b).Elem()); xerr != nil {
		return nil, xerr
	}
	return &b, nil
}

// errNotJSON is the message for a body encoding/json cannot read.
const errNotJSON = "request body is not valid JSON"

// fieldTable maps the json tag names of a struct's fields to their index.
type fieldTable map[string]int

func fieldsOf(t reflect.Type) fieldTable {
	ft := make(fieldTable, t.NumField())
	for i := range t.NumField() {
		if name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ","); name != "" && name != "-" {
			ft[name] = i
		}
	}
	return ft
}

var (
	bodyFields     = fieldsOf(reflect.TypeFor[requestBody]())
	metadataFields = fieldsOf(reflect.TypeFor[xksapi.RequestMetadata]())
)

// walker reads the members of a JSON text that json.Valid accepted.
type walker struct {
	buf []byte
	i   int
}

func (w *walker) peek() byte {
	if w.i < len(w.buf) {
		return w.buf[w.i]
	}
	return 0
}

func (w *walker) space() {
	for w.i < len(w.buf) {
		switch w.buf[w.i] {
		case ' ', '\t', '\n', '\r':
			w.i++
		default:
			return
		}
	}
}

// str reads the string at w.i and returns its value.
func (w *walker) str() string {
	start := w.i
	w.i++ // the opening quote
	plain := true
	for {
		switch c := w.buf[w.i]; c {
		case '"':
			w.i++
			if plain {
				return string(w.buf[start+1 : w.i-1])
			}
			var s string
			_ = json.Unmarshal(w.buf[start:w.i], &s) // valid: json.Valid said so
			return s
		case '\\':
			plain = false
			w.i += 2
		default:
			plain = plain && c < utf8.RuneSelf
			w.i++
		}
	}
}

// skip passes over the value at w.i.
func (w *walker) skip() {
	switch w.buf[w.i] {
	case '"':
		w.str()
	case '{', '[':
		depth := 0
		for {
			switch w.buf[w.i] {
			case '"':
				w.str()
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
			}
			w.i++
			if depth == 0 {
				return
			}
		}
	default: // a number, true, false or null
		for w.i < len(w.buf) {
			switch w.buf[w.i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				return
			}
			w.i++
		}
	}
}

// names remembers the member names of one object, to refuse one given
// twice: a short list, and a map once there are many.
type names struct {
	list []string
	set  map[string]bool
}

func (n *names) add(name string) (dup bool) {
	if n.set != nil {
		dup = n.set[name]
		n.set[name] = true
		return dup
	}
	if slices.Contains(n.list, name) {
		return true
	}
	n.list = append(n.list, name)
	if len(n.list) > 16 {
		n.set = make(map[string]bool, 2*len(n.list))
		for _, s := range n.list {
			n.set[s] = true
		}
	}
	return false
}

// object reads the members of the object whose '{' w has just passed, up
// to its '}', into the struct v, whose fields ft names. path is the
// object's name in messages, "" for the body itself.
func (w *walker) object(path string, ft fieldTable, v reflect.Value) *xksError {
	var seen names
	seen.list = make([]string, 0, 16)
	w.space()
	if w.peek() == '}' {
		w.i++
		return nil
	}
	for {
		w.space()
		name := w.str()
		idx, known := ft[name]
		if seen.add(name) {
			// An unknown name is not echoed: it is the client's text.
			if known {
				return validationError(fieldPath(path, name) + " is given twice")
			}
			if path == "" {
				return validationError("request body has a field name twice")
			}
			return validationError(path + " has a field name twice")
		}
		w.space()
		w.i++ // the colon
		w.space()
		if known {
			if xerr := w.field(path, name, v.Field(idx)); xerr != nil {
				return xerr
			}
		} else {
			w.skip()
		}
		w.space()
		c := w.buf[w.i]
		w.i++ // a comma or the closing '}'
		if c == '}' {
			return nil
		}
	}
}

// field reads the value of the known field name of the object at path: a
// string, a pointer to a string, or a pointer to a struct read as an object
// (requestMetadata, the only one). JSON null leaves the field unset, as
// encoding/json does.
func (w *walker) field(path, name string, f reflect.Value) *xksError {
	switch c := w.peek(); {
	case c == 'n':
		w.i += len("null")
		return nil
	case f.Kind() == reflect.Pointer && f.Type().Elem().Kind() == reflect.Struct:
		if c != '{' {
			return validationError(fieldPath(path, name) + " must be an object")
		}
		w.i++
		f.Set(reflect.New(f.Type().Elem()))
		return w.object(fieldPath(path, name), metadataFields, f.Elem())
	case c != '"':
		return validationError(fieldPath(path, name) + " must be a string")
	}
	s := w.str()
	if f.Kind() == reflect.Pointer {
		f.Set(reflect.ValueOf(&s))
	} else {
		f.SetString(s)
	}
	return nil
}

// fieldPath names the member name of the object at path in messages.
func fieldPath(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
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
		return nil, newError(UnsupportedOperationException, fmt.Sprintf("additionalAuthenticatedData longer than %d bytes is not supported", xksapi.MaxAADLen))
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
