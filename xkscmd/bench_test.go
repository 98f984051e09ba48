package xkscmd

import (
	"os"
	"regexp"
	"strconv"
	"testing"
)

// benchCounts is bench's accounting of a run's calls.
type benchCounts struct {
	due, sent, notSent, ok, failed int
}

// benchReport checks bench's summary: every line is there, and every call
// is accounted for: a sent call was answered ok or failed, and for a paced
// run (due > 0) a due call was sent or not sent, never both, and no call
// was sent that was not due.
func benchReport(t *testing.T, out string, paced bool) benchCounts {
	t.Helper()
	var c benchCounts
	atoi := func(s string) int {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("%q in:\n%s", s, out)
		}
		return n
	}
	requests := regexp.MustCompile(`(?m)^requests\s+(\d+) ok, (\d+) failed$`).FindStringSubmatch(out)
	if requests == nil {
		t.Fatalf("no requests line in:\n%s", out)
	}
	c.ok, c.failed = atoi(requests[1]), atoi(requests[2])
	if paced {
		calls := regexp.MustCompile(`(?m)^calls\s+(\d+) due, (\d+) sent, (-?\d+) not sent before the end$`).FindStringSubmatch(out)
		if calls == nil {
			t.Fatalf("no paced calls line in:\n%s", out)
		}
		c.due, c.sent, c.notSent = atoi(calls[1]), atoi(calls[2]), atoi(calls[3])
		if c.sent+c.notSent != c.due || c.notSent < 0 {
			t.Errorf("%d due, %d sent, %d not sent: the calls do not add up", c.due, c.sent, c.notSent)
		}
	} else {
		calls := regexp.MustCompile(`(?m)^calls\s+(\d+) sent$`).FindStringSubmatch(out)
		if calls == nil {
			t.Fatalf("no calls line in:\n%s", out)
		}
		c.sent = atoi(calls[1])
	}
	if c.ok+c.failed != c.sent {
		t.Errorf("%d sent, but %d ok and %d failed", c.sent, c.ok, c.failed)
	}
	for _, line := range []string{`throughput\s+\d+ req/s`, `p50\s+\S+`, `p90\s+\S+`, `p99\s+\S+`, `p99\.9\s+\S+`} {
		if !regexp.MustCompile(`(?m)^` + line + `$`).MatchString(out) {
			t.Errorf("no line %q in:\n%s", line, out)
		}
	}
	if c.ok > 0 && !regexp.MustCompile(`(?m)^max\s+\S+$`).MatchString(out) {
		t.Errorf("no max line in:\n%s", out)
	}
	if paced && c.sent > 0 && !regexp.MustCompile(`(?m)^sent late\s+p50 \S+, p99 \S+, max \S+$`).MatchString(out) {
		t.Errorf("no sent late line in:\n%s", out)
	}
	return c
}

func TestBenchAsFastAsPossible(t *testing.T) {
	p := startProxy(t)
	for _, tc := range clientProtocols {
		t.Run(tc.name, func(t *testing.T) {
			// The proxy runs in this process, whose CPU time bench reads.
			args := append(p.clientArgs(), tc.args...)
			args = append(args, "--duration", "2s", "--concurrency", "4", "--mix", "encrypt=3,decrypt=1",
				"--server-pid", strconv.Itoa(os.Getpid()), p.url("/good"))
			out, err := runCommand(t, "bench", args...)
			t.Logf("caddy xks bench:\n%s", out)
			if err != nil {
				t.Fatalf("bench: %v", err)
			}
			c := benchReport(t, out, false)
			if c.sent == 0 || c.failed != 0 {
				t.Errorf("%d calls sent, %d failed:\n%s", c.sent, c.failed, out)
			}
			for _, name := range []string{"server", "client"} {
				if !regexp.MustCompile(`(?m)^` + name + ` cpu  \S+ in all, \S+ per request$`).MatchString(out) {
					t.Errorf("no %s cpu line in:\n%s", name, out)
				}
			}
			if !regexp.MustCompile(`(?m)^protocol  ` + regexp.QuoteMeta(tc.protocol) + `$`).MatchString(out) {
				t.Errorf("no line %q in:\n%s", "protocol  "+tc.protocol, out)
			}
		})
	}
}

func TestBenchAtAFixedRate(t *testing.T) {
	p := startProxy(t)
	args := append(p.clientArgs(), "--duration", "1s", "--rate", "50", "--mix", "encrypt=1,decrypt=1,metadata=1,health=1", p.url("/good"))
	out, err := runCommand(t, "bench", args...)
	if err != nil {
		t.Fatalf("bench: %v\n%s", err, out)
	}
	// 50 calls are due in the second, however fast the machine sends
	// them; one that the run's end overtakes is counted as not sent.
	if c := benchReport(t, out, true); c.due != 50 || c.sent == 0 || c.failed != 0 {
		t.Errorf("%+v at 50 req/s for 1s, want 50 due, some sent, none failed:\n%s", c, out)
	}
}

func TestBenchCountsFailures(t *testing.T) {
	p := startProxy(t)
	// The metadata of a key the key store does not allow is a failure
	// that does not stop the load.
	args := append(p.clientArgs(), "--duration", "1s", "--rate", "20", "--key", "no-such-key", "--mix", "metadata=1", p.url("/good"))
	out, err := runCommand(t, "bench", args...)
	if err == nil {
		t.Fatalf("bench passed with every call failing:\n%s", out)
	}
	c := benchReport(t, out, true)
	m := regexp.MustCompile(`(?m)^error\s+KeyNotFoundException: (\d+)$`).FindStringSubmatch(out)
	if m == nil || m[1] != strconv.Itoa(c.sent) || c.ok != 0 || c.due != 20 {
		t.Errorf("%+v; want 20 due and every call sent counted as KeyNotFoundException:\n%s", c, out)
	}
}
