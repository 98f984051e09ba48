package xkshandler

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// TestPlainRequestIsRefused: a request that did not arrive over TLS gets
// AccessDeniedException before its body is read or its signature checked,
// whatever the config looked like at load (a JSON config can route plain
// traffic in ways the load-time check does not see).
func TestPlainRequestIsRefused(t *testing.T) {
	const path = "/x/kms/xks/v1"
	h := &Handler{stores: map[string]*KeyStore{path: {URIPath: path}}}
	r := httptest.NewRequest(http.MethodPost, "http://xks.internal"+path+"/health", strings.NewReader("{}"))
	r.TLS = nil
	var x exchange
	h.serve(&x, r, path+"/health")
	if x.err == nil || x.err.name != xksapi.AccessDeniedException || x.err.httpStatus() != http.StatusForbidden {
		t.Fatalf("a plain request: %+v", x.err)
	}
}
