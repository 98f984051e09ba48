package xkshandler_test

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// readinessSite is Caddyfile.example's probe for load balancers: a copy of
// a key store, limited by its route to the ready_path, on a plain-HTTP
// port.
func readinessSite(f *fixture, port int) string {
	return fmt.Sprintf(`
http://:%d {
	xks /ready {
		ready_path /ready
		key_store /ks2 {
			hsm main
			region %s
			credential %s {env.XKS_TEST_SECRET_2}
			keys %s
			deadline 30s
		}
	}
	respond 404
}
`, port, region, f.ks2.akid, keyOtherKS)
}

// getStatus GETs url over plain HTTP and returns the status.
func getStatus(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url) //nolint:gosec,noctx // a loopback URL of the test
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// TestReadinessProbeOnPlainHTTP: an xks handler that a route limits to
// its ready_path serves no key store, so it loads on a plain-HTTP site
// without allow_plain_http, answers the probe, and the XKS API is not
// served there.
func TestReadinessProbeOnPlainHTTP(t *testing.T) {
	f := newFixture(t)
	port := proxytest.FreePort(t)
	f.proxy.Ready = func() error { return f.reports(1) }
	if err := f.proxy.TryLoad(f.config(1) + readinessSite(f, port)); err != nil {
		t.Fatalf("the readiness probe on plain HTTP does not load: %v", err)
	}
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	if code := getStatus(t, base+"/ready"); code != http.StatusOK {
		t.Fatalf("/ready: %d, want 200", code)
	}
	req, err := http.NewRequest(http.MethodPost, base+"/ks2/kms/xks/v1/health", strings.NewReader(healthBody))
	if err != nil {
		t.Fatal(err)
	}
	if err := signRequest(req, f.ks2, healthBody, region, time.Now()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusNotFound || len(body) != 0 {
		t.Fatalf("a signed XKS call on the probe's port: %d %q, want the site's empty 404", resp.StatusCode, body)
	}
}

// TestReadyWaitsForEveryCertificate: an instance is not ready while Caddy
// holds no certificate for a name it serves key stores on over TLS; here
// the name's CA cannot be reached, so the certificate never comes.
func TestReadyWaitsForEveryCertificate(t *testing.T) {
	f := newFixture(t)
	f.xksExtra = "\t\tready_path /ready\n"
	f.load(1)
	ready := f.origin + "/ready"
	get := func() int {
		resp, err := f.proxy.Client.Get(ready)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(); code != http.StatusOK {
		t.Fatalf("ready with the certificate in hand: %d", code)
	}
	closed := proxytest.FreePort(t)
	site := fmt.Sprintf(`
nocert.test:%d {
	tls {
		issuer acme {
			dir https://127.0.0.1:%d/directory
		}
	}
	xks {
		key_store /elsewhere {
			hsm main
			region %s
			credential %s {env.XKS_TEST_SECRET_2}
			keys %s
		}
	}
}
`, f.proxy.HTTPSPort, closed, region, f.ks2.akid, keyOtherKS)
	f.proxy.Ready = func() error { return f.reports(1) }
	f.proxy.Load(f.config(1) + site)
	if code := get(); code != http.StatusServiceUnavailable {
		t.Fatalf("ready without a certificate for nocert.test: %d, want 503", code)
	}
	f.load(1)
	if code := get(); code != http.StatusOK {
		t.Fatalf("ready once the site without a certificate is gone: %d", code)
	}
}

// TestDrain: while the process drains, every XKS answer asks its client to
// close the connection; readiness does not change; DELETE and the next
// config load end it (a reload of an unchanged config loads nothing,
// unless forced).
func TestDrain(t *testing.T) {
	f := newFixture(t)
	f.xksExtra = "\t\tready_path /ready\n"
	f.load(1)
	h1 := &http.Client{Transport: f.proxy.Client.Transport.(*http.Transport).Clone()}
	h1.Transport.(*http.Transport).ForceAttemptHTTP2 = false
	h1.Transport.(*http.Transport).TLSClientConfig.NextProtos = []string{"http/1.1"}
	closes := func() bool {
		// Each call on a new connection: an idle keep-alive connection
		// that a config load closes can take the next request written
		// onto it with it (EOF), a race of HTTP/1.1 that
		// docs/operations.md describes and that is not this test's.
		h1.CloseIdleConnections()
		req, err := http.NewRequest(http.MethodPost, f.origin+"/ks1/kms/xks/v1/health", strings.NewReader(healthBody))
		if err != nil {
			t.Fatal(err)
		}
		if err := signRequest(req, f.ks1[0], healthBody, region, time.Now()); err != nil {
			t.Fatal(err)
		}
		resp, err := h1.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 1 {
			t.Fatalf("health over HTTP/1.1: %d %s", resp.StatusCode, resp.Proto)
		}
		return resp.Close
	}
	drain := func(method string) {
		if code, body := f.proxy.Admin(method, frontend.DrainPath, "", nil); code != http.StatusOK {
			t.Fatalf("%s %s: %d %s", method, frontend.DrainPath, code, body)
		}
	}
	if closes() {
		t.Fatal("the connection closes before draining")
	}
	drain(http.MethodPost)
	if !closes() {
		t.Fatal("while draining, the answer does not close the connection")
	}
	resp, err := f.proxy.Client.Get(f.origin + "/ready")
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("ready while draining: %d, want 200 (a balancer that cuts an unhealthy instance's connections would cut them)", resp.StatusCode)
	}
	drain(http.MethodDelete)
	if closes() {
		t.Fatal("DELETE did not end draining")
	}
	drain(http.MethodPost)
	f.load(2) // a changed config: Caddy provisions nothing for an unchanged one
	if closes() {
		t.Fatal("a config load did not end draining")
	}
}
