package xkscmd

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/xkshandler"
)

// openBackend opens the HSM backend named by --backend in the config given
// by --config, as the server does (hsm.OpenConfig).
func openBackend(fl caddycmd.Flags) (*hsm.Backend, *proxyConfig, error) {
	pc, err := loadProxyConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		return nil, nil, err
	}
	name, cfg, err := pc.backendConfig(fl.String("backend"))
	if err != nil {
		return nil, nil, err
	}
	b, err := hsm.OpenConfig(name, *cfg, zap.NewNop())
	return b, pc, err
}

// parseUsage reads --usage: a comma-separated subset of encrypt and decrypt,
// or none.
func parseUsage(s string) (hsm.Usage, error) {
	var u hsm.Usage
	if s == "none" {
		return u, nil
	}
	for part := range strings.SplitSeq(s, ",") {
		switch strings.TrimSpace(strings.ToLower(part)) {
		case "encrypt":
			u.Encrypt = true
		case "decrypt":
			u.Decrypt = true
		default:
			return u, fmt.Errorf("--usage %q: want encrypt, decrypt, encrypt,decrypt or none", s)
		}
	}
	return u, nil
}

func cmdKeygen(fl caddycmd.Flags, out io.Writer) (int, error) {
	label := fl.String("label")
	if label == "" {
		return caddy.ExitCodeFailedStartup, errors.New("--label is required: it becomes the external key id")
	}
	usage, err := parseUsage(fl.String("usage"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	b, ctx, done, err := openForKeygen(fl, time.Minute)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer done()

	md, err := b.GenerateKeyWithUsage(ctx, label, usage)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if err := proveKey(ctx, b, label, usage); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("key %q was created but failed its check: %w", label, err)
	}
	fmt.Fprintf(out, "created key %q in backend %s: %s %s %s\n", label, b.Name(), md.KeySpec, strings.Join(md.KeyUsage, ","), md.KeyStatus)
	if !b.PrivateKeys() {
		fmt.Fprintf(out, "warning: the key is not CKA_PRIVATE (private_keys false): %s\n", b.NonPrivateKeyMeaning())
	}
	return caddy.ExitCodeSuccess, nil
}

// openForKeygen opens the backend a key is made on, with a context of
// timeout, and refuses a backend that would make a key that is not private
// where one could be (refuseReadableKey). done closes both.
func openForKeygen(fl caddycmd.Flags, timeout time.Duration) (*hsm.Backend, context.Context, func(), error) {
	b, _, err := openBackend(fl)
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	done := func() {
		cancel()
		_ = b.Close()
	}
	if err := refuseReadableKey(ctx, b, fl.Bool("allow-non-private")); err != nil {
		done()
		return nil, nil, nil, err
	}
	return b, ctx, done, nil
}

// refuseReadableKey refuses to make a key that is not CKA_PRIVATE
// (private_keys false) on a token that can hold private keys: only one that
// cannot, such as nShield's accelerator slot, needs it, and on any other
// the key is visible and usable without a login, or on SoftHSM2 written to
// disk unencrypted. allow makes it anyway.
func refuseReadableKey(ctx context.Context, b *hsm.Backend, allow bool) error {
	if b.PrivateKeys() || allow {
		return nil
	}
	can, err := b.CanHoldPrivateKeys(ctx)
	if err != nil {
		return fmt.Errorf("backend %s has private_keys false; checking whether its token needs that: %w", b.Name(), err)
	}
	if !can {
		return nil
	}
	return fmt.Errorf("backend %s has private_keys false, but its token holds private keys, so it does not need keys that are not: %s; "+
		"set private_keys true, or pass --allow-non-private to make such a key anyway", b.Name(), b.NonPrivateKeyMeaning())
}

// proveKey reads the new key back and uses it: the metadata must be what
// KMS's CreateKey accepts for the usage asked for, and a key that can both
// encrypt and decrypt must round-trip a random message.
func proveKey(ctx context.Context, b *hsm.Backend, label string, usage hsm.Usage) error {
	md, err := b.Metadata(ctx, label)
	if err != nil {
		return err
	}
	if md.KeySpec != "AES_256" {
		return fmt.Errorf("key spec is %s, want AES_256", md.KeySpec)
	}
	for _, want := range []struct {
		name string
		on   bool
	}{{"ENCRYPT", usage.Encrypt}, {"DECRYPT", usage.Decrypt}} {
		if slices.Contains(md.KeyUsage, want.name) != want.on {
			return fmt.Errorf("key usage is %v, want ENCRYPT %v and DECRYPT %v", md.KeyUsage, usage.Encrypt, usage.Decrypt)
		}
	}
	if !usage.Encrypt || !usage.Decrypt {
		return nil
	}
	msg := make([]byte, 32)
	if _, err := rand.Read(msg); err != nil {
		return err
	}
	aad := []byte("caddy-xks keygen check")
	res, err := b.Encrypt(ctx, label, msg, aad)
	if err != nil {
		return fmt.Errorf("encrypting: %w", err)
	}
	pt, err := b.Decrypt(ctx, label, res.IV, res.Ciphertext, res.Tag, aad)
	if err != nil {
		return fmt.Errorf("decrypting: %w", err)
	}
	if !bytes.Equal(pt, msg) {
		return errors.New("decryption did not return the plaintext")
	}
	return nil
}

func cmdKeys(fl caddycmd.Flags, out io.Writer) (int, error) {
	b, pc, err := openBackend(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	keys, err := b.ListKeys(ctx)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if fl.Bool("labels") {
		for _, k := range keys {
			fmt.Fprintln(out, k.Label)
		}
		return caddy.ExitCodeSuccess, nil
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprint(tw, "LABEL\tKEY SPEC\tUSAGE\tSTATUS")
	for _, a := range protectionColumns {
		fmt.Fprint(tw, "\t", a.name)
	}
	fmt.Fprintln(tw)
	var notes []string
	nonPrivate := false
	for _, k := range keys {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s", k.Label, k.KeySpec, strings.Join(k.KeyUsage, ","), k.KeyStatus)
		for _, a := range protectionColumns {
			v := strconv.FormatBool(a.value(k.Protection))
			if slices.Contains(k.Protection.Unread, "CKA_"+a.name) {
				v = "?"
			}
			fmt.Fprint(tw, "\t", v)
		}
		fmt.Fprintln(tw)
		switch why := k.Protection.Exportable(); {
		case why != "" && b.AllowsExportableKeys():
			notes = append(notes, fmt.Sprintf("%s: served only because allow_exportable_keys is set: %s", k.Label, why))
		case why != "":
			notes = append(notes, fmt.Sprintf("%s: refused by backend %s (KeyNotFoundException): %s", k.Label, b.Name(), why))
		case k.Protection.EverExposed():
			notes = append(notes, fmt.Sprintf("%s: its value existed outside the HSM once (imported, or protected only after it was made): copies may exist", k.Label))
		}
		nonPrivate = nonPrivate || !k.Protection.Private
	}
	if err := tw.Flush(); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if nonPrivate {
		notes = append(notes, "keys that are not PRIVATE: "+b.NonPrivateKeyMeaning())
	}
	if len(notes) > 0 {
		fmt.Fprintln(out)
		for _, n := range notes {
			fmt.Fprintln(out, n)
		}
	}
	if err := printUsage(ctx, out, pc, b.Name(), keys); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return caddy.ExitCodeSuccess, nil
}

// printUsage prints, for each key store on the backend, each key version's
// Encrypts as the fleet counted them in Caddy's storage, the key store's
// limit, and the day the limit is reached at the fleet's current rate.
func printUsage(ctx context.Context, out io.Writer, pc *proxyConfig, backend string, keys []hsm.KeyInfo) error {
	var stores []*xkshandler.KeyStore
	for _, ks := range pc.keyStores {
		if slices.Contains(ks.HSM, backend) {
			stores = append(stores, ks)
		}
	}
	if len(stores) == 0 {
		return nil
	}
	storage, closeStorage, err := pc.openStorage()
	if err != nil {
		return err
	}
	defer closeStorage()
	fmt.Fprintln(out)
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY STORE\tKEY\tVERSION\tLABEL\tSTATE\tENCRYPTIONS\tLIMIT\tUSED\tLIMIT REACHED")
	now := time.Now()
	var notKeyIDs []string
	for _, ks := range stores {
		ids, invalid := usageKeys(ks, keys)
		notKeyIDs = append(notKeyIDs, invalid...)
		for _, key := range ids {
			for _, v := range ks.ConfiguredVersions(key) {
				n, _, rate, err := xkshandler.ReadUsage(ctx, storage, v.Label)
				if err != nil {
					return err
				}
				limit := ks.Limit()
				reached := "-" // no Encrypts now
				switch {
				case n >= limit:
					reached = "reached"
				case rate > 0:
					reached = now.Add(time.Duration(float64(limit-n) / rate * float64(time.Second))).UTC().Format(time.DateOnly)
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\t%d\t%.2f%%\t%s\n",
					ks.URIPath, key, v.Version, v.Label, v.State, n, limit, 100*float64(n)/float64(limit), reached)
			}
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(out, "\nENCRYPTIONS is the fleet's count, as each instance last wrote it (every usage_flush_interval); LIMIT REACHED is at the fleet's rate over the last interval.")
	for _, label := range slices.Compact(slices.Sorted(slices.Values(notKeyIDs))) {
		fmt.Fprintf(out, "%q: not a valid external key id, so KMS cannot use it and it has no usage\n", label)
	}
	return nil
}

// usageKeys are the external key ids of a key store: its keys, or with
// "*" the token's keys that are not a version of another. The labels on
// the token that are not valid external key ids are returned apart: whoever
// can write to the token can label a key "../..", which must never name a
// path in storage.
func usageKeys(ks *xkshandler.KeyStore, keys []hsm.KeyInfo) (ids, invalid []string) {
	if len(ks.Keys) != 1 || ks.Keys[0] != "*" {
		return ks.Keys, nil
	}
	versionLabels := map[string]bool{}
	for _, kv := range ks.Versions {
		for _, v := range kv.Versions {
			versionLabels[v.Label] = v.Version > 1
		}
	}
	for _, k := range keys {
		switch {
		case !xkshandler.ValidKeyID(k.Label):
			invalid = append(invalid, k.Label)
		case !versionLabels[k.Label]:
			ids = append(ids, k.Label)
		}
	}
	return ids, invalid
}

// protectionColumns are the columns of `caddy xks keys` that say who can
// obtain a key's value, named after their attributes (CKA_ omitted).
var protectionColumns = []struct {
	name  string
	value func(hsm.KeyProtection) bool
}{
	{"SENSITIVE", func(p hsm.KeyProtection) bool { return p.Sensitive }},
	{"EXTRACTABLE", func(p hsm.KeyProtection) bool { return p.Extractable }},
	{"ALWAYS_SENSITIVE", func(p hsm.KeyProtection) bool { return p.AlwaysSensitive }},
	{"NEVER_EXTRACTABLE", func(p hsm.KeyProtection) bool { return p.NeverExtractable }},
	{"PRIVATE", func(p hsm.KeyProtection) bool { return p.Private }},
}
