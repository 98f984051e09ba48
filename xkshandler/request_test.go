package xkshandler

import (
	"encoding/base64"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

const (
	metaHealth  = `"requestMetadata":{"kmsRequestId":"r-1","kmsOperation":"KmsHealthCheck"}`
	metaKey     = `"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::123456789012:user/Alice","kmsOperation":"CreateKey","kmsRequestId":"r-1"}`
	metaCrypto  = `"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::123456789012:user/Alice","kmsKeyArn":"arn:aws:kms:us-east-1:123456789012:key/k","kmsOperation":"Encrypt","kmsRequestId":"r-1"}`
	b64IV12     = "AAECAwQFBgcICQoL"
	b64Tag16    = "AAECAwQFBgcICQoLDA0ODw=="
	b64Hello    = "SGVsbG8gV29ybGQh"
	gcm         = `"encryptionAlgorithm":"AES_GCM"`
	decryptBase = `"ciphertext":"` + b64Hello + `","initializationVector":"` + b64IV12 + `","authenticationTag":"` + b64Tag16 + `"`
)

func b64(n int) string { return base64.StdEncoding.EncodeToString(make([]byte, n)) }

func TestDecodeRequestRejects(t *testing.T) {
	tests := []struct {
		name     string
		op       operation
		body     string
		wantName string
	}{
		{"empty body", opHealth, ``, xksapi.ValidationException},
		{"not JSON", opHealth, `hello`, xksapi.ValidationException},
		{"JSON array", opHealth, `[]`, xksapi.ValidationException},
		{"data after the object", opHealth, `{` + metaHealth + `}{}`, xksapi.ValidationException},
		{"health: no requestMetadata", opHealth, `{}`, xksapi.ValidationException},
		{"health: empty requestMetadata", opHealth, `{"requestMetadata":{}}`, xksapi.ValidationException},
		{"health: null requestMetadata", opHealth, `{"requestMetadata":null}`, xksapi.ValidationException},
		{"health: requestMetadata not an object", opHealth, `{"requestMetadata":"x"}`, xksapi.ValidationException},
		{"health: no kmsOperation", opHealth, `{"requestMetadata":{"kmsRequestId":"r"}}`, xksapi.ValidationException},
		{"health: kmsRequestId not a string", opHealth, `{"requestMetadata":{"kmsRequestId":1,"kmsOperation":"x"}}`, xksapi.ValidationException},
		{"metadata: no awsPrincipalArn", opMetadata, `{` + metaHealth + `}`, xksapi.ValidationException},
		{"encrypt: no kmsKeyArn", opEncrypt, `{` + metaKey + `,"plaintext":"` + b64Hello + `",` + gcm + `}`, xksapi.ValidationException},
		{"encrypt: no plaintext", opEncrypt, `{` + metaCrypto + `,` + gcm + `}`, xksapi.ValidationException},
		{"encrypt: plaintext not Base64", opEncrypt, `{` + metaCrypto + `,"plaintext":"%%%",` + gcm + `}`, xksapi.ValidationException},
		{"encrypt: plaintext URL-safe Base64", opEncrypt, `{` + metaCrypto + `,"plaintext":"-_-_",` + gcm + `}`, xksapi.ValidationException},
		{"encrypt: plaintext without padding", opEncrypt, `{` + metaCrypto + `,"plaintext":"SGk",` + gcm + `}`, xksapi.ValidationException},
		{"encrypt: plaintext with non-zero padding bits", opEncrypt, `{` + metaCrypto + `,"plaintext":"SGl=",` + gcm + `}`, xksapi.ValidationException},
		{"encrypt: plaintext with a line break", opEncrypt, `{` + metaCrypto + `,"plaintext":"SGVs\nbG8gV29ybGQh",` + gcm + `}`, xksapi.ValidationException},
		{"encrypt: plaintext a number", opEncrypt, `{` + metaCrypto + `,"plaintext":5,` + gcm + `}`, xksapi.ValidationException},
		{"encrypt: no encryptionAlgorithm", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `"}`, xksapi.ValidationException},
		{"encrypt: encryptionAlgorithm AES_CBC", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `","encryptionAlgorithm":"AES_CBC"}`, xksapi.ValidationException},
		{"encrypt: CDIV algorithm SHA_512", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"ciphertextDataIntegrityValueAlgorithm":"SHA_512"}`, xksapi.ValidationException},
		{"encrypt: AAD not Base64", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"additionalAuthenticatedData":"***"}`, xksapi.ValidationException},
		{"encrypt: AAD over 65535 bytes", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"additionalAuthenticatedData":"` + b64(65536) + `"}`, xksapi.UnsupportedOperationException},
		{"decrypt: no ciphertext", opDecrypt, `{` + metaCrypto + `,` + gcm + `,"initializationVector":"` + b64IV12 + `","authenticationTag":"` + b64Tag16 + `"}`, xksapi.ValidationException},
		{"decrypt: no IV", opDecrypt, `{` + metaCrypto + `,` + gcm + `,"ciphertext":"` + b64Hello + `","authenticationTag":"` + b64Tag16 + `"}`, xksapi.ValidationException},
		{"decrypt: no tag", opDecrypt, `{` + metaCrypto + `,` + gcm + `,"ciphertext":"` + b64Hello + `","initializationVector":"` + b64IV12 + `"}`, xksapi.ValidationException},
		{"decrypt: 11-byte IV", opDecrypt, `{` + metaCrypto + `,` + gcm + `,"ciphertext":"` + b64Hello + `","initializationVector":"` + b64(11) + `","authenticationTag":"` + b64Tag16 + `"}`, xksapi.ValidationException},
		{"decrypt: 13-byte IV", opDecrypt, `{` + metaCrypto + `,` + gcm + `,"ciphertext":"` + b64Hello + `","initializationVector":"` + b64(13) + `","authenticationTag":"` + b64Tag16 + `"}`, xksapi.ValidationException},
		{"decrypt: 15-byte tag", opDecrypt, `{` + metaCrypto + `,` + gcm + `,"ciphertext":"` + b64Hello + `","initializationVector":"` + b64IV12 + `","authenticationTag":"` + b64(15) + `"}`, xksapi.ValidationException},
		{"decrypt: 21-byte ciphertextMetadata", opDecrypt, `{` + metaCrypto + `,` + gcm + `,` + decryptBase + `,"ciphertextMetadata":"` + b64(21) + `"}`, xksapi.ValidationException},
		{"decrypt: no encryptionAlgorithm", opDecrypt, `{` + metaCrypto + `,` + decryptBase + `}`, xksapi.ValidationException},
		{"JSON null", opHealth, `null`, xksapi.ValidationException},
		{"names are case-sensitive: PLAINTEXT is not plaintext", opEncrypt, `{` + metaCrypto + `,"PLAINTEXT":"` + b64Hello + `",` + gcm + `}`, xksapi.ValidationException},
		{"names are case-sensitive: RequestMetadata is not requestMetadata", opHealth, `{"RequestMetadata":{"kmsRequestId":"r-1","kmsOperation":"KmsHealthCheck"}}`, xksapi.ValidationException},
		{"names are case-sensitive: KMSKEYARN is not kmsKeyArn", opEncrypt, `{"requestMetadata":{"awsPrincipalArn":"a","KMSKEYARN":"k","kmsOperation":"Encrypt","kmsRequestId":"r-1"},"plaintext":"` + b64Hello + `",` + gcm + `}`, xksapi.ValidationException},
		{"a field given twice", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"plaintext":"AAAA"}`, xksapi.ValidationException},
		{"a field given twice, once with an escaped name", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"plain\u0074ext":"AAAA"}`, xksapi.ValidationException},
		{"an unknown field given twice", opHealth, `{` + metaHealth + `,"x":1,"x":1}`, xksapi.ValidationException},
		{"requestMetadata given twice", opHealth, `{` + metaHealth + `,` + metaHealth + `}`, xksapi.ValidationException},
		{"a requestMetadata field given twice", opHealth, `{"requestMetadata":{"kmsRequestId":"r-1","kmsOperation":"KmsHealthCheck","kmsRequestId":"r-2"}}`, xksapi.ValidationException},
		{"an unknown requestMetadata field given twice", opHealth, `{"requestMetadata":{"kmsRequestId":"r-1","kmsOperation":"KmsHealthCheck","x":1,"x":2}}`, xksapi.ValidationException},
		{"data after the object: a closing brace", opHealth, `{` + metaHealth + `}}`, xksapi.ValidationException},
		{"data after the object: a closing bracket", opHealth, `{` + metaHealth + `}]`, xksapi.ValidationException},
		{"data after the object: a word", opHealth, `{` + metaHealth + `} x`, xksapi.ValidationException},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, xerr := decodeRequest(tt.op, []byte(tt.body))
			if xerr == nil {
				t.Fatalf("accepted: %+v", req)
			}
			if xerr.name != tt.wantName {
				t.Errorf("error %s (%s), want %s", xerr.name, xerr.message, tt.wantName)
			}
			if len(xerr.message) >= 512 || strings.Contains(xerr.message, b64Hello) || strings.Contains(xerr.message, "AAAA") {
				t.Errorf("message %q is too long or echoes a request value", xerr.message)
			}
		})
	}
}

func TestDecodeRequestAccepts(t *testing.T) {
	tests := []struct {
		name  string
		op    operation
		body  string
		check func(t *testing.T, r *xksRequest)
	}{
		{"health with the spec's example", opHealth, `{` + metaHealth + `}`, nil},
		{"unknown fields are ignored", opHealth, `{` + metaHealth + `,"somethingNew":{"a":[1,2]}}`, nil},
		{"unknown kmsOperation is accepted", opMetadata, `{"requestMetadata":{"awsPrincipalArn":"AWS Internal","kmsOperation":"BulkSomething","kmsRequestId":"r"}}`, nil},
		{"metadata with fields of older spec versions", opMetadata, `{"requestMetadata":{"awsPrincipalArn":"a","kmsKeyArn":"k","kmsViaService":"ebs","kmsOperation":"DescribeKey","kmsRequestId":"r"}}`, nil},
		{"encrypt 4300-byte plaintext and 8192-byte AAD", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64(4300) + `",` + gcm + `,"additionalAuthenticatedData":"` + b64(8192) + `"}`,
			func(t *testing.T, r *xksRequest) {
				if len(r.plaintext) != 4300 || len(r.aad) != 8192 {
					t.Errorf("plaintext %d bytes, AAD %d bytes", len(r.plaintext), len(r.aad))
				}
			}},
		{"encrypt with CDIV", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"ciphertextDataIntegrityValueAlgorithm":"SHA_256"}`,
			func(t *testing.T, r *xksRequest) {
				if !r.wantCDIV {
					t.Error("CDIV not requested")
				}
			}},
		{"white space after the object", opHealth, `{` + metaHealth + "} \n\t\r", nil},
		{"a name in another case is an unknown field, ignored", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `","Plaintext":"AAAA",` + gcm + `}`,
			func(t *testing.T, r *xksRequest) {
				if string(r.plaintext) != "Hello World!" {
					t.Errorf("plaintext %q", r.plaintext)
				}
			}},
		{"a requestMetadata name in another case is an unknown field, ignored", opEncrypt, `{"requestMetadata":{"awsPrincipalArn":"a","kmsKeyArn":"k","KMSKEYARN":"other","kmsOperation":"Encrypt","kmsRequestId":"r-1"},"plaintext":"` + b64Hello + `",` + gcm + `}`,
			func(t *testing.T, r *xksRequest) {
				if r.requestMetadata.KMSKeyARN != "k" {
					t.Errorf("kmsKeyArn %q", r.requestMetadata.KMSKeyARN)
				}
			}},
		{"an escaped name is the same name", opEncrypt, `{` + metaCrypto + `,"plain\u0074ext":"` + b64Hello + `",` + gcm + `}`, nil},
		{"names inside an unknown field's value are not read", opHealth, `{` + metaHealth + `,"x":{"a":1,"a":2,"A":3}}`, nil},
		{"null AAD is no AAD", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"additionalAuthenticatedData":null}`,
			func(t *testing.T, r *xksRequest) {
				if r.aad != nil {
					t.Errorf("AAD %q", r.aad)
				}
			}},
		{"encrypt with empty AAD", opEncrypt, `{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"additionalAuthenticatedData":""}`, nil},
		{"decrypt with 16-byte IV and 20-byte metadata", opDecrypt, `{` + metaCrypto + `,` + gcm + `,"ciphertext":"` + b64(4300) + `","initializationVector":"` + b64(16) + `","authenticationTag":"` + b64Tag16 + `","ciphertextMetadata":"` + b64(20) + `"}`,
			func(t *testing.T, r *xksRequest) {
				if len(r.iv) != 16 || len(r.ciphertextMetadata) != 20 || len(r.ciphertext) != 4300 {
					t.Errorf("iv %d, metadata %d, ciphertext %d bytes", len(r.iv), len(r.ciphertextMetadata), len(r.ciphertext))
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, xerr := decodeRequest(tt.op, []byte(tt.body))
			if xerr != nil {
				t.Fatalf("rejected: %v", xerr)
			}
			if tt.check != nil {
				tt.check(t, req)
			}
		})
	}
}

func TestRoute(t *testing.T) {
	h := &Handler{stores: map[string]*KeyStore{
		"/kms/xks/v1":          {URIPath: "/kms/xks/v1"},
		"/demo/kms/xks/v1":     {URIPath: "/demo/kms/xks/v1"},
		"/a/b-c_d/kms/xks/v1":  {URIPath: "/a/b-c_d/kms/xks/v1"},
		"/nested/kms/xks/v1/x": {URIPath: "unreachable"},
	}}
	tests := []struct {
		path      string
		wantStore string
		wantOp    operation
		wantKey   string
	}{
		{"/demo/kms/xks/v1/health", "/demo/kms/xks/v1", opHealth, ""},
		{"/kms/xks/v1/health", "/kms/xks/v1", opHealth, ""},
		{"/a/b-c_d/kms/xks/v1/keys/k.1-_A/encrypt", "/a/b-c_d/kms/xks/v1", opEncrypt, "k.1-_A"},
		{"/demo/kms/xks/v1/keys/k/decrypt", "/demo/kms/xks/v1", opDecrypt, "k"},
		{"/demo/kms/xks/v1/keys/k/metadata", "/demo/kms/xks/v1", opMetadata, "k"},
		{"/demo/kms/xks/v1/keys/kms/xks/v1/encrypt", "", 0, ""},
		{"/other/kms/xks/v1/health", "", 0, ""},
		{"/demo/kms/xks/v1/health/", "", 0, ""},
		{"/demo/kms/xks/v1/Health", "", 0, ""},
		{"/demo/kms/xks/v2/health", "", 0, ""},
		{"/demo//kms/xks/v1/health", "", 0, ""},
		{"//kms/xks/v1/health", "", 0, ""},
		{"/demo/kms/xks/v1/keys//encrypt", "", 0, ""},
		{"/demo/kms/xks/v1/keys/k/sign", "", 0, ""},
		{"/demo/kms/xks/v1/keys/k/encrypt/x", "", 0, ""},
		{"/demo/kms/xks/v1/keys/k%2Fx/encrypt", "", 0, ""},
		{"/demo/kms/xks/v1/keys/../encrypt", "", 0, ""},
		{"/demo/kms/xks/v1/keys/" + strings.Repeat("k", 129) + "/encrypt", "", 0, ""},
		{"/demo/kms/xks/v1/keys/" + strings.Repeat("k", 128) + "/encrypt", "/demo/kms/xks/v1", opEncrypt, strings.Repeat("k", 128)},
		{"/", "", 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			ks, op, key, ok := h.route(tt.path)
			if tt.wantStore == "" {
				if ok {
					t.Fatalf("routed to %s %v %q", ks.URIPath, op, key)
				}
				return
			}
			if !ok || ks.URIPath != tt.wantStore || op != tt.wantOp || key != tt.wantKey {
				t.Fatalf("got ok=%v op=%v key=%q", ok, op, key)
			}
		})
	}
}

// FuzzDecodeRequest: no body makes decoding panic, and whatever is accepted
// keeps the spec's limits.
func FuzzDecodeRequest(f *testing.F) {
	for _, seed := range []string{
		`{` + metaHealth + `}`,
		`{` + metaKey + `}`,
		`{` + metaCrypto + `,"plaintext":"` + b64Hello + `",` + gcm + `,"additionalAuthenticatedData":"AAAA","ciphertextDataIntegrityValueAlgorithm":"SHA_256"}`,
		`{` + metaCrypto + `,` + gcm + `,` + decryptBase + `,"ciphertextMetadata":"a2V5X3ZlcnNpb249MQ=="}`,
		`{"requestMetadata":{}}`, `[]`, `null`, `{"plaintext":5}`,
	} {
		for op := opHealth; op <= opDecrypt; op++ {
			f.Add(uint8(op), []byte(seed))
		}
	}
	f.Fuzz(func(t *testing.T, opByte uint8, body []byte) {
		op := operation(opByte%4) + opHealth
		req, xerr := decodeRequest(op, body)
		if xerr != nil {
			if req != nil || xksapi.Status(xerr.name) == 0 {
				t.Fatalf("error %v with request %v", xerr, req)
			}
			return
		}
		if req.requestMetadata.KMSRequestID == "" || req.requestMetadata.KMSOperation == "" {
			t.Fatal("accepted without the required metadata")
		}
		if len(req.aad) > xksapi.MaxAADLen {
			t.Fatalf("accepted an AAD of %d bytes", len(req.aad))
		}
		if op == opDecrypt && ((len(req.iv) != 12 && len(req.iv) != 16) || len(req.tag) != xksapi.TagLen || len(req.ciphertextMetadata) > xksapi.MaxCiphertextMetadataLen) {
			t.Fatalf("accepted iv %d, tag %d, metadata %d bytes", len(req.iv), len(req.tag), len(req.ciphertextMetadata))
		}
	})
}

// BenchmarkDecodeRequest decodes and validates a typical Encrypt body (32
// bytes of plaintext, an AAD, KMS's request metadata).
func BenchmarkDecodeRequest(b *testing.B) {
	body := []byte(`{"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::111122223333:user/Alice","kmsKeyArn":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab","kmsOperation":"Encrypt","kmsRequestId":"4112f4d6-db54-4af4-ae30-c55a22a8dfae","kmsViaService":"ebs"},` +
		`"plaintext":"` + b64(32) + `","additionalAuthenticatedData":"` + b64(48) + `","encryptionAlgorithm":"AES_GCM"}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, xerr := decodeRequest(opEncrypt, body); xerr != nil {
			b.Fatal(xerr)
		}
	}
}

// TestReadBodyErrors: the errors of reading a body (frontend.ReadBody, whose
// own tests are frontend's) in the XKS vocabulary.
func TestReadBodyErrors(t *testing.T) {
	for _, tt := range []struct {
		name     string
		declared int64
		sent     string
		want     string
	}{
		{"a body over the limit", 11, "", xksapi.UnsupportedOperationException},
		{"a body shorter than declared", 5, "xy", xksapi.ValidationException},
	} {
		r := &http.Request{Method: http.MethodPost, ContentLength: tt.declared, Body: io.NopCloser(strings.NewReader(tt.sent))}
		if _, xerr := readBody(r, 10); xerr == nil || xerr.name != tt.want {
			t.Errorf("%s: %v, want %s", tt.name, xerr, tt.want)
		}
	}
}
