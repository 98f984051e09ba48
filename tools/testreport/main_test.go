package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// events writes go test -json lines for one package.
func events(lines ...string) string {
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(`{"Package":"p",` + l + "}\n")
	}
	return b.String()
}

var (
	passing = events(`"Action":"run","Test":"TestA"`, `"Action":"pass","Test":"TestA"`, `"Action":"pass"`)
	failing = events(`"Action":"output","Test":"TestA","Output":"    a_test.go:1: wrong\n"`, `"Action":"fail","Test":"TestA"`, `"Action":"fail"`)
	skipped = events(`"Action":"output","Test":"TestB/sub","Output":"    b_test.go:2: no SoftHSM2\n"`, `"Action":"skip","Test":"TestB/sub"`, `"Action":"pass"`)
	noTests = `{"Action":"skip","Package":"q"}` + "\n"
)

func TestRunFailsOnWhatDidNotRun(t *testing.T) {
	tests := []struct {
		name, input, allow string
		wantErr            string
		wantOut            []string
	}{
		{name: "a passing run passes", input: passing, wantOut: []string{"1 passed, 0 failed, 0 skipped"}},
		{name: "a package without tests is no skip", input: passing + noTests, wantOut: []string{"0 skipped"}},
		{name: "a failed test fails the run and shows its output", input: failing, wantErr: "failed tests: 1", wantOut: []string{"wrong"}},
		{name: "a skip not on the allow-list fails the run with its reason", input: skipped, wantErr: "skips not on the allow-list: 1",
			wantOut: []string{"SKIP (not on the allow-list) p TestB/sub: b_test.go:2: no SoftHSM2", "1 skipped (0 allowed, 1 not on the allow-list)"}},
		{name: "a skip on the allow-list passes and is counted", input: skipped, allow: "# comment\np TestB/sub written on purpose only\n",
			wantOut: []string{"SKIP (allowed: written on purpose only) p TestB/sub", "1 skipped (1 allowed, 0 not on the allow-list)"}},
		{name: "an allow-list entry for another test allows nothing", input: skipped, allow: "p TestB why\n", wantErr: "skips not on the allow-list: 1",
			wantOut: []string{"note: p TestB is on the allow-list but did not skip"}},
		{name: "an allow-list entry needs a reason", input: passing, allow: "p TestB\n", wantErr: "want <package> <test> <reason>"},
		{name: "a build failure fails the run", input: `{"ImportPath":"p","Action":"build-output","Output":"syntax error\n"}` + "\n" + `{"ImportPath":"p","Action":"build-fail"}` + "\n",
			wantErr: "did not build", wantOut: []string{"syntax error"}},
		{name: "text that is not an event fails the run", input: "no Go files in /x\n", wantErr: "did not build", wantOut: []string{"no Go files"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			allowPath := ""
			if tt.allow != "" {
				allowPath = filepath.Join(t.TempDir(), "allow")
				if err := os.WriteFile(allowPath, []byte(tt.allow), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			var out strings.Builder
			err := run(strings.NewReader(tt.input), &out, allowPath)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("err = %v, want %q", err, tt.wantErr)
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output has no %q:\n%s", w, out.String())
				}
			}
		})
	}
}
