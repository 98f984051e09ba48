package ekmhandler

import (
	"bytes"
	"encoding/base64"
	"regexp"
	"slices"
	"testing"

	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/internal/jsonref"
)

// FuzzDecodeEKMRequest: decodeRequest accepts exactly the bodies that
// referenceRequest, an independent reading with encoding/json and the
// API's rules written out again here, accepts, for every operation, and
// reads the same values from them; what it refuses is a 400 whose message
// is short and never the client's own text.
func FuzzDecodeEKMRequest(f *testing.F) {
	ctx := `"request_context":{"request_id":"r","correlation_id":"c","pool_name":"p"}`
	for _, seed := range []string{
		`{` + ctx + `}`,
		`{` + ctx + `,"alg":"A256KW","value":"AAECAwQFBgcICQoLDA0ODw"}`,
		`{` + ctx + `,"alg":"RSA-OAEP","value":"AQAB","extra":[1,{"a":2}]}`,
		`{` + ctx + `,"alg":"A256KWP","value":"AQA="}`,
		`{` + ctx + `,"alg":"A256KWP","value":"+/8"}`,
		`{` + ctx + `,"alg":"A256KWP","value":"AQ\nAB"}`,
		`{` + ctx + `,"alg":"A256KWP","value":""}`,
		`{` + ctx + `,"alg":"a256kw","value":"AQAB"}`,
		`{` + ctx + `,"ALG":"A256KW","value":"AQAB"}`,
		`{` + ctx + `,"alg":"A256KW","alg":"A256KW","value":"AQAB"}`,
		`{"request_context":{"correlation_id":"c","correlation_id":"c","pool_name":"p"}}`,
		`{"request_context":{"correlation_id":"c"}}`, `{"request_context":{"pool_name":"p"}}`,
		`{"request_context":{"correlation_id":"","pool_name":"p"}}`,
		`{"request_context":{"correlation_id":1,"pool_name":"p"}}`, `{"request_context":[]}`, `{"request_context":null}`,
		`{"request_context":{"correlation_id":"c","pool_name":"p","x":{"y":1,"y":2}}}`,
		`{` + ctx + `,"alg":"A256KW","value":null}`, `{` + ctx + `,"alg":5,"value":"AQAB"}`,
		`{` + ctx + `}}`, `{` + ctx + `} x`, `{}{}`, ``, `null`, `[]`, `"x"`, `{`, `{"a":1,}`,
		"{\"\xff\":1,\"\xfe\":2}", `{"\ud800":1,"\udfff":2}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, op := range []operation{opInfo, opMetadata, opWrap, opUnwrap} {
			got, xerr := decodeRequest(op, body)
			want, ok := referenceRequest(op, body)
			if (xerr == nil) != ok {
				t.Fatalf("%s: decodeRequest error %v, reference accepts: %v", op, xerr, ok)
			}
			if xerr != nil {
				if got != nil || xerr.status() != 400 || len(xerr.message) >= 256 || xerr.message == "" {
					t.Fatalf("%s: error %v (status %d)", op, xerr, xerr.status())
				}
				continue
			}
			if got.context != want.context || got.alg != want.alg || !bytes.Equal(got.value, want.value) ||
				(got.alg != "" && got.wrapAlg != algorithms[got.alg]) {
				t.Fatalf("%s: decodeRequest read %+v, the reference %+v", op, got, want)
			}
		}
	})
}

// base64urlAlphabet is RFC 4648 §5's alphabet, without padding.
var base64urlAlphabet = regexp.MustCompile(`^[A-Za-z0-9_-]*$`)

// referenceRequest reads body without decodeRequest's code: package jsonref
// (encoding/json) checks that it is one JSON value and nothing after it and
// refuses a name given twice in the top-level object or request_context;
// the fields are looked up by exact name, and the API's rules are applied
// as the reference (reference/azure-ekm.md §2) states them.
func referenceRequest(op operation, body []byte) (*ekmRequest, bool) {
	// alg and value belong to key wrap only: for info and metadata they
	// are unknown names, whose value is never looked at.
	wrap := op == opWrap || op == opUnwrap
	v, err := jsonref.Read(body, func(depth int, parent string) bool {
		return depth == 0 || depth == 1 && parent == "request_context"
	})
	if err != nil {
		return nil, false
	}
	top, ok := v.(map[string]any)
	if !ok {
		return nil, false
	}
	rc, ok := top["request_context"].(map[string]any)
	if !ok {
		return nil, false
	}
	req := &ekmRequest{}
	for _, f := range []struct {
		name     string
		required bool
		into     *string
	}{{"request_id", false, &req.context.RequestID}, {"correlation_id", true, &req.context.CorrelationID}, {"pool_name", true, &req.context.PoolName}} {
		switch s := rc[f.name].(type) {
		case nil:
			if f.required {
				return nil, false
			}
		case string:
			if len(s) > 256 || (s == "" && f.required) {
				return nil, false
			}
			*f.into = s
		default:
			return nil, false
		}
	}
	if !wrap {
		return req, true
	}
	alg, ok := top["alg"].(string)
	if !ok || !slices.Contains([]string{"A256KW", "A256KWP", "RSA-OAEP-256", "RSA-OAEP"}, alg) {
		return nil, false
	}
	value, ok := top["value"].(string)
	if !ok || !base64urlAlphabet.MatchString(value) {
		return nil, false
	}
	b, err := base64.RawURLEncoding.Strict().DecodeString(value)
	if err != nil || len(b) == 0 {
		return nil, false
	}
	req.alg, req.value = alg, b
	return req, true
}

// TestAPIVersion is the table of the api-version query parameter.
func TestAPIVersion(t *testing.T) {
	for _, tt := range []struct {
		query string
		ok    bool
	}{
		{"api-version=0.1-preview", true},
		{"api-version=0.1-preview&other=1", true},
		{"api-version=0.1%2Dpreview", true},
		{"", false},
		{"api-version=", false},
		{"api-version=1.0", false},
		{"API-VERSION=0.1-preview", false},
		{"api-version=0.1-preview&api-version=0.1-preview", false},
		{"api-version=0.1-preview;x", false},
		{"api-version=%zz", false},
	} {
		xerr := checkAPIVersion(tt.query)
		if (xerr == nil) != tt.ok {
			t.Errorf("%q: %v, want ok %v", tt.query, xerr, tt.ok)
		}
		if xerr != nil && (xerr.code != ekmapi.CodeUnsupportedAPIVersion || xerr.status() != 400) {
			t.Errorf("%q: %v", tt.query, xerr)
		}
	}
}
