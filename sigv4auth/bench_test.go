package sigv4auth

import (
	"bytes"
	"net/http"
	"strconv"
	"testing"
)

// BenchmarkVerifyEncrypt measures Verify on a typical Encrypt request as
// KMS sends it: a 2 KiB body and SignedHeaders=host;x-amz-date.
func BenchmarkVerifyEncrypt(b *testing.B) {
	body := []byte(`{"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::123456789012:role/app","kmsKeyArn":"arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab","kmsOperation":"Encrypt","kmsRequestId":"4112f4d6-db54-4af4-ae30-c55a22a8dfae","kmsViaService":"ebs"},"additionalAuthenticatedData":"cHJvamVjdD1ub3ZhLGVudj1wcm9k","encryptionAlgorithm":"AES_GCM","plaintext":"`)
	body = append(body, bytes.Repeat([]byte("QUJD"), (2048-len(body)-2)/4)...)
	body = append(body, `"}`...)
	const path = "/keystores/ks1/kms/xks/v1/keys/key-1/encrypt"
	req, err := http.NewRequest(http.MethodPost, "https://xks.example.com"+path, bytes.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	sdkSign(b, req, body, testCredential, DefaultService, "us-east-1", testSigningTime)
	// Re-sign over host;x-amz-date only, as KMS does: the SDK also signs
	// Content-Length, which KMS does not.
	cr := "POST\n" + path + "\n\nhost:xks.example.com\nx-amz-date:" + req.Header.Get("X-Amz-Date") +
		"\n\nhost;x-amz-date\n" + payloadHash(body)
	sig := referenceSignature(testCredential, req.Header.Get("X-Amz-Date"), "us-east-1", cr)
	auth := "AWS4-HMAC-SHA256 Credential=" + testCredential.AccessKeyID + "/20260301/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=" + sig
	header := http.Header{
		"Authorization":  {auth},
		"X-Amz-Date":     {req.Header.Get("X-Amz-Date")},
		"Content-Type":   {"application/json"},
		"Content-Length": {strconv.Itoa(len(body))},
		"User-Agent":     {"aws-kms-xks-client"},
		"Accept":         {"*/*"},
	}
	v := newTestVerifier(b, testSigningTime)
	if _, err := v.Verify(http.MethodPost, path, "", "xks.example.com", header, body); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := v.Verify(http.MethodPost, path, "", "xks.example.com", header, body); err != nil {
			b.Fatal(err)
		}
	}
}
