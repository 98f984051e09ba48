package xkscmd

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// nssKeygenConfig writes a Caddyfile whose one backend, main, is NSS
// softokn's key database token.
func nssKeygenConfig(t *testing.T) (hsmtest.Token, string) {
	t.Helper()
	tk := hsmtest.NSS(t)
	t.Setenv("XKSCMD_TEST_PIN_MAIN", tk.PIN)
	backend := proxytest.Backend{Name: "main", Module: tk.Module, Token: tk.Label, PINEnv: "XKSCMD_TEST_PIN_MAIN",
		Extra: fmt.Sprintf("\t\t\tinit_args %q\n", tk.InitArgs)}
	return tk, writeFile(t, t.TempDir(), "Caddyfile", "{\n\thsm {\n"+backend.Block()+"\t}\n}\n")
}

// TestEKMKeygenMakesKeysThatStayInTheHSM runs ekm-keygen for each kind of
// key on both tokens and checks what it printed, what it made and that the
// key works where the token can.
func TestEKMKeygenMakesKeysThatStayInTheHSM(t *testing.T) {
	soft, softConfig := keygenConfig(t)
	_, nssConfig := nssKeygenConfig(t)
	// NSS softokn's database lives as long as the process: names of their
	// own let another run (go test -count=N) make the keys again.
	nssAES, nssRSA := "ekmcmd-aes-"+rand.Text()[:8], "ekmcmd-rsa-"+rand.Text()[:8]
	tests := []struct {
		name   string
		config string
		args   []string
		// lines must each be in the output.
		lines []string
	}{
		{"an AES key on SoftHSM2, wrapped with C_WrapKey", softConfig, []string{"--name", "kek-aes", "--type", "aes"}, []string{
			`created AES-256 key "kek-aes" in backend main: sensitive, never extractable, not modifiable, restricted to 0x2109 (CKM_AES_KEY_WRAP) and 0x210A (CKM_AES_KEY_WRAP_PAD)`,
			"proven on this backend: A256KW, A256KWP wrap and unwrap",
			"az keyvault key create --hsm-name contoso-mhsm --name <name of the key in Azure> --external-key-id kek-aes",
		}},
		{"an RSA key on SoftHSM2, which has no OAEP with SHA-256", softConfig, []string{"--name", "kek-rsa", "--bits", "2048"}, []string{
			`created RSA-2048 key pair "kek-rsa" in backend main: sensitive, never extractable, not modifiable, restricted to 0x9 (CKM_RSA_PKCS_OAEP)`,
			"proven on this backend: RSA-OAEP wrap and unwrap",
			"not served by this backend: RSA-OAEP-256 (",
			"e: AQAB",
			"--external-key-id kek-rsa",
		}},
		{"an AES key on NSS softokn, wrapped with C_Encrypt", nssConfig, []string{"--name", nssAES, "--type", "aes"}, []string{
			`created AES-256 key "` + nssAES + `" in backend main: sensitive, never extractable, not modifiable (the token does not take CKA_ALLOWED_MECHANISMS)`,
			"proven on this backend: A256KW, A256KWP wrap and unwrap",
		}},
		{"an RSA-4096 key on NSS softokn", nssConfig, []string{"--name", nssRSA, "--type", "rsa", "--bits", "4096"}, []string{
			`created RSA-4096 key pair "` + nssRSA + `" in backend main`,
			"proven on this backend: RSA-OAEP, RSA-OAEP-256 wrap and unwrap",
			"e: AQAB",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := runCommand(t, "ekm-keygen", append([]string{"--config", tt.config, "--hsm-name", "contoso-mhsm"}, tt.args...)...)
			if err != nil {
				t.Fatalf("ekm-keygen: %v\n%s", err, out)
			}
			t.Logf("\n%s", out)
			for _, want := range tt.lines {
				if !strings.Contains(out, want) {
					t.Errorf("the output does not say %q", want)
				}
			}
		})
	}
	// What it made on SoftHSM2: an AES key that only wraps, on the path
	// the token wraps by, and only with the key wrap mechanisms.
	checkAttributes(t, soft, "kek-aes", []boolAttr{
		{"CKA_TOKEN", pkcs11.CKA_TOKEN, true},
		{"CKA_SENSITIVE", pkcs11.CKA_SENSITIVE, true},
		{"CKA_EXTRACTABLE", pkcs11.CKA_EXTRACTABLE, false},
		{"CKA_MODIFIABLE", pkcs11.CKA_MODIFIABLE, false},
		{"CKA_PRIVATE", pkcs11.CKA_PRIVATE, true},
		{"CKA_WRAP", pkcs11.CKA_WRAP, true},
		{"CKA_UNWRAP", pkcs11.CKA_UNWRAP, true},
		{"CKA_ENCRYPT", pkcs11.CKA_ENCRYPT, false},
		{"CKA_DECRYPT", pkcs11.CKA_DECRYPT, false},
	})
	mechs := soft.Attribute(t, "kek-aes", pkcs11.CKA_ALLOWED_MECHANISMS)
	if len(mechs) != 16 || binary.NativeEndian.Uint64(mechs) != 0x2109 || binary.NativeEndian.Uint64(mechs[8:]) != 0x210A {
		t.Errorf("CKA_ALLOWED_MECHANISMS of kek-aes is %x", mechs)
	}
}

func TestEKMKeygenRefusals(t *testing.T) {
	tk, config := keygenConfig(t)
	t.Setenv("XKSCMD_TEST_PIN_PUBLIC", tk.PIN)
	publicConfig := writeFile(t, t.TempDir(), "Caddyfile", "{\n\thsm {\n"+
		proxytest.Backend{Name: "main", Module: tk.Module, Token: tk.Label, PINEnv: "XKSCMD_TEST_PIN_PUBLIC", Extra: "\t\t\tprivate_keys false"}.Block()+"\t}\n}\n")
	if out, err := runCommand(t, "ekm-keygen", "--config", config, "--name", "taken", "--type", "aes"); err != nil {
		t.Fatalf("ekm-keygen: %v\n%s", err, out)
	}
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"a name Azure does not take", []string{"--name", "kek_1"}, `--name "kek_1": the key name is Azure's external key id`},
		{"no name", nil, `--name "": the key name`},
		{"a name of 65 characters", []string{"--name", strings.Repeat("k", 65)}, "1 to 64 characters"},
		{"another type", []string{"--name", "k", "--type", "ec"}, `--type "ec": want aes or rsa`},
		{"an RSA size Azure does not take", []string{"--name", "k", "--bits", "1024"}, "2048, 3072 or 4096 bits"},
		{"an AES size other than 256", []string{"--name", "k", "--type", "aes", "--bits", "128"}, "256 bits"},
		{"a name a key has", []string{"--name", "taken", "--type", "rsa"}, "key label already exists"},
		{"a key that is not private on a token that holds private keys", []string{"--name", "k", "--config", publicConfig},
			"private_keys false, but its token holds private keys"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			out, err := runCommand(t, "ekm-keygen", append([]string{"--config", config}, tt.args...)...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want one saying %q", err, tt.want)
			}
			if out != "" {
				t.Errorf("printed %q", out)
			}
		})
	}
}
