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

// productHelpers are the packages under internal/ that the product
// imports: code of its own that should be no one else's API. Every other
// package under internal/ is for tests.
var productHelpers = map[string]bool{
	"github.com/caddy-xks/caddy-xks/internal/caddyctx": true,
}

// TestLayout holds the module's layering, as go list reads it:
//
//   - A test harness (a package under internal/ but the product helpers,
//     and hsm/hsmtest) is never a dependency of the product: code that
//     ships runs no test code.
//   - A product helper depends on no other package of the module: it sits
//     below everything that uses it.
//   - A harness depends on no command or tool: tests build no program.
//
// The programs under tools/ may use anything.
func TestLayout(t *testing.T) {
	const module = "github.com/caddy-xks/caddy-xks"
	out, err := exec.Command("go", "list", "-json", module+"/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []listedPackage
	for dec := json.NewDecoder(strings.NewReader(string(out))); ; {
		var p listedPackage
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	internal := func(p string) bool { return strings.HasPrefix(p, module+"/internal/") }
	harnesses := map[string]bool{module + "/hsm/hsmtest": true}
	for _, p := range pkgs {
		if internal(p.ImportPath) && !productHelpers[p.ImportPath] {
			harnesses[p.ImportPath] = true
		}
	}
	tool := func(p string) bool { return strings.HasPrefix(p, module+"/tools/") }
	command := func(p string) bool { return p == module || strings.HasPrefix(p, module+"/cmd/") }
	ours := func(p string) bool { return p == module || strings.HasPrefix(p, module+"/") }
	var products int
	for _, p := range pkgs {
		switch {
		case tool(p.ImportPath):
		case harnesses[p.ImportPath]:
			for _, d := range p.Deps {
				if command(d) || tool(d) {
					t.Errorf("the test harness %s depends on %s", p.ImportPath, d)
				}
			}
		case internal(p.ImportPath):
			for _, d := range p.Deps {
				if ours(d) {
					t.Errorf("the internal helper %s depends on %s, a package of the module", p.ImportPath, d)
				}
			}
		default:
			products++
			for _, d := range p.Deps {
				if harnesses[d] {
					t.Errorf("the product package %s depends on the test harness %s", p.ImportPath, d)
				}
			}
		}
	}
	if products < 10 || len(harnesses) < 6 {
		t.Fatalf("go list gave %d product packages and %d harnesses: the module's layout was not read", products, len(harnesses))
	}
}
