// Command testreport reads `go test -json` on its standard input and says
// what the run did not run: it prints each package's result line, the
// output of every failed test, and every skipped test with its reason,
// then the counts, and exits non-zero when a test failed, a package did not
// build, or a test skipped that the allow-list does not name.
//
//	go test -json ./... | go run ./tools/testreport -allow scripts/allowed-skips.txt
//
// `go test` alone prints no skips, so a suite whose tests skip for want of
// a component passes without having run them; scripts/test.sh (make test)
// runs every test through this command.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// event is one line of `go test -json` (cmd/test2json's TestEvent).
type event struct {
	Action     string
	Package    string
	ImportPath string // build-output and build-fail events
	Test       string
	Output     string
}

// testKey names one test (or subtest) of one package.
type testKey struct{ pkg, test string }

// report is what the run did, as read so far.
type report struct {
	out      io.Writer
	output   map[testKey]*strings.Builder
	passed   int
	failed   []testKey
	skipped  []testKey
	reasons  map[testKey]string
	buildErr bool
	pkgFail  bool
}

func newReport(out io.Writer) *report {
	return &report{out: out, output: map[testKey]*strings.Builder{}, reasons: map[testKey]string{}}
}

func (r *report) add(e event) {
	if e.Action == "build-output" {
		fmt.Fprint(r.out, e.Output)
		return
	}
	if e.Action == "build-fail" {
		r.buildErr = true
		return
	}
	k := testKey{e.Package, e.Test}
	if e.Test == "" {
		// Package lines: its result ("ok", "FAIL", "? ... [no test
		// files]") and what the test binary printed outside any test, a
		// panic or a TestMain's message included.
		if e.Action == "output" && !strings.HasPrefix(e.Output, "=== ") && e.Output != "PASS\n" {
			fmt.Fprint(r.out, e.Output)
		}
		if e.Action == "fail" {
			r.pkgFail = true
			// Tests that never ended: the binary died in them (a
			// panic in another goroutine, the -timeout).
			for t, b := range r.output {
				if t.pkg == e.Package {
					fmt.Fprint(r.out, b.String())
					delete(r.output, t)
				}
			}
		}
		return
	}
	switch e.Action {
	case "output":
		b := r.output[k]
		if b == nil {
			b = new(strings.Builder)
			r.output[k] = b
		}
		b.WriteString(e.Output)
	case "pass":
		r.passed++
		delete(r.output, k)
	case "fail":
		r.failed = append(r.failed, k)
		if b := r.output[k]; b != nil {
			fmt.Fprint(r.out, b.String())
		}
		delete(r.output, k)
	case "skip":
		r.skipped = append(r.skipped, k)
		r.reasons[k] = skipReason(r.output[k])
		delete(r.output, k)
	}
}

// skipReason is what the test logged, without the lines go test adds
// around it.
func skipReason(b *strings.Builder) string {
	if b == nil {
		return ""
	}
	var lines []string
	for line := range strings.SplitSeq(b.String(), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "=== ") || strings.HasPrefix(line, "--- ") {
			continue
		}
		lines = append(lines, line)
	}
	return strings.Join(lines, " / ")
}

// allowList maps the tests that may skip to why.
type allowList map[testKey]string

// readAllowList reads lines of "<package> <test> <reason>"; blank lines and
// lines starting with # are comments. Every entry must give its reason.
func readAllowList(path string) (allowList, error) {
	allowed := allowList{}
	if path == "" {
		return allowed, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) < 3 {
			return nil, fmt.Errorf("%s:%d: want <package> <test> <reason>", path, n)
		}
		allowed[testKey{fields[0], fields[1]}] = strings.Join(fields[2:], " ")
	}
	return allowed, sc.Err()
}

// summarize prints the skips and the counts, and returns an error when the
// run must fail.
func (r *report) summarize(allowed allowList) error {
	sort.Slice(r.skipped, func(i, j int) bool {
		a, b := r.skipped[i], r.skipped[j]
		return a.pkg < b.pkg || a.pkg == b.pkg && a.test < b.test
	})
	var unlisted int
	for _, k := range r.skipped {
		why, ok := allowed[k]
		if ok {
			fmt.Fprintf(r.out, "SKIP (allowed: %s) %s %s: %s\n", why, k.pkg, k.test, r.reasons[k])
			continue
		}
		unlisted++
		fmt.Fprintf(r.out, "SKIP (not on the allow-list) %s %s: %s\n", k.pkg, k.test, r.reasons[k])
	}
	for k := range allowed {
		if _, ok := r.reasons[k]; !ok {
			fmt.Fprintf(r.out, "note: %s %s is on the allow-list but did not skip\n", k.pkg, k.test)
		}
	}
	fmt.Fprintf(r.out, "tests: %d passed, %d failed, %d skipped (%d allowed, %d not on the allow-list)\n",
		r.passed, len(r.failed), len(r.skipped), len(r.skipped)-unlisted, unlisted)
	var errs []error
	if r.buildErr {
		errs = append(errs, errors.New("a package did not build or could not be listed"))
	}
	if len(r.failed) > 0 || r.pkgFail {
		errs = append(errs, fmt.Errorf("failed tests: %d", len(r.failed)))
	}
	if unlisted > 0 {
		errs = append(errs, fmt.Errorf("skips not on the allow-list: %d", unlisted))
	}
	return errors.Join(errs...)
}

func run(in io.Reader, out io.Writer, allowPath string) error {
	allowed, err := readAllowList(allowPath)
	if err != nil {
		return err
	}
	r := newReport(out)
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for sc.Scan() {
		var e event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			// go test writes some errors (a package that cannot be
			// listed) as plain text.
			fmt.Fprintln(out, sc.Text())
			r.buildErr = true
			continue
		}
		if e.Package == "" {
			e.Package = e.ImportPath
		}
		r.add(e)
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return r.summarize(allowed)
}

func main() {
	allowPath := flag.String("allow", "", "the allow-list of tests that may skip: lines of <package> <test> <reason>")
	flag.Parse()
	if err := run(os.Stdin, os.Stdout, *allowPath); err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(1)
	}
}
