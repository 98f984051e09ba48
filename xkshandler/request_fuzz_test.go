package xkshandler

import (
	"encoding/json"
	"reflect"
	"testing"

	"github.com/caddy-xks/caddy-xks/internal/jsonref"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// FuzzDecodeStrict: decodeBody accepts exactly the bodies that
// referenceBody, an independent strict reading, accepts, and reads the same
// values from them.
func FuzzDecodeStrict(f *testing.F) {
	for _, seed := range []string{
		`{` + metaHealth + `}`,
		`{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"additionalAuthenticatedData":null}`,
		`{` + metaCrypto + `,` + gcm + `,` + decryptBase + `,"ciphertextMetadata":"AAAA"}`,
		`{` + metaCrypto + `,"plaintext":"SGk=","PLAINTEXT":"AAAA","Plaintext":"AAAA"}`,
		`{"RequestMetadata":{"KMSKEYARN":"k","kmsRequestId":"r"}}`,
		`{"plaintext":"AAAA","plaintext":"AAAA"}`,
		`{"plain\u0074ext":"AAAA","plaintext":"AAAA"}`,
		`{"requestMetadata":{"kmsRequestId":"r","kmsRequestId":"r"}}`,
		`{"requestMetadata":{},"requestMetadata":{}}`,
		`{"x":{"a":1,"a":2},"x2":[{"b":1,"b":1}],"":{"c":1,"c":1}}`,
		`{"requestMetadata":{"x":{"kmsRequestId":1,"kmsRequestId":2}},"y":{"requestMetadata":{"a":1,"a":1}}}`,
		`{"requestMetadata":{"kmsRequestId":1}}`, `{"requestMetadata":[]}`, `{"plaintext":5}`, `{"plaintext":{}}`,
		`{` + metaHealth + `}}`, `{` + metaHealth + `}]`, `{` + metaHealth + `} x`, `{` + metaHealth + "} \n\t\r", `{}{}`,
		`{"x":1e999}`, "{\"\xff\":1,\"\xfe\":2}", `{"\ud800":1,"\udfff":2}`,
		``, `null`, `[]`, `"x"`, `{`, `{"a":1,}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		got, xerr := decodeBody(body)
		want, ok := referenceBody(body)
		if (xerr == nil) != ok {
			t.Fatalf("decodeBody error %v, reference accepts: %v", xerr, ok)
		}
		if xerr != nil {
			if got != nil || xerr.name != xksapi.ValidationException || len(xerr.message) >= 512 {
				t.Fatalf("error %v with body %+v", xerr, got)
			}
			return
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("decodeBody read\n%s\nthe reference\n%s", dump(got), dump(want))
		}
	})
}

func dump(b *requestBody) string {
	out, _ := json.Marshal(b)
	return string(out)
}

// referenceBody reads body without decodeBody's code: package jsonref
// (encoding/json) checks that it is one JSON value and nothing after it and
// refuses a name given twice in the top-level object or in
// requestMetadata; and the fields are looked up by exact name, from lists
// written here rather than taken from struct tags.
func referenceBody(body []byte) (*requestBody, bool) {
	v, err := jsonref.Read(body, func(depth int, parent string) bool {
		return depth == 0 || depth == 1 && parent == "requestMetadata"
	})
	if err != nil {
		return nil, false
	}
	top, ok := v.(map[string]any)
	if !ok {
		return nil, false
	}
	var b requestBody
	for name, field := range map[string]**string{
		"plaintext":                             &b.Plaintext,
		"ciphertext":                            &b.Ciphertext,
		"encryptionAlgorithm":                   &b.EncryptionAlgorithm,
		"additionalAuthenticatedData":           &b.AdditionalAuthenticatedData,
		"ciphertextDataIntegrityValueAlgorithm": &b.CiphertextDataIntegrityValueAlgorithm,
		"ciphertextMetadata":                    &b.CiphertextMetadata,
		"initializationVector":                  &b.InitializationVector,
		"authenticationTag":                     &b.AuthenticationTag,
	} {
		switch s := top[name].(type) {
		case nil: // absent or null
		case string:
			*field = &s
		default:
			return nil, false
		}
	}
	switch m := top["requestMetadata"].(type) {
	case nil:
	case map[string]any:
		b.RequestMetadata = &xksapi.RequestMetadata{}
		meta := b.RequestMetadata
		for name, field := range map[string]*string{
			"awsPrincipalArn": &meta.AWSPrincipalARN,
			"awsSourceVpc":    &meta.AWSSourceVPC,
			"awsSourceVpce":   &meta.AWSSourceVPCE,
			"kmsKeyArn":       &meta.KMSKeyARN,
			"kmsOperation":    &meta.KMSOperation,
			"kmsRequestId":    &meta.KMSRequestID,
			"kmsViaService":   &meta.KMSViaService,
		} {
			switch s := m[name].(type) {
			case nil:
			case string:
				*field = s
			default:
				return nil, false
			}
		}
	default:
		return nil, false
	}
	return &b, true
}
