// Command xcaddyjson builds a custom caddy binary from a JSON build manifest
// (xcaddy.json). xcaddy itself reads no configuration file, but its Builder
// type carries JSON tags, so the manifest is simply a marshalled
// xcaddy.Builder plus the output path. Relative replacement paths and the
// output path are resolved against the manifest's directory.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/caddyserver/xcaddy"
)

type manifest struct {
	xcaddy.Builder
	Output string `json:"output,omitempty"`
}

func main() {
	file := flag.String("f", "xcaddy.json", "build manifest")
	flag.Parse()
	if err := build(*file); err != nil {
		fmt.Fprintln(os.Stderr, "xcaddyjson:", err)
		os.Exit(1)
	}
}

func build(file string) error {
	raw, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var m manifest
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields() // a typo in the manifest must fail, not be ignored
	if err := dec.Decode(&m); err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	base, err := filepath.Abs(filepath.Dir(file))
	if err != nil {
		return err
	}
	for i, r := range m.Replacements {
		if p := string(r.New); strings.HasPrefix(p, ".") {
			m.Replacements[i].New = xcaddy.ReplacementPath(filepath.Join(base, p))
		}
	}
	if m.Output == "" {
		m.Output = "caddy"
	}
	if !filepath.IsAbs(m.Output) {
		m.Output = filepath.Join(base, m.Output)
	}
	if v := os.Getenv("CADDY_VERSION"); v != "" {
		m.CaddyVersion = v
	}
	// PKCS#11 needs cgo; xcaddy turns cgo off unless CGO_ENABLED is exactly 1.
	if m.Cgo && os.Getenv("CGO_ENABLED") != "1" {
		return fmt.Errorf("%s asks for cgo: run with CGO_ENABLED=1", file)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	return m.Build(ctx, m.Output)
}
