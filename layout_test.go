package caddyxks

import (
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"
)

// listedPackage is what go list says of one package of the module.
type listedPackage struct {
	ImportPath string
	Deps       []string
}

// TestLayout: the product (every package but the test harnesses under
// internal/ and hsm/hsmtest, and the programs under tools/) depends on no
// harness, and a harness depends on no command of the product: code that
// ships never runs test code, and tests never build a program to run.
func TestLayout(t *testing.T) {
	const module = "github.com/caddy-xks/caddy-xks"
	out, err := exec.Command("go", "list", "-json", module+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	harness := func(p string) bool {
		return strings.HasPrefix(p, module+"/internal/") || p == module+"/hsm/hsmtest"
	}
	tool := func(p string) bool { return strings.HasPrefix(p, module+"/tools/") }
	command := func(p string) bool { return p == module || strings.HasPrefix(p, module+"/cmd/") }
	dec := json.NewDecoder(strings.NewReader(string(out)))
	var products, harnesses int
	for {
		var p listedPackage
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		switch {
		case tool(p.ImportPath):
			continue
		case harness(p.ImportPath):
			harnesses++
			for _, d := range p.Deps {
				if command(d) || tool(d) {
					t.Errorf("the test harness %s depends on %s", p.ImportPath, d)
				}
			}
		default:
			products++
			for _, d := range p.Deps {
				if harness(d) {
					t.Errorf("the product package %s depends on the test harness %s", p.ImportPath, d)
				}
			}
		}
	}
	if products < 10 || harnesses < 5 {
		t.Fatalf("go list gave %d product packages and %d harnesses: the module's layout was not read", products, harnesses)
	}
}
