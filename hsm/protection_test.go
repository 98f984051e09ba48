package hsm

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/faultshim"
	"github.com/caddy-xks/caddy-xks/internal/vendorshim"
)

// openObserved opens a backend whose log the test reads.
func openObserved(t *testing.T, name string, cfg Config) (*Backend, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.InfoLevel)
	b, err := Open(name, cfg, zap.New(core))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b, logs
}

// logText is every line of logs, message and fields, as one string.
func logText(logs *observer.ObservedLogs) string {
	var s strings.Builder
	for _, e := range logs.All() {
		fmt.Fprintf(&s, "%s %s %v\n", e.Level, e.Message, e.ContextMap())
	}
	return s.String()
}

// TestExportableKeysAreRefused: a key made with pkcs11-tool --extractable
// (or without --sensitive) can be read or wrapped out of the token, and
// every ciphertext made with it decrypted offline. The backend refuses it
// for every operation, logs once why (never the key's value), and uses it
// only where allow_exportable_keys says so.
func TestExportableKeysAreRefused(t *testing.T) {
	tk := hsmtest.NewToken(t)
	keys := []struct {
		label string
		opt   hsmtest.KeyOption
		why   string
	}{
		{"readable-and-wrappable", hsmtest.Extractable(), "CKA_SENSITIVE is false"},
		{"readable", hsmtest.Protection(false, false), "CKA_SENSITIVE is false"},
		{"wrappable", hsmtest.Protection(true, true), "CKA_EXTRACTABLE is true"},
	}
	for _, k := range keys {
		tk.CreateKey(t, k.label, k.opt)
	}
	tk.CreateKey(t, "protected")
	b, logs := openObserved(t, "primary", configFor(tk))

	if _, err := b.Encrypt(bg, "protected", []byte("pt"), nil); err != nil {
		t.Fatalf("a sensitive, unextractable key: %v", err)
	}
	for _, k := range keys {
		t.Run(k.label, func(t *testing.T) {
			for range 2 {
				_, err := b.Encrypt(bg, k.label, []byte("pt"), []byte("aad"))
				if !errors.Is(err, ErrKeyExportable) || !strings.Contains(err.Error(), k.why) {
					t.Errorf("Encrypt: %v, want ErrKeyExportable saying %q", err, k.why)
				}
			}
			if _, err := b.Decrypt(bg, k.label, make([]byte, 12), []byte("ct"), make([]byte, 16), nil); !errors.Is(err, ErrKeyExportable) {
				t.Errorf("Decrypt: %v, want ErrKeyExportable", err)
			}
			if _, err := b.Metadata(bg, k.label); !errors.Is(err, ErrKeyExportable) {
				t.Errorf("Metadata: %v, want ErrKeyExportable", err)
			}
			refusals := logs.FilterMessageSnippet("refusing a key whose value can leave the HSM").FilterField(zap.String("key", k.label))
			if refusals.Len() == 0 {
				t.Fatalf("no log line says why %s is refused:\n%s", k.label, logText(logs))
			}
			if e := refusals.All()[0]; e.Level != zapcore.ErrorLevel || !strings.Contains(fmt.Sprint(e.ContextMap()["why"]), k.why) {
				t.Errorf("the refusal's log line: %s %v", e.Level, e.ContextMap())
			}
		})
	}
	// The value of the key that can be read never reaches the log, in any
	// form.
	text := logText(logs)
	if v := tk.KeyValue(t, keys[0].label); strings.Contains(text, hex.EncodeToString(v)) || bytes.Contains([]byte(text), v) {
		t.Errorf("the log holds the value of %s", keys[0].label)
	}

	// A second backend on the token that opts in uses them; the first still
	// refuses them, although the two share the token's key cache.
	cfg := configFor(tk)
	cfg.AllowExportableKeys = true
	allowing, allowLogs := openObserved(t, "conformance", cfg)
	if allowLogs.FilterMessageSnippet("allow_exportable_keys is set").FilterLevelExact(zapcore.WarnLevel).Len() != 1 {
		t.Errorf("opening a backend with allow_exportable_keys gives no warning:\n%s", logText(allowLogs))
	}
	for _, k := range keys {
		res, err := allowing.Encrypt(bg, k.label, []byte("pt"), nil)
		if err != nil {
			t.Fatalf("%s with allow_exportable_keys: %v", k.label, err)
		}
		if _, err := allowing.Decrypt(bg, k.label, res.IV, res.Ciphertext, res.Tag, nil); err != nil {
			t.Errorf("%s with allow_exportable_keys: decrypt: %v", k.label, err)
		}
		if _, err := b.Encrypt(bg, k.label, []byte("pt"), nil); !errors.Is(err, ErrKeyExportable) {
			t.Errorf("%s on the backend without allow_exportable_keys, after the other used it: %v", k.label, err)
		}
	}
	if allowLogs.FilterMessageSnippet("using a key whose value can leave the HSM").Len() == 0 {
		t.Errorf("no log line says that an exportable key is in use:\n%s", logText(allowLogs))
	}
}

// TestKeysAreListedWithTheirProtection: ListKeys reports the attributes that
// say who can obtain a key's value, for `caddy xks keys`.
func TestKeysAreListedWithTheirProtection(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "generated")
	tk.CreateKey(t, "extractable", hsmtest.Extractable())
	tk.ImportKey(t, "imported", bytes.Repeat([]byte{7}, 32))
	b := open(t, "primary", configFor(tk))
	keys, err := b.ListKeys(bg)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]KeyProtection{
		"generated":   {Sensitive: true, AlwaysSensitive: true, NeverExtractable: true, Private: true},
		"extractable": {Extractable: true, Private: true},
		"imported":    {Sensitive: true, Private: true},
	}
	for _, k := range keys {
		w, ok := want[k.Label]
		if !ok {
			t.Errorf("unexpected key %q", k.Label)
			continue
		}
		if fmt.Sprint(k.Protection) != fmt.Sprint(w) {
			t.Errorf("%s: protection %+v, want %+v", k.Label, k.Protection, w)
		}
		if (k.Protection.Exportable() != "") != (k.Label == "extractable") {
			t.Errorf("%s: Exportable() = %q", k.Label, k.Protection.Exportable())
		}
		delete(want, k.Label)
	}
	if len(want) > 0 {
		t.Errorf("not listed: %v", want)
	}
}

// TestImportedKeyIsServedWithAWarning: a key imported into the HSM (how one
// key gets into two HSMs) is sensitive and unextractable now, so it is
// served, but its value existed outside the HSM once, which the log says.
func TestImportedKeyIsServedWithAWarning(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.ImportKey(t, "imported", bytes.Repeat([]byte{9}, 32))
	b, logs := openObserved(t, "primary", configFor(tk))
	for range 3 {
		if _, err := b.Encrypt(bg, "imported", []byte("pt"), nil); err != nil {
			t.Fatalf("an imported key: %v", err)
		}
	}
	if n := logs.FilterMessageSnippet("may have existed outside the HSM").FilterField(zap.String("key", "imported")).Len(); n != 1 {
		t.Errorf("%d warnings about the imported key, want 1:\n%s", n, logText(logs))
	}
}

// TestNonPrivateKeysOnSoftHSM2AreWarnedOf: private_keys false on SoftHSM2
// (Caddyfile.example's value for nShield's accelerator slot, pointed at
// another module) would make keygen write keys unencrypted to the token
// directory; opening such a backend says so.
func TestNonPrivateKeysOnSoftHSM2AreWarnedOf(t *testing.T) {
	tk := hsmtest.NewToken(t)
	cfg := configFor(tk)
	cfg.PrivateKeys = new(bool)
	b, logs := openObserved(t, "primary", cfg)
	warnings := logs.FilterMessageSnippet("written unencrypted to the token directory").FilterLevelExact(zapcore.WarnLevel)
	if warnings.Len() != 1 {
		t.Errorf("%d warnings about private_keys false on SoftHSM2, want 1:\n%s", warnings.Len(), logText(logs))
	}
	if b.PrivateKeys() || !strings.Contains(b.NonPrivateKeyMeaning(), "SoftHSM2") {
		t.Errorf("PrivateKeys %v, NonPrivateKeyMeaning %q", b.PrivateKeys(), b.NonPrivateKeyMeaning())
	}
	// The default says nothing of it.
	_, quiet := openObserved(t, "private", configFor(hsmtest.NewToken(t)))
	if quiet.FilterMessageSnippet("private_keys is false").Len() != 0 {
		t.Errorf("a warning with private_keys true:\n%s", logText(quiet))
	}
}

// TestAPassingRefusalIsNoTokenWithoutPrivateKeys: a token that holds
// private keys (SoftHSM2) and refuses one private session key once, as a
// passing fault would, is never taken for one that cannot hold them:
// CanHoldPrivateKeys answers true, or an error, never false.
func TestAPassingRefusalIsNoTokenWithoutPrivateKeys(t *testing.T) {
	tk := hsmtest.NewToken(t)
	faults := faultshim.New(t, tk.Module)
	cfg := configFor(tk)
	cfg.Module = faults.Path
	b := open(t, "softhsm", cfg)
	for _, code := range []uint{pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, pkcs11.CKR_FUNCTION_FAILED, pkcs11.CKR_VENDOR_DEFINED + 1} {
		faults.Set(fmt.Sprintf("C_GenerateKey=%#x*1", code))
		if can, err := b.CanHoldPrivateKeys(bg); !can && err == nil {
			t.Errorf("one refusal (%#x) made SoftHSM2 a token that cannot hold private keys", code)
		}
	}
	faults.Set()
	if can, err := b.CanHoldPrivateKeys(bg); !can || err != nil {
		t.Fatalf("CanHoldPrivateKeys on SoftHSM2 = %v, %v", can, err)
	}
}

// TestPrivateKeysOnTheAcceleratorSlotSaysWhy: nShield's accelerator slot
// refuses private objects (Entrust documents that, not the CKR it answers
// with), so with private_keys true the backend does not open, and the error
// names the module's code and the setting that slot needs, whatever the
// code: the sign is that the same session key without CKA_PRIVATE is made.
// A token that refuses every session key is not told to change
// private_keys. CanHoldPrivateKeys, which caddy xks keygen asks, answers
// from the same sign.
func TestPrivateKeysOnTheAcceleratorSlotSaysWhy(t *testing.T) {
	tests := []struct {
		name    string
		code    uint
		ckr     string
		refuses bool // the fault shim refuses every C_GenerateKey too
		hint    bool
	}{
		{"the code the shim assumes", pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID", false, true},
		{"an inconsistent template", pkcs11.CKR_TEMPLATE_INCONSISTENT, "CKR_TEMPLATE_INCONSISTENT", false, true},
		{"a generic failure", pkcs11.CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED", false, true},
		{"a vendor-defined code", pkcs11.CKR_VENDOR_DEFINED + 1, "", false, true},
		{"a token that makes no session key at all", pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID", true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tk := hsmtest.NewToken(t)
			tk.CreateKey(t, "k1", hsmtest.Private(false))
			shim := vendorshim.New(t, vendorshim.NShield, tk.Module, tk.Label, vendorshim.NShieldPrivateRefusal(tt.code))
			module := shim.Path
			if tt.refuses {
				faults := faultshim.New(t, shim.Path)
				faults.Set(fmt.Sprintf("C_GenerateKey=%#x", tt.code))
				module = faults.Path
			}
			cfg := vendorConfig(tk, shim, module)
			cfg.PrivateKeys = nil // the default, true
			_, err := Open("nshield", cfg, zaptest.NewLogger(t))
			if err == nil {
				t.Fatal("private_keys true on the accelerator slot: the backend opened")
			}
			if hint := strings.HasSuffix(err.Error(), "needs private_keys false"); hint != tt.hint {
				t.Errorf("the error ends with the private_keys hint: %v, want %v: %v", hint, tt.hint, err)
			}
			if tt.ckr != "" && !strings.Contains(err.Error(), tt.ckr) {
				t.Errorf("the error does not name the module's %s: %v", tt.ckr, err)
			}
			if !tt.hint {
				return
			}
			// With private_keys false it opens, and caddy xks keygen's
			// question has the same answer.
			private := false
			cfg.PrivateKeys = &private
			b := open(t, "nshield", cfg)
			if can, err := b.CanHoldPrivateKeys(bg); can || err != nil {
				t.Errorf("CanHoldPrivateKeys = %v, %v on a token that refuses private objects", can, err)
			}
		})
	}
}
