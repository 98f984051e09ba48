package sigv4auth

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsv4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

// Test credentials; they protect nothing.
var (
	testCredential = Credential{
		AccessKeyID:     "BETWEEN2TENAND3TENCHARACTERS",
		SecretAccessKey: "PleaseReplaceThisWithSomeSecretOfLength43To64",
	}
	rotatedCredential = Credential{ //nolint:gosec // made up for these tests, like testCredential
		AccessKeyID:     "NEWKEYIDAFTERROTATION2345",
		SecretAccessKey: "c2VjcmV0LWFmdGVyLXJvdGF0aW9uLW9mLTUyLWNoYXJzLWxvbmc+/=",
	}
)

// testSigningTime is mid-day UTC so that a few minutes either way stay on
// the same date in the credential scope.
var testSigningTime = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func newTestVerifier(t testing.TB, now time.Time, creds ...Credential) *Verifier {
	t.Helper()
	if len(creds) == 0 {
		creds = []Credential{testCredential}
	}
	v, err := NewVerifier(Config{Region: "us-east-1", Credentials: creds, Now: fixedClock(now)})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func payloadHash(body []byte) string {
	sum := sha256.Sum256(body)
	return hex.EncodeToString(sum[:])
}

// sdkSign signs req with aws-sdk-go-v2's SigV4 signer, an implementation
// independent of this package.
func sdkSign(t testing.TB, req *http.Request, body []byte, cred Credential, service, region string, at time.Time, opts ...func(*awsv4.SignerOptions)) {
	t.Helper()
	err := awsv4.NewSigner().SignHTTP(context.Background(),
		aws.Credentials{AccessKeyID: cred.AccessKeyID, SecretAccessKey: cred.SecretAccessKey},
		req, payloadHash(body), service, region, at, opts...)
	if err != nil {
		t.Fatalf("signing: %v", err)
	}
}

// verifyingServer answers 204 to requests that verify and 401 with the
// error otherwise, like the XKS handler but without the XKS body.
func verifyingServer(v *Verifier) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		id, err := v.VerifyHTTP(r, RawPath(r), body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnauthorized)
			return
		}
		w.Header().Set("X-Access-Key-Id", id)
		w.WriteHeader(http.StatusNoContent)
	})
}

type headerSet struct {
	name string
	set  func(http.Header)
}

var sdkHeaderSets = []headerSet{
	{"only what KMS signs", func(http.Header) {}},
	{"extra signed headers", func(h http.Header) {
		h.Set("Content-Type", "application/json")
		h.Set("X-Amz-Target", "XksProxy.Encrypt")
		h.Set("X-Request-Trace", "trace-1")
	}},
	{"mixed-case header names", func(h http.Header) {
		h["x-MiXeD-CaSe"] = []string{"Value"}
		h["CONTENT-TYPE"] = []string{"application/json"}
	}},
	{"values with runs of spaces", func(h http.Header) {
		h.Set("X-Spaced", "a   b    c")
		h.Set("Content-Type", "application/json;   charset=utf-8")
	}},
	{"repeated headers", func(h http.Header) {
		h.Add("X-Repeated", "one")
		h.Add("X-Repeated", "two   three")
		h.Add("X-Repeated", "four")
	}},
}

var sdkPaths = []struct {
	name, path string
}{
	{"prefix of letters", "/example/uri/path/prefix/kms/xks/v1/health"},
	{"prefix with dots dashes underscores", "/xks.proxy-v1_a/kms/xks/v1/keys/key-1.a_b~c/encrypt"},
	{"empty prefix keeps double slash", "//kms/xks/v1/health"},
	{"percent-encoded segment", "/pre%20fix/kms/xks/v1/keys/k%2Fid/decrypt"},
	{"reserved characters", "/a:b@c/kms/xks/v1/keys/k$1/metadata"},
}

var sdkBodies = []struct {
	name string
	body []byte
}{
	{"empty", nil},
	{"10 KiB", bytes.Repeat([]byte(`{"plaintext":"AAAA"}`), 512)},
	{"non-ASCII UTF-8", []byte(`{"requestMetadata":{"kmsRequestId":"Grüße, 日本語 🔑","kmsOperation":"Encrypt"}}`)},
}

// TestVerifyAcceptsAWSSDKSignatures sends requests signed by aws-sdk-go-v2
// over loopback and verifies them as the server receives them.
func TestVerifyAcceptsAWSSDKSignatures(t *testing.T) {
	v := newTestVerifier(t, testSigningTime)
	for _, proto := range []string{"HTTP/1.1", "HTTP/2"} {
		srv := httptest.NewUnstartedServer(verifyingServer(v))
		if proto == "HTTP/2" {
			srv.EnableHTTP2 = true
			srv.StartTLS()
		} else {
			srv.Start()
		}
		client := srv.Client()
		for _, p := range sdkPaths {
			for _, b := range sdkBodies {
				for _, hs := range sdkHeaderSets {
					for _, disableEscaping := range []bool{false, true} {
						name := proto + "/" + p.name + "/" + b.name + "/" + hs.name
						if disableEscaping {
							name += "/DisableURIPathEscaping"
						}
						t.Run(name, func(t *testing.T) {
							req, err := http.NewRequest(http.MethodPost, srv.URL+p.path, bytes.NewReader(b.body))
							if err != nil {
								t.Fatal(err)
							}
							if got := req.URL.EscapedPath(); got != p.path {
								t.Fatalf("client would send path %q, want %q", got, p.path)
							}
							hs.set(req.Header)
							sdkSign(t, req, b.body, testCredential, DefaultService, "us-east-1", testSigningTime,
								func(o *awsv4.SignerOptions) { o.DisableURIPathEscaping = disableEscaping })
							resp, err := client.Do(req)
							if err != nil {
								t.Fatal(err)
							}
							msg, _ := io.ReadAll(resp.Body)
							resp.Body.Close()
							if resp.StatusCode != http.StatusNoContent {
								t.Fatalf("status %d: %s", resp.StatusCode, msg)
							}
							if resp.ProtoMajor != int(proto[5]-'0') {
								t.Errorf("served over %s, want %s", resp.Proto, proto)
							}
							if id := resp.Header.Get("X-Access-Key-Id"); id != testCredential.AccessKeyID {
								t.Errorf("access key id = %q", id)
							}
						})
					}
				}
			}
		}
		srv.Close()
	}
}

// serverView is a request as a net/http server hands it to the handler.
type serverView struct {
	method, path, query, host string
	header                    http.Header
	body                      []byte
}

// sdkSignedView signs a KMS-like request with the SDK in-process and returns
// what the server would see: the Host taken out of the headers and
// Content-Length added by the transport.
func sdkSignedView(t testing.TB, cred Credential, at time.Time, setHeaders func(http.Header)) serverView {
	t.Helper()
	body := []byte(`{"requestMetadata":{"kmsRequestId":"4112f4d6","kmsOperation":"Encrypt"},"plaintext":"SGVsbG8="}`)
	const path = "/keystores/ks1/kms/xks/v1/keys/key-1/encrypt"
	req, err := http.NewRequest(http.MethodPost, "https://xks.example.com"+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if setHeaders != nil {
		setHeaders(req.Header)
	}
	sdkSign(t, req, body, cred, DefaultService, "us-east-1", at)
	header := req.Header.Clone()
	header.Set("Content-Length", strconv.Itoa(len(body)))
	return serverView{req.Method, path, "", req.URL.Host, header, body}
}

func (r serverView) verify(v *Verifier) (string, error) {
	return v.Verify(r.method, r.path, r.query, r.host, r.header, r.body)
}

func TestVerifyRotationAcceptsBothCredentials(t *testing.T) {
	v := newTestVerifier(t, testSigningTime, testCredential, rotatedCredential)
	for _, cred := range []Credential{testCredential, rotatedCredential} {
		t.Run(cred.AccessKeyID, func(t *testing.T) {
			id, err := sdkSignedView(t, cred, testSigningTime, nil).verify(v)
			if err != nil {
				t.Fatal(err)
			}
			if id != cred.AccessKeyID {
				t.Errorf("access key id = %q, want %q", id, cred.AccessKeyID)
			}
		})
	}
}

func TestVerifyAcceptsSkewWithinLimit(t *testing.T) {
	for _, skew := range []time.Duration{-5 * time.Minute, -time.Minute, 0, time.Minute, 5 * time.Minute} {
		t.Run(skew.String(), func(t *testing.T) {
			v := newTestVerifier(t, testSigningTime.Add(skew))
			if _, err := sdkSignedView(t, testCredential, testSigningTime, nil).verify(v); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestVerifyAcrossMidnightUsesEachDaysKey(t *testing.T) {
	before := time.Date(2026, 3, 1, 23, 59, 0, 0, time.UTC)
	after := before.Add(2 * time.Minute)
	v := newTestVerifier(t, before.Add(time.Minute))
	for range 3 {
		for _, at := range []time.Time{before, after} {
			if _, err := sdkSignedView(t, testCredential, at, nil).verify(v); err != nil {
				t.Fatalf("signed at %s: %v", at, err)
			}
		}
	}
}

// TestVerifyConcurrentlyAcrossDays exercises the signing-key cache from many
// goroutines under the race detector.
func TestVerifyConcurrentlyAcrossDays(t *testing.T) {
	base := time.Date(2026, 3, 1, 23, 58, 0, 0, time.UTC)
	views := make([]serverView, 0, 2*8)
	for i := range 8 {
		views = append(views, sdkSignedView(t, testCredential, base.Add(time.Duration(i)*30*time.Second), nil))
		views = append(views, sdkSignedView(t, rotatedCredential, base.Add(time.Duration(i)*30*time.Second), nil))
	}
	v := newTestVerifier(t, base.Add(2*time.Minute), testCredential, rotatedCredential)
	done := make(chan error)
	for g := range 8 {
		go func() {
			var err error
			for i := range 200 {
				if _, e := views[(g+i)%len(views)].verify(v); e != nil && err == nil {
					err = e
				}
			}
			done <- err
		}()
	}
	for range 8 {
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
}

func TestVerifyHTTPTakesPathFromRequestTarget(t *testing.T) {
	view := sdkSignedView(t, testCredential, testSigningTime, nil)
	v := newTestVerifier(t, testSigningTime)
	for _, target := range []string{view.path, "https://xks.example.com" + view.path} {
		t.Run(target, func(t *testing.T) {
			r := httptest.NewRequest(view.method, target, bytes.NewReader(view.body))
			r.Host = view.host
			r.Header = view.header
			if _, err := v.VerifyHTTP(r, RawPath(r), view.body); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("request built in-process", func(t *testing.T) {
		r, err := http.NewRequest(view.method, "https://"+view.host+view.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		r.Header = view.header
		if _, err := v.VerifyHTTP(r, RawPath(r), view.body); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("rewritten path fails", func(t *testing.T) {
		r := httptest.NewRequest(view.method, strings.Replace(view.path, "encrypt", "decrypt", 1), nil)
		r.Host = view.host
		r.Header = view.header
		if _, err := v.VerifyHTTP(r, RawPath(r), view.body); reasonOf(err) != ReasonSignatureMismatch {
			t.Fatalf("err = %v, want %s", err, ReasonSignatureMismatch)
		}
	})
}
