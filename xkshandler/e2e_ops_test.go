package xkshandler_test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// TestSecondaryAuthorization runs a CEL policy through the Caddyfile: one
// row per rule of the policy, as KMS would send the requests.
func TestSecondaryAuthorization(t *testing.T) {
	f := newFixtureWith(t, func(f *fixture) {
		f.ks1Extra = "\t\t\tauthorize {\n" +
			"\t\t\t\tdeny no-ebs-encrypt `operation == \"Encrypt\" && via_service == \"ebs\"`\n" +
			"\t\t\t\tdeny blocked-user `principal == \"arn:aws:iam::111122223333:user/Mallory\"`\n" +
			"\t\t\t\tallow app-account `glob(principal, \"arn:aws:iam::111122223333:*\")`\n" +
			"\t\t\t\tallow partner `account_in(principal, [\"444455556666\"]) && operation == \"Decrypt\"`\n" +
			"\t\t\t}\n"
	})
	meta := func(principal, op, via string) string {
		return `"requestMetadata":{"awsPrincipalArn":"` + principal + `","kmsKeyArn":"arn:aws:kms:us-east-1:111122223333:key/k","kmsOperation":"` + op + `","kmsRequestId":"r-authz","kmsViaService":"` + via + `"}`
	}
	encrypt := func(principal, via string) string {
		return `{` + meta(principal, "GenerateDataKey", via) + `,"plaintext":"AAAA","encryptionAlgorithm":"AES_GCM"}`
	}
	r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encrypt("arn:aws:iam::111122223333:role/app", ""))
	if r.status != http.StatusOK {
		t.Fatalf("encrypt: %d %s", r.status, r.raw)
	}
	s := sealed{r.bytes(t, "ciphertext"), r.bytes(t, "initializationVector"), r.bytes(t, "authenticationTag"), r.bytes(t, "ciphertextMetadata")}
	decrypt := func(principal, kmsOp string) string {
		b := decryptBody(s, nil)
		return strings.Replace(b, cryptoMeta, meta(principal, kmsOp, ""), 1)
	}
	const path = "/ks1/kms/xks/v1/keys/" + keyBoth
	tests := []struct {
		name, op, body string
		allowed        bool
		rule           string
	}{
		{"principal of the allowed account", "encrypt", encrypt("arn:aws:iam::111122223333:role/app", ""), true, "app-account"},
		{"principal denied by name", "encrypt", encrypt("arn:aws:iam::111122223333:user/Mallory", ""), false, "blocked-user"},
		{"kmsViaService condition denies", "encrypt", encrypt("arn:aws:iam::111122223333:role/app", "ebs"), false, "no-ebs-encrypt"},
		{"kmsViaService condition is per operation", "decrypt", decrypt("arn:aws:iam::111122223333:role/app", "Decrypt"), true, "app-account"},
		{"wildcard account: other account refused", "encrypt", encrypt("arn:aws:iam::999999999999:role/app", ""), false, ""},
		{"account list: partner may decrypt", "decrypt", decrypt("arn:aws:sts::444455556666:assumed-role/x/y", "Decrypt"), true, "partner"},
		{"account list: partner may not encrypt", "encrypt", encrypt("arn:aws:sts::444455556666:assumed-role/x/y", ""), false, ""},
		{"service principal, no rule matches", "encrypt", encrypt("ec2.amazonaws.com", ""), false, ""},
		{"unknown kmsOperation goes to the policy", "decrypt", decrypt("arn:aws:iam::111122223333:role/app", "BulkDecrypt"), true, "app-account"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := f.call(f.ks1[0], path+"/"+tt.op, tt.body)
			if tt.allowed {
				if r.status != http.StatusOK {
					t.Fatalf("denied: %d %s", r.status, r.raw)
				}
				return
			}
			expectError(t, r, http.StatusForbidden, "AccessDeniedException")
		})
	}
	// Health is never subject to the policy, even signed by nobody it
	// would allow.
	if r := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody); r.status != http.StatusOK {
		t.Errorf("health under a policy: %d %s", r.status, r.raw)
	}
	// The log names the rule that denied.
	logs, err := os.ReadFile(f.logFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, rule := range []string{"blocked-user", "no-ebs-encrypt"} {
		if !strings.Contains(string(logs), `"authz_rule":"`+rule+`"`) {
			t.Errorf("no log line names the rule %s", rule)
		}
	}
	if !strings.Contains(string(logs), "no allow rule matched") {
		t.Error("no log line says that no allow rule matched")
	}
}

func TestPolicyThatFailsToCompileIsAConfigError(t *testing.T) {
	f := newFixture(t)
	f.ks1Extra = "\t\t\tauthorize {\n\t\t\t\tallow broken `principal ==`\n\t\t\t}\n"
	err := loadErr(f)
	if err == nil || !strings.Contains(err.Error(), "authorize: rule") || !strings.Contains(err.Error(), "broken") {
		t.Fatalf("loading a policy with a syntax error: %v", err)
	}
}

// loadErr loads the fixture's config through the admin API and returns the
// error the load failed with, if any. The running config stays.
func loadErr(f *fixture) error {
	f.t.Helper()
	defer func() { f.ks1Extra = "" }()
	code, body := f.proxy.Admin(http.MethodPost, "/load", "text/caddyfile", strings.NewReader(f.config(1)))
	if code == http.StatusOK {
		return nil
	}
	return &loadError{string(body)}
}

type loadError struct{ msg string }

func (e *loadError) Error() string { return e.msg }

// TestRateLimitIsThrottlingWithoutTheHSM: a key store's quota of 1
// request/s with a burst of 5 serves the burst, then refuses with
// ThrottlingException until time gives it a new token, one a second; a
// refused request never reaches the HSM, and health is not counted. The
// quota reads a clock the test moves, so that how fast the machine sends
// the requests cannot refill the bucket.
func TestRateLimitIsThrottlingWithoutTheHSM(t *testing.T) {
	f, shim := newFaultFixture(t, "")
	var elapsed atomic.Int64 // nanoseconds since start, moved by the test only
	start := time.Now()
	frontend.SetQuotaClock(func() time.Time { return start.Add(time.Duration(elapsed.Load())) })
	t.Cleanup(func() { frontend.SetQuotaClock(nil) })
	f.ks1Extra = "\t\t\trate_limit 1 5\n"
	f.load(2)
	before := shim.Calls("C_EncryptInit")
	served := 0
	send := func(n int) (ok, throttled int) {
		t.Helper()
		for range n {
			r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false))
			switch {
			case r.status == http.StatusOK:
				ok++
			case r.str("errorName") == "ThrottlingException" && r.status == http.StatusTooManyRequests:
				throttled++
			default:
				t.Fatalf("unexpected answer %d %s", r.status, r.raw)
			}
		}
		served += ok
		return ok, throttled
	}
	tests := []struct {
		name          string
		advance       time.Duration
		send          int
		ok, throttled int
	}{
		{"the burst is served, then every request is refused", 0, 8, 5, 3},
		{"no time, no new token", 0, 2, 0, 2},
		{"a second gives one token", time.Second, 2, 1, 1},
		{"half a second gives none", 500 * time.Millisecond, 1, 0, 1},
		{"the other half gives one", 500 * time.Millisecond, 2, 1, 1},
		{"an idle minute refills the burst and no more", time.Minute, 7, 5, 2},
	}
	for _, tt := range tests {
		elapsed.Add(int64(tt.advance))
		if ok, throttled := send(tt.send); ok != tt.ok || throttled != tt.throttled {
			t.Errorf("%s: %d served and %d throttled of %d, want %d and %d", tt.name, ok, throttled, tt.send, tt.ok, tt.throttled)
		}
	}
	if got := shim.Calls("C_EncryptInit") - before; got != served {
		t.Fatalf("the HSM saw %d encryptions for %d served requests: throttled ones reached it", got, served)
	}
	// Health is not counted against the quota.
	if r := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody); r.status != http.StatusOK {
		t.Errorf("health when the quota is spent: %d %s", r.status, r.raw)
	}
}

// TestMaxConcurrentIsThrottling: while one request is in a hung HSM, a
// second is refused at once. Had it waited for the slot, it would wait for
// the hang, which lasts until the test ends it after the answer.
func TestMaxConcurrentIsThrottling(t *testing.T) {
	f, shim := newFaultFixture(t, "")
	f.ks1Extra = "\t\t\tmax_concurrent 1\n"
	f.load(2)
	shim.Set("C_Encrypt=hang")
	var wg sync.WaitGroup
	var slow response
	wg.Go(func() {
		slow = f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false))
	})
	shim.WaitHung(t, "C_Encrypt", 1)
	r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/metadata", metaBody)
	expectError(t, r, http.StatusTooManyRequests, "ThrottlingException")
	shim.Set()
	wg.Wait()
	if slow.status != http.StatusOK {
		t.Errorf("the slow request: %d %s", slow.status, slow.raw)
	}
}

// TestDeadlineIsDependencyTimeout: the key store's deadline (100ms) ends
// the request while the HSM call, under a long call timeout, still hangs.
func TestDeadlineIsDependencyTimeout(t *testing.T) {
	f, shim := newFaultFixture(t, "")
	f.ks1Extra = "\t\t\tdeadline 100ms\n"
	f.load(2)
	shim.Set("C_Encrypt=hang")
	r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody([]byte("x"), nil, false))
	expectError(t, r, http.StatusServiceUnavailable, "DependencyTimeoutException")
	// The abandoned HSM call is accounted for while it runs.
	if m := f.metrics(); !regexp.MustCompile(`caddy_xks_hsm_stuck_calls\{backend="main"\} 1\b`).MatchString(m) {
		t.Errorf("the abandoned call is not in the metrics:\n%s", grepLines(m, "stuck"))
	}
	shim.Set()
}

// metrics fetches the admin endpoint's Prometheus metrics.
func (f *fixture) metrics() string {
	f.t.Helper()
	return f.proxy.Metrics()
}

func grepLines(s, sub string) string {
	var out []string
	for line := range strings.SplitSeq(s, "\n") {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

func TestMetrics(t *testing.T) {
	f := newFixture(t)
	f.encrypt(f.ks1[0], "/ks1", keyBoth, []byte("x"), nil)
	expectError(t, f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyMissing+"/metadata", metaBody), 404, "KeyNotFoundException")
	okSample := `caddy_xks_requests_total{key_store="/ks1/kms/xks/v1",operation="Encrypt",outcome="ok"}`
	m := f.metrics()
	before := proxytest.MetricValue(t, m, okSample)
	if before < 1 || proxytest.MetricValue(t, m, `caddy_xks_requests_total{key_store="/ks1/kms/xks/v1",operation="GetKeyMetadata",outcome="KeyNotFoundException"}`) < 1 {
		t.Fatalf("request counters missing:\n%s", grepLines(m, "caddy_xks_requests_total"))
	}
	for _, name := range []string{
		`caddy_xks_request_duration_seconds_count{key_store="/ks1/kms/xks/v1",operation="Encrypt"}`,
		`caddy_xks_hsm_duration_seconds_count{key_store="/ks1/kms/xks/v1",operation="Encrypt"}`,
		`caddy_xks_hsm_sessions_in_use{backend="main"}`,
		`caddy_xks_hsm_sessions_idle{backend="main"}`,
		`caddy_xks_hsm_session_waiters{backend="main"}`,
		`caddy_xks_hsm_health{backend="main",status="ACTIVE"}`,
	} {
		if proxytest.MetricValue(t, m, name) < 0 {
			t.Errorf("no sample %s", name)
		}
	}
	if v := proxytest.MetricValue(t, m, `caddy_xks_hsm_health{backend="main",status="ACTIVE"}`); v != 1 {
		t.Errorf("backend health ACTIVE = %v", v)
	}
	// The counters survive a reload.
	f.load(7)
	f.encrypt(f.ks1[0], "/ks1", keyBoth, []byte("x"), nil)
	if after := proxytest.MetricValue(t, f.metrics(), okSample); after != before+1 {
		t.Errorf("after a reload the counter is %v, want %v", after, before+1)
	}
}

func TestReadyPath(t *testing.T) {
	f, shim := newFaultFixture(t, "\t\t\thealth_ttl 1ms")
	f.xksExtra = "\t\tready_path /ready\n"
	f.load(2)
	get := func() int {
		resp, err := f.proxy.Client.Get(f.origin + "/ready")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if strings.Contains(string(body), "CKR") || strings.Contains(string(body), "SoftHSM") {
			t.Errorf("the readiness answer tells details: %q", body)
		}
		return resp.StatusCode
	}
	if code := get(); code != http.StatusOK {
		t.Fatalf("ready with a healthy HSM: %d", code)
	}
	shim.Set("C_EncryptInit=0x30")
	time.Sleep(10 * time.Millisecond) // past the 1ms health cache
	if code := get(); code != http.StatusServiceUnavailable {
		t.Fatalf("ready with a failing HSM: %d; health: %s", code, f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody).raw)
	}
	shim.Set()
}

func TestCertificatePreflight(t *testing.T) {
	f := newFixture(t)
	if r := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody); r.status != http.StatusOK {
		t.Fatalf("health: %d %s", r.status, r.raw)
	}
	// The test's self-signed certificate is not from a CA KMS trusts: the
	// preflight must say so, for the name the request used.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		logs, err := os.ReadFile(f.logFile)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(logs), "AWS KMS would refuse this server certificate") && strings.Contains(string(logs), `"hostname":"localhost"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no preflight warning in the log:\n%s", grepLines(string(logs), "certificate"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if v := proxytest.MetricValue(t, f.metrics(), `caddy_xks_certificate_expiry_timestamp_seconds{hostname="localhost"}`); v < float64(time.Now().Unix()) {
		t.Errorf("certificate expiry metric = %v", v)
	}
}

// TestHTTP3IsWarnedOf: a key store's server that offers HTTP/3 (Caddy's
// default), which KMS never uses and whose 0-RTT requests can be replayed,
// is warned of at every load, and advertised to clients; with protocols h1
// h2 it is neither.
func TestHTTP3IsWarnedOf(t *testing.T) {
	const warning = "offers HTTP/3, which KMS never uses"
	f := newFixture(t)
	warnings := func() int {
		logs, err := os.ReadFile(f.logFile)
		if err != nil {
			t.Fatal(err)
		}
		return len(regexp.MustCompile(`"level":"warn".*`+regexp.QuoteMeta(warning)+`.*"accepts_0rtt_requests":true`).FindAll(logs, -1))
	}
	advertised := func() string {
		req, err := http.NewRequest(http.MethodPost, f.origin+"/ks1/kms/xks/v1/health", strings.NewReader(healthBody))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := f.proxy.Client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		return resp.Header.Get("Alt-Svc")
	}
	if n := warnings(); n == 0 {
		t.Fatal("no warning for a key store's server with Caddy's default protocols h1 h2 h3")
	}
	if alt := advertised(); !strings.Contains(alt, "h3") {
		t.Fatalf("Alt-Svc %q: the server does not offer HTTP/3, so the warning is not about what runs", alt)
	}
	n := warnings()
	cfg := strings.Replace(f.config(2), "\thsm {", "\tservers {\n\t\tprotocols h1 h2\n\t}\n\thsm {", 1)
	f.proxy.Ready = func() error { return f.reports(2) }
	f.proxy.Client.CloseIdleConnections()
	f.proxy.Load(cfg)
	f.proxy.Client.CloseIdleConnections()
	if warnings() != n {
		t.Error("a warning for a server with protocols h1 h2")
	}
	if alt := advertised(); alt != "" {
		t.Errorf("with protocols h1 h2 the server advertises Alt-Svc %q", alt)
	}
}

// TestPlainHTTPGetsNoXKSService: KMS always calls over TLS, so a config
// that serves a key store on a plain-HTTP site does not load, unless the
// key store opts in for a TLS-terminating load balancer; then it serves.
// (A plain request that reaches a key store some other way is refused:
// TestPlainRequestIsRefused.)
func TestPlainHTTPGetsNoXKSService(t *testing.T) {
	f := newFixture(t)
	c := f.ks2
	site := func(optIn string) string {
		return fmt.Sprintf(`
http://127.0.0.1:%d {
	xks {
		key_store /plain {
			hsm main
			region %s
			credential %s {env.XKS_TEST_SECRET_2}
			keys %s
			deadline 30s
%s
		}
	}
}
`, f.proxy.HTTPPort, region, c.akid, keyBoth, optIn)
	}
	encrypt := func() response {
		body := encryptBody([]byte("over plain HTTP"), nil, false)
		req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/plain/kms/xks/v1/keys/%s/encrypt", f.proxy.HTTPPort, keyBoth), strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if err := signRequest(req, c, body, region, time.Now()); err != nil {
			t.Fatal(err)
		}
		return f.do(req)
	}
	load := func(fleetSize int, optIn string) {
		f.proxy.Ready = func() error { return f.reports(fleetSize) }
		f.proxy.Load(f.config(fleetSize) + site(optIn))
	}
	// Without the opt-in the config does not load, and the running one stays.
	err := f.proxy.TryLoad(f.config(2) + site(""))
	if err == nil || !strings.Contains(err.Error(), "key store /plain/kms/xks/v1 is served on a site without TLS") || !strings.Contains(err.Error(), "allow_plain_http") {
		t.Fatalf("loading xks on a plain-HTTP site: %v", err)
	}

	load(3, "\t\t\tallow_plain_http")
	if r := encrypt(); r.status != http.StatusOK {
		t.Fatalf("with allow_plain_http: %d %s", r.status, r.raw)
	}
	if logs, _ := os.ReadFile(f.logFile); !strings.Contains(string(logs), "allow_plain_http") {
		t.Error("no warning that the key store serves plain HTTP")
	}
}
