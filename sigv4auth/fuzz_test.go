package sigv4auth

import (
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
)

func FuzzParseAuthorization(f *testing.F) {
	f.Add(vectorA.header.Get("Authorization"))
	f.Add(vectorB.header.Get("Authorization"))
	f.Add("AWS4-HMAC-SHA256 Credential=ABCDEFGHIJKLMNOPQRST/20261126/us-east-1/kms-xks-proxy/aws4_request,SignedHeaders=host;x-amz-date,Signature=" + strings.Repeat("0", 64))
	f.Add("AWS4-HMAC-SHA256 Signature=" + strings.Repeat("a", 64) + ", SignedHeaders=host, Credential=A/20260101/r/s/aws4_request")
	f.Add("AWS4-HMAC-SHA256 Credential=A/2026010/r/s/aws4_request, SignedHeaders=, Signature=")
	f.Add("AWS4-HMAC-SHA256 Credential=//////, SignedHeaders=;;, Signature=x")
	f.Add("AWS4-HMAC-SHA256 Credential=A/20260101/r/s/aws4_request, Credential=B/20260101/r/s/aws4_request")
	f.Add("AWS4-ECDSA-P256-SHA256 Credential=A/20260101/r/s/aws4_request")
	f.Add("AWS AKID:c2ln")
	f.Add("AWS4-HMAC-SHA256")
	f.Add(" AWS4-HMAC-SHA256 ,,,=")
	f.Add("")
	f.Fuzz(func(t *testing.T, value string) {
		auth, credential, reason, detail := parseAuthorization(value)
		if reason != "" {
			if detail == "" {
				t.Errorf("reason %q without detail", reason)
			}
			return
		}
		if want := auth.accessKeyID + "/" + auth.date + "/" + auth.region + "/" + auth.service + "/aws4_request"; credential != want {
			t.Errorf("credential %q does not split into %q", credential, want)
		}
		if auth.scope(credential) != credential[len(auth.accessKeyID)+1:] || len(auth.date) != 8 || !isDigits(auth.date) {
			t.Errorf("bad scope or date in %q", credential)
		}
		if checkSignedHeaders(auth.signedHeaders) != "" {
			t.Errorf("accepted SignedHeaders %q", auth.signedHeaders)
		}
		if !strings.HasPrefix(value, algorithm+" ") {
			t.Errorf("accepted %q without the algorithm", value)
		}
	})
}

func FuzzParseAmzDate(f *testing.F) {
	for _, s := range []string{
		"20261126T233942Z", "20260301T120000Z", "20240229T235959Z", "20250229T000000Z",
		"20261301T000000Z", "20261126T240000Z", "00000000T000000Z", "99991231T235959Z",
		"2026-11-26T23:39:42Z", "20261126T233942", "+0261126T233942Z", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tm, ok := parseAmzDate(s)
		if !ok {
			return
		}
		// One instant, one spelling: the date must round-trip exactly.
		if got := tm.Format(amzDateLayout); got != s {
			t.Errorf("parsed %q as %s, which formats as %q", s, tm, got)
		}
		if _, ok := parseDateHeader(s); !ok {
			t.Errorf("Date header parser rejects %q", s)
		}
	})
}

// FuzzVerify feeds arbitrary Authorization, X-Amz-Date, path and query
// values to Verify. None may panic or verify.
func FuzzVerify(f *testing.F) {
	f.Add(vectorB.header.Get("Authorization"), "20261126T234307Z", vectorB.path, "")
	f.Add(vectorA.header.Get("Authorization"), "20261126T233942Z", "//kms/xks/v1/health", "a=b&c")
	f.Add(strings.Replace(vectorB.header.Get("Authorization"), "host;x-amz-date", "host;x-amz-date;zzz", 1), "20261126T234307Z", "/%zz", "%zz")
	f.Add("AWS4-HMAC-SHA256 Credential=ABCDEFGHIJKLMNOPQRST2345/20261126/us-east-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=", "20261126T234307Z", "", "X-Amz-Signature=1")
	f.Add("", "", "", "")
	v, err := NewVerifier(Config{
		Region:      "us-east-1",
		Credentials: []Credential{vectorA.credential, vectorB.credential},
		Now:         fixedClock(vectorB.signedAt),
	})
	if err != nil {
		f.Fatal(err)
	}
	body := []byte(vectorB.body)
	f.Fuzz(func(t *testing.T, authorization, amzDate, path, query string) {
		header := http.Header{
			"Authorization":  {authorization},
			"X-Amz-Date":     {amzDate},
			"Content-Type":   {"application/json"},
			"Content-Length": {"107"},
		}
		id, err := v.Verify(http.MethodPost, path, query, vectorB.host, header, body)
		if err == nil {
			// Only vector B's request can verify: its date, path and
			// query, and its Authorization components, however spaced
			// and ordered (the signature covers the request, not the
			// spelling of this header).
			if !sameAuthorization(authorization, vectorB.header.Get("Authorization")) || amzDate != vectorB.header.Get("X-Amz-Date") || path != vectorB.path || query != "" {
				t.Fatalf("verified a forged request as %q", id)
			}
			return
		}
		var e *Error
		if !errors.As(err, &e) || e.Reason == "" {
			t.Fatalf("error %v is not an *Error with a reason", err)
		}
		if strings.Contains(err.Error(), vectorB.credential.SecretAccessKey) || strings.Contains(err.Error(), vectorA.credential.SecretAccessKey) {
			t.Fatalf("error %q reveals a secret", err)
		}
	})
}

// sameAuthorization reports whether two Authorization values name the same
// algorithm and the same components: comma-separated, each with optional
// spaces around it, in any order.
func sameAuthorization(a, b string) bool {
	components := func(v string) (string, []string) {
		algo, rest, _ := strings.Cut(v, " ")
		var parts []string
		for part := range strings.SplitSeq(rest, ",") {
			parts = append(parts, strings.Trim(part, " "))
		}
		slices.Sort(parts)
		return algo, parts
	}
	algoA, partsA := components(a)
	algoB, partsB := components(b)
	return algoA == algoB && slices.Equal(partsA, partsB)
}
