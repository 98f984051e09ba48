package sigv4auth

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsv4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

func reasonOf(err error) Reason {
	if e, ok := errors.AsType[*Error](err); ok {
		return e.Reason
	}
	return ""
}

// replaceInAuthorization rewrites the Authorization header of r.
func replaceInAuthorization(old, new string) func(*serverView) {
	return func(r *serverView) {
		r.header.Set("Authorization", strings.Replace(r.header.Get("Authorization"), old, new, 1))
	}
}

func TestVerifyRejectsEachMutation(t *testing.T) {
	otherSecret := Credential{AccessKeyID: testCredential.AccessKeyID, SecretAccessKey: strings.Repeat("x", 43)}
	tests := []struct {
		name string
		// sign optionally replaces the default signing of the base request.
		sign   func(t *testing.T) serverView
		mutate func(*serverView)
		want   Reason
	}{
		{name: "body byte changed", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.body[len(r.body)-2] ^= 1 }},
		{name: "body byte changed with signed payload hash header", want: ReasonPayloadHashMismatch,
			sign: func(t *testing.T) serverView {
				return sdkSignedView(t, testCredential, testSigningTime, func(h http.Header) {
					h.Set("X-Amz-Content-Sha256", payloadHash([]byte(`{"requestMetadata":{"kmsRequestId":"4112f4d6","kmsOperation":"Encrypt"},"plaintext":"SGVsbG8="}`)))
				})
			},
			mutate: func(r *serverView) { r.body[len(r.body)-2] ^= 1 }},
		{name: "payload hash header unsigned payload", want: ReasonPayloadHashMismatch,
			mutate: func(r *serverView) { r.header.Set("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD") }},
		{name: "path changed", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.path = strings.Replace(r.path, "key-1", "key-2", 1) }},
		{name: "path double slash cleaned", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.path = strings.Replace(r.path, "/kms/", "//kms/", 1) }},
		{name: "query added", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.query = "a=b" }},
		{name: "method changed", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.method = http.MethodPut }},
		{name: "signed header value changed", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.header.Set("Content-Type", "text/plain") }},
		{name: "no-break space after a signed header value", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.header.Set("Content-Type", r.header.Get("Content-Type")+"\u00a0") }},
		{name: "next-line character after a signed header value", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.header.Set("Content-Type", r.header.Get("Content-Type")+"\u0085") }},
		{name: "signed header repeated", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.header.Add("Content-Type", "text/plain") }},
		{name: "host changed", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.host = "xks.example.com:8443" }},
		{name: "date 6 minutes later", want: ReasonClockSkew,
			mutate: func(r *serverView) { r.header.Set("X-Amz-Date", "20260301T120600Z") }},
		{name: "date 6 minutes earlier", want: ReasonClockSkew,
			mutate: func(r *serverView) { r.header.Set("X-Amz-Date", "20260301T115400Z") }},
		{name: "date 1 second later", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) { r.header.Set("X-Amz-Date", "20260301T120001Z") }},
		{name: "signed 6 minutes ago", want: ReasonClockSkew,
			sign: func(t *testing.T) serverView {
				return sdkSignedView(t, testCredential, testSigningTime.Add(-6*time.Minute), nil)
			}},
		{name: "signed 6 minutes ahead", want: ReasonClockSkew,
			sign: func(t *testing.T) serverView {
				return sdkSignedView(t, testCredential, testSigningTime.Add(6*time.Minute), nil)
			}},
		{name: "date not calendar-valid", want: ReasonMalformedDate,
			mutate: func(r *serverView) { r.header.Set("X-Amz-Date", "20260230T120000Z") }},
		{name: "date in extended ISO 8601", want: ReasonMalformedDate,
			mutate: func(r *serverView) { r.header.Set("X-Amz-Date", "2026-03-01T12:00:00Z") }},
		{name: "date repeated", want: ReasonMalformedDate,
			mutate: func(r *serverView) { r.header.Add("X-Amz-Date", "20260301T120000Z") }},
		{name: "scope date is not the request date", want: ReasonScopeMismatch,
			mutate: replaceInAuthorization("/20260301/", "/20260302/")},
		{name: "region", want: ReasonScopeMismatch,
			mutate: replaceInAuthorization("/us-east-1/", "/eu-west-1/")},
		{name: "service", want: ReasonScopeMismatch,
			mutate: replaceInAuthorization("/kms-xks-proxy/", "/kms/")},
		{name: "signed for another region", want: ReasonScopeMismatch,
			sign: func(t *testing.T) serverView {
				r := sdkSignedView(t, testCredential, testSigningTime, nil)
				req, _ := http.NewRequest(r.method, "https://"+r.host+r.path, nil)
				req.Header = r.header
				sdkSign(t, req, r.body, testCredential, DefaultService, "eu-west-1", testSigningTime)
				return r
			}},
		{name: "access key id", want: ReasonUnknownAccessKeyID,
			mutate: replaceInAuthorization(testCredential.AccessKeyID, "AAAAAAAAAAAAAAAAAAAAAAAA")},
		{name: "access key id with invalid syntax", want: ReasonUnknownAccessKeyID,
			mutate: replaceInAuthorization(testCredential.AccessKeyID, "Invalid"+testCredential.AccessKeyID)},
		{name: "secret", want: ReasonSignatureMismatch,
			sign: func(t *testing.T) serverView { return sdkSignedView(t, otherSecret, testSigningTime, nil) }},
		{name: "host removed from SignedHeaders", want: ReasonMissingSignedHeader,
			mutate: replaceInAuthorization("content-length;content-type;host;x-amz-date", "content-length;content-type;x-amz-date")},
		{name: "x-amz-date removed from SignedHeaders", want: ReasonMissingSignedHeader,
			mutate: replaceInAuthorization("content-length;content-type;host;x-amz-date", "content-length;content-type;host")},
		{name: "signed header absent from request", want: ReasonMissingSignedHeader,
			mutate: replaceInAuthorization("host;x-amz-date", "host;x-absent;x-amz-date")},
		{name: "no date header", want: ReasonMissingSignedHeader,
			mutate: func(r *serverView) { r.header.Del("X-Amz-Date") }},
		{name: "SignedHeaders not sorted", want: ReasonMalformedAuthorization,
			mutate: replaceInAuthorization("host;x-amz-date", "x-amz-date;host")},
		{name: "SignedHeaders upper case", want: ReasonMalformedAuthorization,
			mutate: replaceInAuthorization("host;x-amz-date", "Host;x-amz-date")},
		{name: "SignedHeaders too long", want: ReasonMalformedAuthorization,
			mutate: replaceInAuthorization("host;x-amz-date", strings.Repeat("a;", maxSignedHeaders)+"host;x-amz-date")},
		{name: "truncated signature", want: ReasonMalformedAuthorization,
			mutate: func(r *serverView) {
				a := r.header.Get("Authorization")
				r.header.Set("Authorization", a[:len(a)-1])
			}},
		{name: "upper-case signature", want: ReasonMalformedAuthorization,
			mutate: func(r *serverView) {
				a := r.header.Get("Authorization")
				i := strings.Index(a, "Signature=") + len("Signature=")
				r.header.Set("Authorization", a[:i]+strings.ToUpper(a[i:]))
			}},
		{name: "signature bit flipped", want: ReasonSignatureMismatch,
			mutate: func(r *serverView) {
				a := []byte(r.header.Get("Authorization"))
				if a[len(a)-1] == '0' {
					a[len(a)-1] = '1'
				} else {
					a[len(a)-1] = '0'
				}
				r.header.Set("Authorization", string(a))
			}},
		{name: "Credential missing", want: ReasonMalformedAuthorization,
			mutate: replaceInAuthorization("Credential=", "Credentials=")},
		{name: "duplicated Authorization header", want: ReasonDuplicateAuthorization,
			mutate: func(r *serverView) { r.header.Add("Authorization", r.header.Get("Authorization")) }},
		{name: "Authorization header removed", want: ReasonMissingAuthorization,
			mutate: func(r *serverView) { r.header.Del("Authorization") }},
		{name: "wrong algorithm", want: ReasonUnsupportedAlgorithm,
			mutate: replaceInAuthorization("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256")},
		{name: "signature version 2", want: ReasonUnsupportedAlgorithm,
			mutate: func(r *serverView) { r.header.Set("Authorization", "AWS "+testCredential.AccessKeyID+":c2lnbmF0dXJl") }},
		{name: "presigned query", want: ReasonPresigned,
			sign: func(t *testing.T) serverView {
				r := sdkSignedView(t, testCredential, testSigningTime, nil)
				req, _ := http.NewRequest(r.method, "https://"+r.host+r.path, nil)
				signed, _, err := awsv4.NewSigner().PresignHTTP(context.Background(),
					aws.Credentials{AccessKeyID: testCredential.AccessKeyID, SecretAccessKey: testCredential.SecretAccessKey},
					req, payloadHash(r.body), DefaultService, "us-east-1", testSigningTime)
				if err != nil {
					t.Fatal(err)
				}
				u, _ := url.Parse(signed)
				r.query = u.RawQuery
				r.header.Del("Authorization")
				return r
			}},
		{name: "presigned query beside Authorization header", want: ReasonPresigned,
			mutate: func(r *serverView) { r.query = "X-Amz-Signature=00" }},
		{name: "query with invalid escape", want: ReasonMalformedQuery,
			mutate: func(r *serverView) { r.query = "a=%zz" }},
	}
	v := newTestVerifier(t, testSigningTime)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var r serverView
			if tt.sign != nil {
				r = tt.sign(t)
			} else {
				r = sdkSignedView(t, testCredential, testSigningTime, nil)
			}
			signature := r.header.Get("Authorization")
			signature = signature[strings.LastIndex(signature, "=")+1:]
			if tt.mutate != nil {
				tt.mutate(&r)
			}
			id, err := r.verify(v)
			if err == nil {
				t.Fatalf("verified as %q, want %s", id, tt.want)
			}
			if got := reasonOf(err); got != tt.want {
				t.Fatalf("reason = %q (%v), want %q", got, err, tt.want)
			}
			assertNoSecrets(t, err, signature, otherSecret.SecretAccessKey)
		})
	}
}

// assertNoSecrets fails if err's text contains a secret, the request's
// signature or a signing key, in hex or raw.
func assertNoSecrets(t *testing.T, err error, signature string, extraSecrets ...string) {
	t.Helper()
	msg := err.Error()
	if e, ok := errors.AsType[*Error](err); ok {
		msg += e.Detail
	}
	forbidden := append([]string{testCredential.SecretAccessKey, rotatedCredential.SecretAccessKey}, extraSecrets...)
	for _, secret := range slices.Clip(forbidden) {
		key := deriveSigningKey(secret, testSigningTime.Format("20060102"), "us-east-1", DefaultService)
		forbidden = append(forbidden, hex.EncodeToString(key), string(key))
	}
	if len(signature) >= 16 {
		forbidden = append(forbidden, signature, signature[:16])
	}
	for _, s := range forbidden {
		if s != "" && strings.Contains(msg, s) {
			t.Errorf("error %q reveals a secret, signature or signing key", msg)
		}
	}
}

func TestErrorNamesReasonAndAccessKeyID(t *testing.T) {
	r := sdkSignedView(t, testCredential, testSigningTime, nil)
	r.body = append(r.body, ' ')
	_, err := r.verify(newTestVerifier(t, testSigningTime))
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v is not an *Error", err)
	}
	if e.AccessKeyID != testCredential.AccessKeyID {
		t.Errorf("AccessKeyID = %q", e.AccessKeyID)
	}
	msg := err.Error()
	if !strings.Contains(msg, string(ReasonSignatureMismatch)) || !strings.Contains(msg, testCredential.AccessKeyID) {
		t.Errorf("error %q lacks the reason or access key id", msg)
	}
}

// referenceSignature signs a canonical request written out in full; it lets
// tests cover header forms the SDK never produces.
func referenceSignature(cred Credential, amzDate, region, canonicalRequest string) string {
	mac := func(key []byte, s string) []byte {
		h := hmac.New(sha256.New, key)
		h.Write([]byte(s))
		return h.Sum(nil)
	}
	crHash := sha256.Sum256([]byte(canonicalRequest))
	scope := amzDate[:8] + "/" + region + "/" + DefaultService + "/aws4_request"
	sts := "AWS4-HMAC-SHA256\n" + amzDate + "\n" + scope + "\n" + hex.EncodeToString(crHash[:])
	key := mac(mac(mac(mac([]byte("AWS4"+cred.SecretAccessKey), amzDate[:8]), region), DefaultService), "aws4_request")
	return hex.EncodeToString(mac(key, sts))
}

func TestVerifyAcceptsDateHeaderInPlaceOfXAmzDate(t *testing.T) {
	const body = `{}`
	for _, tt := range []struct{ name, date string }{
		{"HTTP date", "Sun, 01 Mar 2026 12:00:00 GMT"},
		{"ISO 8601 basic", "20260301T120000Z"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cr := "POST\n/kms/xks/v1/health\n\ndate:" + tt.date + "\nhost:xks.example.com\n\ndate;host\n" + payloadHash([]byte(body))
			sig := referenceSignature(testCredential, "20260301T120000Z", "us-east-1", cr)
			header := http.Header{
				"Date": {tt.date},
				"Authorization": {"AWS4-HMAC-SHA256 Credential=" + testCredential.AccessKeyID +
					"/20260301/us-east-1/kms-xks-proxy/aws4_request,SignedHeaders=date;host,Signature=" + sig},
			}
			v := newTestVerifier(t, testSigningTime)
			if _, err := v.Verify("POST", "/kms/xks/v1/health", "", "xks.example.com", header, []byte(body)); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestVerifyCanonicalQuery(t *testing.T) {
	// The canonical query is sorted after encoding, with %20 for spaces.
	const body = ``
	cr := "GET\n/\n" + "a=1&a=2&b%2Fc=x%20y&empty=&z=~~\n" + "host:h\nx-amz-date:20260301T120000Z\n\nhost;x-amz-date\n" + payloadHash(nil)
	sig := referenceSignature(testCredential, "20260301T120000Z", "us-east-1", cr)
	header := http.Header{
		"X-Amz-Date": {"20260301T120000Z"},
		"Authorization": {"AWS4-HMAC-SHA256 Credential=" + testCredential.AccessKeyID +
			"/20260301/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=" + sig},
	}
	v := newTestVerifier(t, testSigningTime)
	if _, err := v.Verify("GET", "", "z=%7E~&empty&b/c=x+y&a=2&a=1", "h", header, []byte(body)); err != nil {
		t.Fatal(err)
	}
}

func TestVerifyFindsHeadersInNonCanonicalMaps(t *testing.T) {
	r := sdkSignedView(t, testCredential, testSigningTime, nil)
	lower := http.Header{}
	for k, vs := range r.header {
		lower[strings.ToLower(k)] = vs
	}
	r.header = lower
	if _, err := r.verify(newTestVerifier(t, testSigningTime)); err != nil {
		t.Fatal(err)
	}
}

func TestNewVerifierConfig(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{"defaults are filled in", Config{Region: "us-east-1", Credentials: []Credential{testCredential}}, ""},
		{"region is required", Config{Credentials: []Credential{testCredential}}, "region is required"},
		{"region cannot hold a slash", Config{Region: "us/east", Credentials: []Credential{testCredential}}, "region"},
		{"a credential is required", Config{Region: "us-east-1"}, "at least one credential"},
		{"negative skew", Config{Region: "us-east-1", Credentials: []Credential{testCredential}, MaxSkew: -time.Second}, "max skew"},
		{"skew over 15 minutes", Config{Region: "us-east-1", Credentials: []Credential{testCredential}, MaxSkew: 100000 * time.Hour}, "max skew 100000h0m0s is over 15m0s"},
		{"duplicate access key id", Config{Region: "us-east-1", Credentials: []Credential{testCredential, {
			AccessKeyID: testCredential.AccessKeyID, SecretAccessKey: rotatedCredential.SecretAccessKey,
		}}}, `credential 1: access key id "` + testCredential.AccessKeyID + `" is configured more than once`},
		{"invalid credential is named by index and access key id", Config{Region: "us-east-1", Credentials: []Credential{
			testCredential, {AccessKeyID: "SHORT", SecretAccessKey: rotatedCredential.SecretAccessKey},
		}}, `credential 1: access key id "SHORT"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := NewVerifier(tt.cfg)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if v.service != DefaultService || v.maxSkew != DefaultMaxSkew || v.now == nil {
					t.Errorf("defaults not applied: service %q, skew %s", v.service, v.maxSkew)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
			}
			for _, c := range tt.cfg.Credentials {
				if strings.Contains(err.Error(), c.SecretAccessKey) {
					t.Errorf("error %q reveals a secret", err)
				}
			}
		})
	}
}

func TestVerifyHonoursConfiguredSkewAndService(t *testing.T) {
	r := sdkSignedView(t, testCredential, testSigningTime, nil)
	v, err := NewVerifier(Config{Region: "us-east-1", Credentials: []Credential{testCredential},
		MaxSkew: time.Minute, Now: fixedClock(testSigningTime.Add(2 * time.Minute))})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.verify(v); reasonOf(err) != ReasonClockSkew {
		t.Errorf("2 minutes with a 1 minute limit: err = %v, want %s", err, ReasonClockSkew)
	}
	v, err = NewVerifier(Config{Region: "us-east-1", Service: "other", Credentials: []Credential{testCredential},
		Now: fixedClock(testSigningTime)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.verify(v); reasonOf(err) != ReasonScopeMismatch {
		t.Errorf("service other: err = %v, want %s", err, ReasonScopeMismatch)
	}
}

// TestMaxSkewBound: MaxAllowedSkew itself is accepted; more is refused (a
// year-old request verified with a skew of 100000h before the bound).
func TestMaxSkewBound(t *testing.T) {
	v, err := NewVerifier(Config{Region: "us-east-1", Credentials: []Credential{testCredential}, MaxSkew: MaxAllowedSkew})
	if err != nil || v.maxSkew != MaxAllowedSkew {
		t.Fatalf("a skew of %s: %v", MaxAllowedSkew, err)
	}
	if _, err := NewVerifier(Config{Region: "us-east-1", Credentials: []Credential{testCredential}, MaxSkew: MaxAllowedSkew + time.Second}); err == nil {
		t.Fatalf("a skew over %s was accepted", MaxAllowedSkew)
	}
}
