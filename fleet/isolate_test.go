package fleet_test

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

// isolatedEnv is set in the environment of the test process that runs the
// fleet, in a network namespace of its own, to the namespace of the process
// that started it (which the child proves it is not in).
const isolatedEnv = "XKS_FLEET_ISOLATED"

// runIsolated runs TestFleet again in a child of this test process, in a
// new network namespace that has nothing in it (not even loopback up), and
// reports its subtests as this test's. A dial from the machine's own
// namespace to a test host's address would leave the machine; from the
// child's it cannot.
func runIsolated(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the fleet test makes network namespaces, and that needs root (CI runs as root)")
	}
	for _, tool := range []string{"ip", "redis-server", "haproxy", "make"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Missing(t, tool+", which the fleet test runs", err)
		}
	}
	caddy := buildCaddy(t)
	timeout := 30 * time.Minute
	if d, ok := t.Deadline(); ok {
		timeout = time.Until(d) - 30*time.Second
	}
	// The child runs the subtests this test's -run selects (all of them,
	// unless a developer picks some: go test -run 'TestFleet/^(T1|T3)$').
	pattern := "^TestFleet$"
	if f := flag.Lookup("test.run"); f != nil && strings.Contains(f.Value.String(), "/") {
		pattern = f.Value.String()
	}
	cmd := exec.Command(os.Args[0], "-test.run="+pattern, "-test.v", fmt.Sprintf("-test.timeout=%s", timeout)) //nolint:gosec // this test binary, again
	parent, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatalf("reading this process's network namespace: %v", err)
	}
	cmd.Env = append(os.Environ(), isolatedEnv+"="+parent, caddyBinEnv+"="+caddy)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the test in a network namespace of its own: %v", err)
	}
	results := mirror(t, out)
	waitErr := cmd.Wait()
	for _, r := range results {
		t.Run(r.name, func(t *testing.T) {
			for _, line := range r.lines {
				t.Log(line)
			}
			switch r.outcome {
			case "FAIL":
				t.Fail()
			case "SKIP":
				t.SkipNow()
			case "PASS":
			default:
				t.Error("the subtest did not finish")
			}
		})
	}
	if waitErr != nil {
		t.Fatalf("the isolated fleet test: %v", waitErr)
	}
}

// subtest is what the isolated test printed of one of its subtests.
type subtest struct {
	name    string
	lines   []string
	outcome string
}

var (
	runLine = regexp.MustCompile(`^=== (?:RUN|NAME|CONT|PAUSE)\s+TestFleet(?:/(\S+))?$`)
	endLine = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): TestFleet(?:/(\S+))? \(`)
)

// mirror reads the isolated test's -test.v output: the lines of its
// subtests are kept to be reported as this test's own, the rest logged
// here.
func mirror(t *testing.T, out interface{ Read([]byte) (int, error) }) []*subtest {
	var results []*subtest
	byName := map[string]*subtest{}
	var current *subtest
	s := bufio.NewScanner(out)
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		line := s.Text()
		if m := runLine.FindStringSubmatch(line); m != nil {
			current = byName[m[1]]
			if current == nil && m[1] != "" {
				current = &subtest{name: m[1]}
				byName[m[1]] = current
				results = append(results, current)
			}
			continue
		}
		if m := endLine.FindStringSubmatch(line); m != nil {
			if r := byName[m[2]]; r != nil {
				r.outcome = m[1]
			}
			continue
		}
		if current != nil {
			current.lines = append(current.lines, strings.TrimLeft(line, " "))
		} else if line != "PASS" && line != "FAIL" {
			t.Log(line)
		}
	}
	return results
}
