package sigv4auth

import (
	"net/http"
	"testing"
	"time"
)

// signedVector is a request whose signature was produced and checked
// outside this package (reference/xks-spec.md section 8.4).
type signedVector struct {
	name       string
	credential Credential
	method     string
	path       string
	host       string
	header     http.Header
	body       string
	signedAt   time.Time
}

// The example secrets of the XKS test client and specification; they
// protect nothing.
var (
	vectorA = signedVector{
		name: "curl 7.88.1 signs content-type;host;x-amz-date",
		credential: Credential{
			AccessKeyID:     "ABCDEFGHIJKLMNOPQRST",
			SecretAccessKey: "PleaseReplaceThisWithSomeSecretOfLength43To64",
		},
		method: http.MethodPost,
		path:   "/example/uri/path/prefix/kms/xks/v1/health",
		host:   "127.0.0.1:18080",
		header: http.Header{
			"Authorization":  {"AWS4-HMAC-SHA256 Credential=ABCDEFGHIJKLMNOPQRST/20261126/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=d1b9f1c1525f06af652a6b6c18e1c5d6949005894ea22b0976f6cec7ba2714fb"},
			"X-Amz-Date":     {"20261126T233942Z"},
			"User-Agent":     {"curl/7.88.1"},
			"Accept":         {"*/*"},
			"Content-Type":   {"application/json"},
			"Content-Length": {"72"},
		},
		body:     `{"requestMetadata":{"kmsOperation":"KmsHealthCheck","kmsRequestId":"x"}}`,
		signedAt: time.Date(2026, 11, 26, 23, 39, 42, 0, time.UTC),
	}
	vectorB = signedVector{
		name: "botocore signs host;x-amz-date like KMS",
		credential: Credential{ //nolint:gosec // made up to sign this vector; it protects nothing
			AccessKeyID:     "ABCDEFGHIJKLMNOPQRST2345",
			SecretAccessKey: "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE",
		},
		method: http.MethodPost,
		path:   "/keystores/ks1/kms/xks/v1/health",
		host:   "xks.example.com",
		header: http.Header{
			"Authorization": {"AWS4-HMAC-SHA256 Credential=ABCDEFGHIJKLMNOPQRST2345/20261126/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=7f36295fda76a0933824768877d89e5dc55c4945978e192e669057dc745ee4e4"},
			"X-Amz-Date":    {"20261126T234307Z"},
		},
		body:     `{"requestMetadata":{"kmsRequestId":"4112f4d6-db54-4af4-ae30-c55a22a8dfae","kmsOperation":"KmsHealthCheck"}}`,
		signedAt: time.Date(2026, 11, 26, 23, 43, 7, 0, time.UTC),
	}
)

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

func TestVerifyPublishedVectors(t *testing.T) {
	for _, vec := range []signedVector{vectorA, vectorB} {
		t.Run(vec.name, func(t *testing.T) {
			v, err := NewVerifier(Config{
				Region:      "us-east-1",
				Credentials: []Credential{vec.credential},
				Now:         fixedClock(vec.signedAt.Add(30 * time.Second)),
			})
			if err != nil {
				t.Fatal(err)
			}
			id, err := v.Verify(vec.method, vec.path, "", vec.host, vec.header, []byte(vec.body))
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if id != vec.credential.AccessKeyID {
				t.Errorf("access key id = %q, want %q", id, vec.credential.AccessKeyID)
			}
		})
	}
}

func TestVerifyCanonicalRequestOfVectorA(t *testing.T) {
	// The canonical request and string to sign published with vector A,
	// rebuilt here to pin down the exact bytes that are hashed.
	const wantStringToSign = "AWS4-HMAC-SHA256\n20261126T233942Z\n20261126/us-east-1/kms-xks-proxy/aws4_request\n" +
		"446f94451a5fbac4cba0ca7866cac36d891a81f51d96ad1d9274fc067c40f13e"
	vec := vectorA
	auth, credential, reason, _ := parseAuthorization(vec.header.Get("Authorization"))
	if reason != "" {
		t.Fatal(reason)
	}
	cred := &credentialState{accessKeyID: vec.credential.AccessKeyID, secret: vec.credential.SecretAccessKey}
	key := cred.signingKeyFor(auth.date, "us-east-1", DefaultService)
	s := &scratch{}
	const payload = "d5d3bc89a63c23746fb0e80f9951e551747c3a66029da73b01cfc898ae0a6545"
	req := signedRequest{
		accessKeyID: vec.credential.AccessKeyID, auth: auth, credential: credential, dateTime: "20261126T233942Z",
		method: vec.method, path: vec.path, host: vec.host, header: vec.header, payloadHash: [64]byte([]byte(payload)),
	}
	if err := checkSignature(s, key, &req, false); err != nil {
		t.Fatal(err)
	}
	if got := string(s.canonical); got != wantStringToSign {
		t.Errorf("string to sign:\n%s\nwant:\n%s", got, wantStringToSign)
	}
}
