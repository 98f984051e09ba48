package xkscmd

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// benchReport checks bench's summary: every line is there and no call
// failed. It returns the number of successful calls.
func benchReport(t *testing.T, out string) int {
	t.Helper()
	requests := regexp.MustCompile(`(?m)^requests\s+(\d+) ok, (\d+) failed$`).FindStringSubmatch(out)
	if requests == nil {
		t.Fatalf("no requests line in:\n%s", out)
	}
	if requests[2] != "0" {
		t.Errorf("%s calls failed:\n%s", requests[2], out)
	}
	for _, line := range []string{`throughput\s+\d+ req/s`, `p50\s+\S+`, `p90\s+\S+`, `p99\s+\S+`, `p99\.9\s+\S+`, `max\s+\S+`} {
		if !regexp.MustCompile(`(?m)^` + line + `$`).MatchString(out) {
			t.Errorf("no line %q in:\n%s", line, out)
		}
	}
	if strings.Contains(out, "error") {
		t.Errorf("errors reported:\n%s", out)
	}
	ok, _ := strconv.Atoi(requests[1])
	return ok
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
			if ok := benchReport(t, out); ok < 10 {
				t.Errorf("only %d calls in 2s", ok)
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
	// 50 calls are due in the second; the last may miss the deadline.
	if ok := benchReport(t, out); ok < 45 || ok > 50 {
		t.Errorf("%d calls at 50 req/s for 1s, want about 50", ok)
	}
	if !regexp.MustCompile(`(?m)^sent late\s+p50 \S+, p99 \S+, max \S+$`).MatchString(out) {
		t.Errorf("no sent late line in:\n%s", out)
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
	if !regexp.MustCompile(`(?m)^error\s+KeyNotFoundException: \d+$`).MatchString(out) {
		t.Errorf("KeyNotFoundException not counted:\n%s", out)
	}
}
