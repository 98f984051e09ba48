package xkshandler_test

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/xkshandler"
)

// Allocation budget of one Encrypt request through the handler, from
// BenchmarkHandlerEncrypt: 66 allocations and 5.5 KB. It was 167 and 8.6 KB
// while decodeRequest read the body token by token with encoding/json's
// Decoder (111 of them); the walk over the body that json.Valid accepted
// makes 32 in BenchmarkDecodeRequest. Allocations cost CPU twice, to make
// and to collect, on the cores that also run TLS and the HSM calls. The
// benchmark fails at twice the budget, so that a change that doubles them
// is seen; it never judges time.
const (
	encryptAllocBudget = 70
	encryptBytesBudget = 6 << 10
)

// BenchmarkHandlerEncrypt runs one Encrypt request at a time through
// Handler.ServeHTTP, in process: the production shape (audit log on,
// written to a file as JSON; metrics on), a SoftHSM2 token, no network and
// no TLS. It reports the allocations and bytes allocated per request; the
// request and response objects are reused, so those are the handler's.
func BenchmarkHandlerEncrypt(b *testing.B) {
	tk := hsmtest.NewToken(b)
	tk.CreateKey(b, "bench-key")
	cred := newCredential(b)
	b.Setenv("XKS_BENCH_PIN", tk.PIN)
	b.Setenv("XKS_BENCH_SECRET", cred.secret)
	cfg := map[string]any{
		"admin": map[string]any{"disabled": true},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"writer":  map[string]any{"output": "file", "filename": filepath.Join(b.TempDir(), "caddy.log")},
			"encoder": map[string]any{"format": "json"},
		}}},
		"apps": map[string]any{"hsm": map[string]any{"backends": map[string]any{"primary": map[string]any{
			"module": tk.Module, "token": tk.Label, "pin": "{env.XKS_BENCH_PIN}",
		}}}},
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		b.Fatal(err)
	}
	if err := caddy.Load(raw, true); err != nil {
		b.Fatalf("loading the hsm app: %v", err)
	}
	b.Cleanup(func() { _ = caddy.Stop() })
	h := &xkshandler.Handler{KeyStores: []*xkshandler.KeyStore{{
		URIPath:            "/bench/kms/xks/v1",
		HSM:                []string{"primary"},
		Region:             "us-east-1",
		Credentials:        []xkshandler.Credential{{AccessKeyID: cred.akid, SecretAccessKey: "{env.XKS_BENCH_SECRET}"}}, //nolint:gosec // a placeholder, resolved from the environment
		Keys:               []string{"bench-key"},
		CiphertextMetadata: "eGtzMQ==",
	}}}
	if err := h.Provision(caddy.ActiveContext()); err != nil {
		b.Fatalf("provisioning: %v", err)
	}
	if err := h.Validate(); err != nil {
		b.Fatal(err)
	}

	body := encryptBody(make([]byte, 32), nil, false)
	r := httptest.NewRequest(http.MethodPost, "https://localhost/bench/kms/xks/v1/keys/bench-key/encrypt", nil)
	r.Header.Set("Content-Type", "application/json")
	if err := signRequest(r, cred, body, "us-east-1", time.Now()); err != nil {
		b.Fatal(err)
	}
	r.TLS = &tls.ConnectionState{ServerName: "localhost"}
	w := &benchWriter{header: make(http.Header)}
	bodyReader := bytes.NewReader([]byte(body))
	r.Body = io.NopCloser(bodyReader)
	serve := func() {
		bodyReader.Reset([]byte(body))
		r.ContentLength = int64(len(body))
		clear(w.header)
		w.status, w.body = 0, w.body[:0]
		if err := h.ServeHTTP(w, r, nil); err != nil {
			b.Fatal(err)
		}
		if w.status != http.StatusOK {
			b.Fatalf("status %d: %s", w.status, w.body)
		}
	}
	serve() // key handle cache, verifier's signing key, first audit line

	b.ReportAllocs()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	b.ResetTimer()
	for b.Loop() {
		serve()
	}
	b.StopTimer()
	runtime.ReadMemStats(&after)
	n := float64(b.N)
	allocs := float64(after.Mallocs-before.Mallocs) / n
	bytesPer := float64(after.TotalAlloc-before.TotalAlloc) / n
	b.ReportMetric(allocs, "allocs/request")
	b.ReportMetric(bytesPer, "B/request")
	b.ReportMetric(encryptAllocBudget, "allocs-budget")
	if allocs > 2*encryptAllocBudget || bytesPer > 2*encryptBytesBudget {
		b.Errorf("an Encrypt request allocates %.0f times, %.0f bytes: over twice the budget of %d and %d (see encryptAllocBudget)",
			allocs, bytesPer, encryptAllocBudget, encryptBytesBudget)
	}
}

// benchWriter is a reusable http.ResponseWriter.
type benchWriter struct {
	header http.Header
	status int
	body   []byte
}

func (w *benchWriter) Header() http.Header { return w.header }

func (w *benchWriter) WriteHeader(status int) { w.status = status }

func (w *benchWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.body = append(w.body, p...)
	return len(p), nil
}
