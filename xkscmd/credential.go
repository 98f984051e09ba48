package xkscmd

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-xks/caddy-xks/sigv4auth"
)

func cmdCredential(fl caddycmd.Flags, out io.Writer) (int, error) {
	c, err := sigv4auth.NewCredential()
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if file := fl.String("secret-file"); file != "" {
		if err := writeSecretFile(file, []byte(c.SecretAccessKey+"\n")); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		fmt.Fprintln(out, c.AccessKeyID)
		return caddy.ExitCodeSuccess, nil
	}
	fmt.Fprintf(out, "access_key_id     %s\nsecret_access_key %s\n", c.AccessKeyID, c.SecretAccessKey)
	return caddy.ExitCodeSuccess, nil
}

// writeSecretFile writes data readable by the owner only.
func writeSecretFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := f.Chmod(0o600); err != nil { // an existing file keeps its mode otherwise
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// consoleProxyConfig is the file the KMS console imports when an external
// key store is created or edited.
type consoleProxyConfig struct {
	XksProxyURIPath                  string            `json:"XksProxyUriPath"`
	XksProxyAuthenticationCredential consoleCredential `json:"XksProxyAuthenticationCredential"`
}

type consoleCredential struct {
	AccessKeyID        string `json:"AccessKeyId"`
	RawSecretAccessKey string `json:"RawSecretAccessKey"`
}

func cmdProxyConfig(fl caddycmd.Flags, w io.Writer) (int, error) {
	pc, err := loadProxyConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	ks, err := pc.keyStore(fl.String("key-store"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	repl := caddy.NewReplacer()
	want := fl.String("access-key-id")
	for _, c := range ks.Credentials {
		akid, err := repl.ReplaceOrErr(c.AccessKeyID, true, true)
		if err != nil {
			return caddy.ExitCodeFailedStartup, fmt.Errorf("access key id %s: %w", c.AccessKeyID, err)
		}
		if want != "" && akid != want {
			continue
		}
		secret, err := repl.ReplaceOrErr(c.SecretAccessKey, true, true)
		if err != nil {
			return caddy.ExitCodeFailedStartup, fmt.Errorf("secret access key of %s: %w", akid, err)
		}
		out, err := json.MarshalIndent(consoleProxyConfig{
			XksProxyURIPath:                  ks.URIPath,
			XksProxyAuthenticationCredential: consoleCredential{AccessKeyID: akid, RawSecretAccessKey: secret},
		}, "", "  ")
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		out = append(out, '\n')
		if file := fl.String("output"); file != "" {
			if err := writeSecretFile(file, out); err != nil {
				return caddy.ExitCodeFailedStartup, err
			}
			return caddy.ExitCodeSuccess, nil
		}
		_, err = w.Write(out)
		return caddy.ExitCodeSuccess, err
	}
	return caddy.ExitCodeFailedStartup, fmt.Errorf("key store %s has no credential %q", ks.URIPath, want)
}
