package hsm

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/miekg/pkcs11"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
)

// Tests share one SoftHSM2 configuration per process (see package hsmtest)
// and run one at a time: they change package-level timing knobs.
func TestMain(m *testing.M) {
	reinitBackoffMin = 20 * time.Millisecond
	reinitBackoffMax = 200 * time.Millisecond
	os.Exit(hsmtest.Main(m))
}

// configFor is a backend config for the token with timeouts that no
// SoftHSM2 call on a loaded machine reaches; tests of a timeout set their
// own and make the HSM hang far beyond it.
func configFor(tk hsmtest.Token) Config {
	return Config{Module: tk.Module, Token: tk.Label, PIN: tk.PIN,
		CallTimeout: caddy.Duration(30 * time.Second), SessionWait: caddy.Duration(10 * time.Second)}
}

func open(t *testing.T, name string, cfg Config) *Backend {
	t.Helper()
	b, err := Open(name, cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func newBackend(t *testing.T, keys ...string) (*Backend, hsmtest.Token) {
	t.Helper()
	tk := hsmtest.NewToken(t)
	for _, k := range keys {
		tk.CreateKey(t, k)
	}
	return open(t, "primary", configFor(tk)), tk
}

var bg = context.Background()

func TestRoundTripMatchesGoGCM(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1", hsmtest.Extractable())
	// Go's AES-GCM needs the key's value, so the key is exportable, which
	// only a backend that allows it uses.
	cfg := configFor(tk)
	cfg.AllowExportableKeys = true
	b := open(t, "primary", cfg)
	if b.IVMode() != "caller" {
		t.Fatalf("auto iv mode on SoftHSM2 = %s, want caller", b.IVMode())
	}
	gcm, err := aes.NewCipher(tk.KeyValue(t, "k1"))
	if err != nil {
		t.Fatal(err)
	}
	aead, _ := cipher.NewGCM(gcm)
	for _, size := range []int{0, 1, 4300, 8192} {
		for _, aadSize := range []int{0, 1, 35, 4300, 8192} {
			pt := bytes.Repeat([]byte{byte(size)}, size) //nolint:gosec // any byte will do: the low bits of the size
			aad := bytes.Repeat([]byte{'a'}, aadSize)
			res, err := b.Encrypt(bg, "k1", pt, aad)
			if err != nil {
				t.Fatalf("Encrypt(%d, aad %d): %v", size, aadSize, err)
			}
			if len(res.IV) != 12 || len(res.Tag) != 16 || len(res.Ciphertext) != size {
				t.Fatalf("lengths iv %d tag %d ct %d for %d", len(res.IV), len(res.Tag), len(res.Ciphertext), size)
			}
			want := aead.Seal(nil, res.IV, pt, aad)
			if got := append(append([]byte{}, res.Ciphertext...), res.Tag...); !bytes.Equal(got, want) {
				t.Fatalf("ciphertext of %d bytes differs from crypto/cipher", size)
			}
			back, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, aad)
			if err != nil || !bytes.Equal(back, pt) {
				t.Fatalf("Decrypt(%d): %v", size, err)
			}
		}
	}
}

func TestDecryptRejectsTampering(t *testing.T) {
	b, _ := newBackend(t, "k1")
	aad := []byte("aad")
	res, err := b.Encrypt(bg, "k1", []byte("attack at dawn"), aad)
	if err != nil {
		t.Fatal(err)
	}
	flip := func(p []byte, i int) []byte {
		c := bytes.Clone(p)
		c[i] ^= 1
		return c
	}
	for _, tc := range []struct {
		name             string
		iv, ct, tag, aad []byte
	}{
		{"wrong aad", res.IV, res.Ciphertext, res.Tag, []byte("aae")},
		{"missing aad", res.IV, res.Ciphertext, res.Tag, nil},
		{"flipped ciphertext bit", res.IV, flip(res.Ciphertext, 3), res.Tag, aad},
		{"wrong tag", res.IV, res.Ciphertext, flip(res.Tag, 15), aad},
		{"wrong iv", flip(res.IV, 0), res.Ciphertext, res.Tag, aad},
		{"short tag", res.IV, res.Ciphertext, res.Tag[:12], aad},
		{"short iv", res.IV[:8], res.Ciphertext, res.Tag, aad},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := b.Decrypt(bg, "k1", tc.iv, tc.ct, tc.tag, tc.aad)
			if !errors.Is(err, ErrInvalidCiphertext) {
				t.Fatalf("got %v, want ErrInvalidCiphertext", err)
			}
		})
	}
	// The session that saw the failure is gone; the backend still works.
	if _, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, aad); err != nil {
		t.Fatal(err)
	}
}

func TestKeyChecks(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "no-decrypt", hsmtest.Usage(pkcs11.CKA_DECRYPT, false))
	tk.CreateKey(t, "no-encrypt", hsmtest.Usage(pkcs11.CKA_ENCRYPT, false))
	tk.CreateKey(t, "no-usage", hsmtest.Usage(pkcs11.CKA_ENCRYPT, false), hsmtest.Usage(pkcs11.CKA_DECRYPT, false))
	tk.CreateKey(t, "aes128", hsmtest.Bytes(16))
	tk.CreateKey(t, "dup")
	tk.CreateKey(t, "dup")
	tk.CreateKey(t, "generic", hsmtest.GenericSecret(32))
	b := open(t, "primary", configFor(tk))
	iv := bytes.Repeat([]byte{1}, 12)
	tag := make([]byte, 16)
	for _, tc := range []struct {
		label                string
		wantEnc, wantDecrypt error // nil: the operation is allowed
	}{
		{"no-decrypt", nil, ErrKeyUsage},
		{"no-encrypt", ErrKeyUsage, ErrInvalidCiphertext},
		{"no-usage", ErrKeyUsage, ErrKeyUsage},
		{"aes128", ErrKeyUsage, ErrKeyUsage},
		{"generic", ErrKeyUsage, ErrKeyUsage},
		{"unknown", ErrKeyNotFound, ErrKeyNotFound},
		{"dup", ErrDuplicateKey, ErrDuplicateKey},
	} {
		t.Run(tc.label, func(t *testing.T) {
			// The decrypt input is garbage: a key allowed to decrypt
			// answers invalid ciphertext, any other check comes first.
			_, err := b.Encrypt(bg, tc.label, []byte("x"), nil)
			if !errors.Is(err, tc.wantEnc) || (tc.wantEnc == nil) != (err == nil) {
				t.Fatalf("Encrypt: got %v, want %v", err, tc.wantEnc)
			}
			_, err = b.Decrypt(bg, tc.label, iv, []byte("x"), tag, nil)
			if !errors.Is(err, tc.wantDecrypt) {
				t.Fatalf("Decrypt: got %v, want %v", err, tc.wantDecrypt)
			}
			if !strings.Contains(err.Error(), `"`+tc.label+`"`) {
				t.Fatalf("error %q does not name the key", err)
			}
		})
	}
}

func TestMetadata(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "aes256")
	tk.CreateKey(t, "aes128", hsmtest.Bytes(16))
	tk.CreateKey(t, "generic", hsmtest.GenericSecret(32))
	tk.CreateKey(t, "des3", hsmtest.DES3())
	tk.CreateKey(t, "wrap", hsmtest.Usage(pkcs11.CKA_WRAP, true), hsmtest.Usage(pkcs11.CKA_DERIVE, true))
	tk.CreateKey(t, "no-usage", hsmtest.Usage(pkcs11.CKA_ENCRYPT, false), hsmtest.Usage(pkcs11.CKA_DECRYPT, false))
	tk.CreateKey(t, "narrowed", hsmtest.Modifiable())
	b := open(t, "primary", configFor(tk))
	if _, err := b.Encrypt(bg, "narrowed", []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	// A usage taken away after the handle was cached is seen by Metadata
	// (which reads afresh) and from then on by Encrypt.
	tk.SetBool(t, "narrowed", pkcs11.CKA_ENCRYPT, false)
	for _, tc := range []struct {
		label, spec, status, usage string
	}{
		{"aes256", "AES_256", "ENABLED", "ENCRYPT DECRYPT"},
		{"aes128", "AES_128", "ENABLED", "ENCRYPT DECRYPT"},
		{"generic", "GENERIC_SECRET_256", "ENABLED", "ENCRYPT DECRYPT"},
		{"des3", "DES3", "ENABLED", "ENCRYPT DECRYPT"},
		{"wrap", "AES_256", "ENABLED", "ENCRYPT DECRYPT WRAP DERIVE"},
		{"no-usage", "AES_256", "ENABLED", ""},
		{"narrowed", "AES_256", "ENABLED", "DECRYPT"},
	} {
		t.Run(tc.label, func(t *testing.T) {
			m, err := b.Metadata(bg, tc.label)
			if err != nil {
				t.Fatal(err)
			}
			if m.KeySpec != tc.spec || m.KeyStatus != tc.status || strings.Join(m.KeyUsage, " ") != tc.usage {
				t.Fatalf("got %+v, want %s %s [%s]", m, tc.spec, tc.status, tc.usage)
			}
		})
	}
	if _, err := b.Encrypt(bg, "narrowed", []byte("x"), nil); !errors.Is(err, ErrKeyUsage) {
		t.Fatalf("Encrypt with a key no longer allowed to encrypt: %v", err)
	}
	if _, err := b.Metadata(bg, "unknown"); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("Metadata(unknown): %v", err)
	}
}

func TestGenerateKey(t *testing.T) {
	b, tk := newBackend(t)
	meta, err := b.GenerateKey(bg, "xks-key-1")
	if err != nil {
		t.Fatal(err)
	}
	if meta.KeySpec != "AES_256" || meta.KeyStatus != "ENABLED" || strings.Join(meta.KeyUsage, " ") != "ENCRYPT DECRYPT" {
		t.Fatalf("metadata %+v", meta)
	}
	_, err = b.GenerateKey(bg, "xks-key-1")
	if !errors.Is(err, ErrKeyExists) || !strings.Contains(err.Error(), "xks-key-1") {
		t.Fatalf("second GenerateKey: %v", err)
	}
	for typ, want := range map[uint]bool{
		pkcs11.CKA_TOKEN: true, pkcs11.CKA_PRIVATE: true, pkcs11.CKA_SENSITIVE: true,
		pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_MODIFIABLE: false,
		pkcs11.CKA_ENCRYPT: true, pkcs11.CKA_DECRYPT: true,
		pkcs11.CKA_WRAP: false, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_SIGN: false,
		pkcs11.CKA_VERIFY: false, pkcs11.CKA_DERIVE: false,
		pkcs11.CKA_NEVER_EXTRACTABLE: true, pkcs11.CKA_ALWAYS_SENSITIVE: true,
	} {
		if got := attrBool(tk.Attribute(t, "xks-key-1", typ)); got != want {
			t.Errorf("attribute 0x%X = %v, want %v", typ, got, want)
		}
	}
	for _, tc := range []struct {
		label string
		usage Usage
		want  string
	}{
		{"encrypt-only", Usage{Encrypt: true}, "ENCRYPT"},
		{"decrypt-only", Usage{Decrypt: true}, "DECRYPT"},
		{"no-usage", Usage{}, ""},
	} {
		meta, err := b.GenerateKeyWithUsage(bg, tc.label, tc.usage)
		if err != nil || strings.Join(meta.KeyUsage, " ") != tc.want || meta.KeySpec != "AES_256" {
			t.Errorf("GenerateKeyWithUsage(%s): %+v, %v", tc.label, meta, err)
		}
		if attrBool(tk.Attribute(t, tc.label, pkcs11.CKA_EXTRACTABLE)) || !attrBool(tk.Attribute(t, tc.label, pkcs11.CKA_SENSITIVE)) {
			t.Errorf("%s: not sensitive or extractable", tc.label)
		}
	}
	if got := string(tk.Attribute(t, "xks-key-1", pkcs11.CKA_ID)); got != "xks-key-1" {
		t.Errorf("CKA_ID = %q", got)
	}
	if got := attrUint(tk.Attribute(t, "xks-key-1", pkcs11.CKA_VALUE_LEN)); got != 32 {
		t.Errorf("CKA_VALUE_LEN = %d", got)
	}
	res, err := b.Encrypt(bg, "xks-key-1", []byte("hello"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := b.Decrypt(bg, "xks-key-1", res.IV, res.Ciphertext, res.Tag, nil); err != nil || string(pt) != "hello" {
		t.Fatalf("Decrypt: %q %v", pt, err)
	}
	public := false
	cfg := configFor(tk)
	cfg.PrivateKeys = &public
	b2 := open(t, "public", cfg)
	if _, err := b2.GenerateKey(bg, "public-key"); err != nil {
		t.Fatal(err)
	}
	if attrBool(tk.Attribute(t, "public-key", pkcs11.CKA_PRIVATE)) {
		t.Error("private_keys false still made a private key")
	}
	keys, err := b.ListKeys(bg)
	if err != nil {
		t.Fatal(err)
	}
	labels := make([]string, 0, len(keys))
	for _, k := range keys {
		labels = append(labels, k.Label)
	}
	if strings.Join(labels, " ") != "decrypt-only encrypt-only no-usage public-key xks-key-1" || keys[4].KeySpec != "AES_256" {
		t.Fatalf("ListKeys = %+v", keys)
	}
}

func TestIVModes(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1")
	cfg := configFor(tk)
	cfg.IVMode = "caller"
	b := open(t, "caller", cfg)
	if _, err := b.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	// SoftHSM2 never generates an IV: given 12 zero bytes it encrypts with
	// the zero IV. The self-test must refuse that mode, and the error says
	// which mode works.
	for _, mode := range []string{"hsm", "hsm_appended"} {
		cfg.IVMode = mode
		_, err := Open(mode, cfg, zaptest.NewLogger(t))
		if err == nil {
			t.Fatalf("iv mode %s accepted on SoftHSM2", mode)
		}
		if !strings.Contains(err.Error(), "the self-test passes with iv caller") {
			t.Fatalf("iv mode %s refused without naming caller: %v", mode, err)
		}
		t.Logf("iv mode %s: %v", mode, err)
	}
	cfg.IVMode = "sometimes"
	if _, err := Open("bad", cfg, nil); err == nil {
		t.Fatal("unknown iv mode accepted")
	}
}

func TestIVRegistry(t *testing.T) {
	r := newIVRegistry(ivShards * 4)
	if err := r.observe(make([]byte, 12)); !errors.Is(err, errZeroIV) {
		t.Fatalf("zero iv: %v", err)
	}
	if err := r.observe(make([]byte, 5)); !errors.Is(err, errIVLength) {
		t.Fatalf("short iv: %v", err)
	}
	iv := func(i int) []byte { return []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, byte(i >> 8), byte(i)} } //nolint:gosec // the two low bytes of i, by design
	if err := r.observe(iv(1)); err != nil {
		t.Fatal(err)
	}
	if err := r.observe(iv(1)); !errors.Is(err, errRepeatedIV) {
		t.Fatalf("repeated iv: %v", err)
	}
	// A 16-byte IV that starts like a 12-byte one is another IV.
	if err := r.observe(append(iv(1), 9, 9, 9, 9)); err != nil {
		t.Fatal(err)
	}
	// The window forgets old IVs: 4 per shard here.
	for i := 2; i < 2000; i++ {
		if err := r.observe(iv(i)); err != nil {
			t.Fatalf("iv %d: %v", i, err)
		}
	}
	if err := r.observe(iv(1)); err != nil {
		t.Fatalf("iv outside the window: %v", err)
	}
}

func TestErrorText(t *testing.T) {
	e := &Error{Kind: ErrInvalidCiphertext, Op: "decrypt", Key: "k1", CKR: "CKR_GENERAL_ERROR", Err: pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)}
	if got, want := e.Error(), `hsm decrypt key "k1": invalid ciphertext (CKR_GENERAL_ERROR)`; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	if !errors.Is(e, ErrInvalidCiphertext) || errors.Is(e, ErrInternal) {
		t.Fatal("errors.Is does not follow Kind")
	}
	var pe pkcs11.Error
	if !errors.As(e, &pe) || pe != pkcs11.CKR_GENERAL_ERROR {
		t.Fatal("Unwrap lost the pkcs11 error")
	}
	for code, want := range map[uint]string{0x1B: "CKR_ACTION_PROHIBITED", 0xA0: "CKR_PIN_INCORRECT", 0x80000001: "CKR_VENDOR_DEFINED+0x1", 0x4242: "CKR_0x4242"} {
		if got := ckrName(code); got != want {
			t.Errorf("ckrName(0x%X) = %s, want %s", code, got, want)
		}
	}
}

func TestHealth(t *testing.T) {
	tk := hsmtest.NewToken(t)
	cfg := configFor(tk)
	cfg.HealthTTL = 0
	b := open(t, "primary", cfg)
	h := b.Health(bg)
	if h.Status != HealthActive || h.Manufacturer == "" || h.Model == "" || h.Serial == "" || !strings.Contains(h.Library, "SoftHSM") {
		t.Fatalf("health %+v", h)
	}
	if again := b.Health(bg); !again.CheckedAt.Equal(h.CheckedAt) {
		t.Fatal("health not cached within its ttl")
	}
	_ = b.Close() // the token's only backend: the token closes too
	if h := b.Health(bg); h.Status != HealthUnavailable {
		t.Fatalf("closed token health %+v", h)
	}
	if _, err := b.Encrypt(bg, "k", nil, nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Encrypt after Close: %v", err)
	}
}

func TestConfigValidate(t *testing.T) {
	slot := uint(3)
	for _, tc := range []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"module required", Config{Token: "t", PIN: "p"}, false},
		{"token identity required", Config{Module: "m", PIN: "p"}, false},
		{"pin required", Config{Module: "m", Token: "t"}, false},
		{"no_login needs no pin", Config{Module: "m", Token: "t", NoLogin: true}, true},
		{"slot id identifies", Config{Module: "m", SlotID: &slot, PIN: "p"}, true},
		{"serial identifies", Config{Module: "m", Serial: "s", PIN: "p"}, true},
		{"bad iv mode", Config{Module: "m", Token: "t", PIN: "p", IVMode: "zero"}, false},
		{"negative sessions", Config{Module: "m", Token: "t", PIN: "p", MaxSessions: -1}, false},
		{"health ttl of a minute", Config{Module: "m", Token: "t", PIN: "p", HealthTTL: caddy.Duration(time.Minute)}, true},
		{"health ttl over the spec's minute", Config{Module: "m", Token: "t", PIN: "p", HealthTTL: caddy.Duration(61 * time.Second)}, false},
		{"pin refused codes as numbers and names", Config{Module: "m", Token: "t", PIN: "p",
			PINRefusedCodes: []string{"0x80000001", "2147483650", "CKR_VENDOR_DEFINED+0x3", "CKR_FUNCTION_FAILED"}}, true},
		{"a pin refused code that is no code", Config{Module: "m", Token: "t", PIN: "p", PINRefusedCodes: []string{"wrong-pin"}}, false},
		{"CKR_OK as a pin refused code", Config{Module: "m", Token: "t", PIN: "p", PINRefusedCodes: []string{"0"}}, false},
		{"a pin refused code past 32 bits", Config{Module: "m", Token: "t", PIN: "p", PINRefusedCodes: []string{"0x100000000"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.cfg.Validate(); (err == nil) != tc.ok {
				t.Fatalf("Validate() = %v", err)
			}
		})
	}
	if _, err := Open("x", Config{Module: "/nonexistent/lib.so", Token: "t", PIN: "p"}, nil); err == nil {
		t.Fatal("opened a missing module")
	}
}

// TestSharedTokenWarnsOfUnappliedSettings: a config opening a token that is
// already open with another pool size or PIN is told they do not apply.
func TestSharedTokenWarnsOfUnappliedSettings(t *testing.T) {
	tk := hsmtest.NewToken(t)
	cfg := configFor(tk)
	open(t, "first", cfg)
	core, logs := observer.New(zapcore.WarnLevel)
	cfg.MaxSessions = 8
	b, err := Open("second", cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	entries := logs.FilterMessageSnippet("already open with other settings").All()
	if len(entries) != 1 || !strings.Contains(fmt.Sprint(entries[0].ContextMap()["settings_not_applied"]), "max_sessions") {
		t.Fatalf("warnings: %v", logs.All())
	}
}

// TestTokenSelection: a token is found by label, serial or slot id (all
// given must agree), and a token whose keys need no login is used without
// one.
func TestTokenSelection(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "private")
	tk.CreateKey(t, "public", hsmtest.Usage(pkcs11.CKA_PRIVATE, false))
	h := open(t, "by-label", configFor(tk)).Health(bg)
	serial := h.Serial
	slot := open(t, "by-label-again", configFor(tk)).tok.state.Load().slot
	other := hsmtest.NewToken(t)

	for _, tc := range []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"serial", Config{Module: tk.Module, Serial: serial, PIN: tk.PIN}, true},
		{"slot id", Config{Module: tk.Module, SlotID: &slot, PIN: tk.PIN}, true},
		{"label and serial agree", Config{Module: tk.Module, Token: tk.Label, Serial: serial, PIN: tk.PIN}, true},
		{"label of another token than the serial", Config{Module: tk.Module, Token: other.Label, Serial: serial, PIN: tk.PIN}, false},
		{"unknown label", Config{Module: tk.Module, Token: "no-such-token", PIN: tk.PIN}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := Open(tc.name, tc.cfg, zaptest.NewLogger(t))
			if (err == nil) != tc.ok {
				t.Fatalf("Open: %v", err)
			}
			if err != nil {
				return
			}
			defer b.Close()
			if _, err := b.Encrypt(bg, "private", []byte("x"), nil); err != nil {
				t.Fatalf("Encrypt: %v", err)
			}
		})
	}

	t.Run("no login", func(t *testing.T) {
		// Another token, so that no backend's login is shared: module
		// protection in nShield terms.
		tk2 := hsmtest.NewToken(t)
		tk2.CreateKey(t, "private")
		tk2.CreateKey(t, "public", hsmtest.Usage(pkcs11.CKA_PRIVATE, false))
		cfg := Config{Module: tk2.Module, Token: tk2.Label, NoLogin: true, PrivateKeys: new(bool)}
		b := open(t, "no-login", cfg)
		if _, err := b.Encrypt(bg, "public", []byte("x"), nil); err != nil {
			t.Fatalf("Encrypt with a public key and no login: %v", err)
		}
		if _, err := b.Encrypt(bg, "private", []byte("x"), nil); !errors.Is(err, ErrKeyNotFound) {
			t.Fatalf("a private key without login: %v", err)
		}
	})
}
