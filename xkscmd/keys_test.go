package xkscmd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
	"github.com/caddy-xks/caddy-xks/internal/vendorshim"
)

// keygenConfig writes a Caddyfile whose hsm global option has one backend,
// main, on a new token.
func keygenConfig(t *testing.T) (hsmtest.Token, string) {
	t.Helper()
	tk := hsmtest.NewToken(t)
	config := writeFile(t, t.TempDir(), "Caddyfile", "{\n\thsm {\n"+backendBlock(t, "main", tk)+"\t}\n}\n")
	return tk, config
}

// keyRow is the row of `caddy xks keys` for label.
func keyRow(t *testing.T, config, label string) string {
	t.Helper()
	out, err := runCommand(t, "keys", "--config", config)
	if err != nil {
		t.Fatalf("keys: %v", err)
	}
	for line := range strings.SplitSeq(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == label {
			return strings.Join(f, " ")
		}
	}
	t.Fatalf("keys lists no %q:\n%s", label, out)
	return ""
}

// protection is the protection columns of `caddy xks keys`: SENSITIVE,
// EXTRACTABLE, ALWAYS_SENSITIVE, NEVER_EXTRACTABLE and PRIVATE.
func protection(attrs ...bool) string {
	cells := make([]string, len(attrs))
	for i, a := range attrs {
		cells[i] = strconv.FormatBool(a)
	}
	return strings.Join(cells, " ")
}

// generated is the protection of a key keygen made: sensitive and never
// extractable since it was made, and private.
var generated = protection(true, false, true, true, true)

func boolAttribute(t *testing.T, tk hsmtest.Token, label string, typ uint) bool {
	t.Helper()
	return bytes.Equal(tk.Attribute(t, label, typ), []byte{1})
}

// boolAttr is a boolean attribute a key must have, and its value.
type boolAttr struct {
	name string
	typ  uint
	want bool
}

// checkAttributes checks the boolean attributes of the key labelled label.
func checkAttributes(t *testing.T, tk hsmtest.Token, label string, attrs []boolAttr) {
	t.Helper()
	for _, a := range attrs {
		if got := boolAttribute(t, tk, label, a.typ); got != a.want {
			t.Errorf("%s of %s is %v, want %v", a.name, label, got, a.want)
		}
	}
}

func TestKeygenCreatesASecureKey(t *testing.T) {
	tk, config := keygenConfig(t)
	out, err := runCommand(t, "keygen", "--config", config, "--label", "xks-key-1")
	if err != nil {
		t.Fatalf("keygen: %v", err)
	}
	if want := `created key "xks-key-1" in backend main: AES_256 ENCRYPT,DECRYPT ENABLED`; strings.TrimSpace(out) != want {
		t.Errorf("keygen printed %q, want %q", out, want)
	}
	if got, want := keyRow(t, config, "xks-key-1"), "xks-key-1 AES_256 ENCRYPT,DECRYPT ENABLED "+generated; got != want {
		t.Errorf("keys: %q, want %q", got, want)
	}
	checkAttributes(t, tk, "xks-key-1", []boolAttr{
		{"CKA_TOKEN", pkcs11.CKA_TOKEN, true},
		{"CKA_SENSITIVE", pkcs11.CKA_SENSITIVE, true},
		{"CKA_EXTRACTABLE", pkcs11.CKA_EXTRACTABLE, false},
		{"CKA_MODIFIABLE", pkcs11.CKA_MODIFIABLE, false},
		{"CKA_PRIVATE", pkcs11.CKA_PRIVATE, true},
		{"CKA_ENCRYPT", pkcs11.CKA_ENCRYPT, true},
		{"CKA_DECRYPT", pkcs11.CKA_DECRYPT, true},
		{"CKA_WRAP", pkcs11.CKA_WRAP, false},
		{"CKA_UNWRAP", pkcs11.CKA_UNWRAP, false},
	})
	if n := binary.NativeEndian.Uint64(tk.Attribute(t, "xks-key-1", pkcs11.CKA_VALUE_LEN)); n != 32 {
		t.Errorf("CKA_VALUE_LEN is %d, want 32", n)
	}
	if id := tk.Attribute(t, "xks-key-1", pkcs11.CKA_ID); string(id) != "xks-key-1" {
		t.Errorf("CKA_ID is %q, want the label", id)
	}
}

func TestKeygenRefusesAnExistingLabel(t *testing.T) {
	_, config := keygenConfig(t)
	if _, err := runCommand(t, "keygen", "--config", config, "--label", "xks-key-1"); err != nil {
		t.Fatalf("keygen: %v", err)
	}
	out, err := runCommand(t, "keygen", "--config", config, "--label", "xks-key-1")
	if err == nil || !strings.Contains(err.Error(), "xks-key-1") {
		t.Errorf("second keygen of xks-key-1: error %v, want one naming the label", err)
	}
	if out != "" {
		t.Errorf("second keygen printed %q", out)
	}
	if labels, _ := runCommand(t, "keys", "--config", config, "--labels"); labels != "xks-key-1\n" {
		t.Errorf("keys --labels after a refused duplicate: %q", labels)
	}
}

func TestKeygenUsage(t *testing.T) {
	tk, config := keygenConfig(t)
	for _, tc := range []struct {
		usage, label, row string
		encrypt, decrypt  bool
	}{
		{"encrypt", "enc-only", "enc-only AES_256 ENCRYPT ENABLED " + generated, true, false},
		{"decrypt", "dec-only", "dec-only AES_256 DECRYPT ENABLED " + generated, false, true},
		{"none", "no-usage", "no-usage AES_256 ENABLED " + generated, false, false},
	} {
		t.Run(tc.usage, func(t *testing.T) {
			if _, err := runCommand(t, "keygen", "--config", config, "--label", tc.label, "--usage", tc.usage); err != nil {
				t.Fatalf("keygen --usage %s: %v", tc.usage, err)
			}
			if got := keyRow(t, config, tc.label); got != tc.row {
				t.Errorf("keys: %q, want %q", got, tc.row)
			}
			if got := boolAttribute(t, tk, tc.label, pkcs11.CKA_ENCRYPT); got != tc.encrypt {
				t.Errorf("CKA_ENCRYPT is %v, want %v", got, tc.encrypt)
			}
			if got := boolAttribute(t, tk, tc.label, pkcs11.CKA_DECRYPT); got != tc.decrypt {
				t.Errorf("CKA_DECRYPT is %v, want %v", got, tc.decrypt)
			}
		})
	}
	if _, err := runCommand(t, "keygen", "--config", config, "--label", "bad", "--usage", "sign"); err == nil {
		t.Error("keygen --usage sign succeeded")
	}
}

func TestKeygenNeedsALabel(t *testing.T) {
	_, config := keygenConfig(t)
	if _, err := runCommand(t, "keygen", "--config", config); err == nil || !strings.Contains(err.Error(), "--label") {
		t.Errorf("keygen without --label: error %v, want one naming --label", err)
	}
}

func TestKeysLabels(t *testing.T) {
	_, config := keygenConfig(t)
	want := make([]string, 0, 3)
	for i := range 3 {
		label := fmt.Sprintf("xks-key-%d", i)
		if _, err := runCommand(t, "keygen", "--config", config, "--label", label); err != nil {
			t.Fatalf("keygen %s: %v", label, err)
		}
		want = append(want, label)
	}
	out, err := runCommand(t, "keys", "--config", config, "--labels")
	if err != nil {
		t.Fatalf("keys --labels: %v", err)
	}
	got := strings.Fields(out)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("keys --labels printed %q, want the labels %q one per line", out, want)
	}
}

// TestKeysShowsWhoCanObtainAKey: `caddy xks keys` shows the attributes that
// say whether a key's value can leave the HSM, and says which keys the
// backend refuses for it, and which were imported.
func TestKeysShowsWhoCanObtainAKey(t *testing.T) {
	tk, config := keygenConfig(t)
	tk.CreateKey(t, "secure")
	tk.CreateKey(t, "exportable", hsmtest.Extractable())
	tk.ImportKey(t, "imported", bytes.Repeat([]byte{3}, 32))
	out, err := runCommand(t, "keys", "--config", config)
	if err != nil {
		t.Fatalf("keys: %v", err)
	}
	header := strings.Fields(strings.SplitN(out, "\n", 2)[0])
	if want := "LABEL KEY SPEC USAGE STATUS SENSITIVE EXTRACTABLE ALWAYS_SENSITIVE NEVER_EXTRACTABLE PRIVATE"; strings.Join(header, " ") != want {
		t.Errorf("header %q, want %q", strings.Join(header, " "), want)
	}
	for label, want := range map[string]string{
		"secure":     "secure AES_256 ENCRYPT,DECRYPT ENABLED " + generated,
		"exportable": "exportable AES_256 ENCRYPT,DECRYPT ENABLED " + protection(false, true, false, false, true),
		"imported":   "imported AES_256 ENCRYPT,DECRYPT ENABLED " + protection(true, false, false, false, true),
	} {
		if got := keyRow(t, config, label); got != want {
			t.Errorf("keys: %q, want %q", got, want)
		}
	}
	for _, want := range []string{
		"exportable: refused by backend main (KeyNotFoundException): CKA_SENSITIVE is false",
		"CKA_EXTRACTABLE is true, so its value can be wrapped out of the HSM",
		"imported: its value existed outside the HSM once",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("keys does not say %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "secure:") {
		t.Errorf("keys has a note about the secure key:\n%s", out)
	}
}

// TestKeygenRefusesANonPrivateKeyWhereItIsReadable: with private_keys false
// (which only a token that cannot hold private keys needs, such as the
// nShield accelerator slot), keygen on SoftHSM2, which stores such a key
// unencrypted, makes no key and says why; told to with --allow-non-private
// it makes one, and keygen and keys say what it means.
func TestKeygenRefusesANonPrivateKeyWhereItIsReadable(t *testing.T) {
	tk := hsmtest.NewToken(t)
	t.Setenv("XKSCMD_TEST_PIN_PUBLIC", tk.PIN)
	block := proxytest.Backend{Name: "main", Module: tk.Module, Token: tk.Label, PINEnv: "XKSCMD_TEST_PIN_PUBLIC", Extra: "\t\t\tprivate_keys false"}.Block()
	config := writeFile(t, t.TempDir(), "Caddyfile", "{\n\thsm {\n"+block+"\t}\n}\n")
	out, err := runCommand(t, "keygen", "--config", config, "--label", "public-key")
	if err == nil {
		t.Fatalf("keygen made a key that is not private on SoftHSM2:\n%s", out)
	}
	for _, want := range []string{"private_keys false", "holds private keys", "written unencrypted to the token directory", "--allow-non-private"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("keygen's refusal does not say %q: %v", want, err)
		}
	}
	if labels, err := runCommand(t, "keys", "--config", config, "--labels"); err != nil || strings.TrimSpace(labels) != "" {
		t.Fatalf("the token holds keys after the refusal: %q %v", labels, err)
	}

	out, err = runCommand(t, "keygen", "--config", config, "--label", "public-key", "--allow-non-private")
	if err != nil {
		t.Fatalf("keygen --allow-non-private: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || lines[0] != `created key "public-key" in backend main: AES_256 ENCRYPT,DECRYPT ENABLED` {
		t.Fatalf("keygen printed %q", out)
	}
	for _, want := range []string{"not CKA_PRIVATE", "written unencrypted to the token directory", "private_keys true"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("keygen's warning does not say %q: %q", want, lines[1])
		}
	}
	if boolAttribute(t, tk, "public-key", pkcs11.CKA_PRIVATE) {
		t.Error("private_keys false made a private key")
	}
	keys, err := runCommand(t, "keys", "--config", config)
	if err != nil || !strings.Contains(keys, "keys that are not PRIVATE: SoftHSM2 encrypts only private objects") {
		t.Errorf("keys does not say what the key that is not private means: %v\n%s", err, keys)
	}
}

// TestKeygenOnNShieldSaysWhatANonPrivateKeyMeans: on nShield's accelerator
// slot, which needs private_keys false, keygen says what such a key is
// there: module-protected, usable by any process of the Security World.
func TestKeygenOnNShieldSaysWhatANonPrivateKeyMeans(t *testing.T) {
	tk := hsmtest.NewToken(t)
	shim := vendorshim.New(t, vendorshim.NShield, tk.Module, tk.Label)
	t.Setenv("XKSCMD_TEST_PIN_NSHIELD", tk.PIN)
	block := proxytest.Backend{Name: "main", Module: shim.Path, Token: shim.TokenLabel(tk.Label), PINEnv: "XKSCMD_TEST_PIN_NSHIELD",
		IV: vendorshim.NShield.IVMode, Extra: "\t\t\tprivate_keys false"}.Block()
	config := writeFile(t, t.TempDir(), "Caddyfile", "{\n\thsm {\n"+block+"\t}\n}\n")
	out, err := runCommand(t, "keygen", "--config", config, "--label", "xks-key-1")
	if err != nil {
		t.Fatalf("keygen: %v", err)
	}
	for _, want := range []string{"not CKA_PRIVATE", "module-protected", "nfast", "softcard"} {
		if !strings.Contains(out, want) {
			t.Errorf("keygen on the accelerator slot does not say %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "unencrypted") {
		t.Errorf("keygen on nShield speaks of SoftHSM2's storage:\n%s", out)
	}
}
