package xkscmd

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"

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

// writeSecretFile writes data into a new file readable by the owner only,
// then renames it to path. Writing into an existing file would keep its
// owner and any reader who holds it open, and would follow a symlink: a
// file or link another user made in advance would hand them the secret. The
// new file is made with O_EXCL (os.CreateTemp) in path's directory, and the
// rename replaces what path named, link or file, without touching it.
func writeSecretFile(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".new-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	fail := func(err error) error {
		_ = f.Close()
		_ = os.Remove(tmp)
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		return fail(err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("replacing %s: %w", path, err)
	}
	return nil
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
	want := fl.String("access-key-id")
	for _, c := range ks.Credentials {
		akid, err := c.ResolveAccessKeyID()
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		if want != "" && akid != want {
			continue
		}
		cred, err := c.Resolve()
		if err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
		out, err := json.MarshalIndent(consoleProxyConfig{
			XksProxyURIPath:                  ks.URIPath,
			XksProxyAuthenticationCredential: consoleCredential{AccessKeyID: cred.AccessKeyID, RawSecretAccessKey: cred.SecretAccessKey},
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
