package hsm

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap/zaptest"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/faultshim"
)

// TestNSSSoftokn runs the backend against NSS softokn, a PKCS#11
// implementation independent of SoftHSM2: C_Initialize needs its
// configuration in pReserved (init_args), and its answer to a GCM length
// query is too short, so only the pre-sized C_Encrypt works. It generates no
// IV, so iv auto must pick caller.
func TestNSSSoftokn(t *testing.T) {
	tk := hsmtest.NSS(t)
	// softokn never reveals the value of a key in its database: the key is
	// imported with a value the test knows, to check its ciphertexts
	// against crypto/cipher.
	value := bytes.Repeat([]byte{0x5a}, 32)
	tk.ImportKey(t, "nss-k1", value)
	cfg := configFor(tk)
	cfg.InitArgs = tk.InitArgs
	cfg.IVMode = "auto"
	b := open(t, "nss", cfg)
	if b.IVMode() != "caller" {
		t.Fatalf("iv auto picked %s on NSS softokn, want caller", b.IVMode())
	}

	block, err := aes.NewCipher(value)
	if err != nil {
		t.Fatal(err)
	}
	aead, _ := cipher.NewGCM(block)
	seen := make(map[string]bool)
	for _, size := range []int{0, 1, 4300} {
		pt := bytes.Repeat([]byte{'n'}, size)
		aad := bytes.Repeat([]byte{'a'}, 8192)
		res, err := b.Encrypt(bg, "nss-k1", pt, aad)
		if err != nil {
			t.Fatalf("Encrypt(%d): %v", size, err)
		}
		if len(res.IV) != 12 || len(res.Tag) != 16 || len(res.Ciphertext) != size || seen[string(res.IV)] {
			t.Fatalf("iv %x, tag %d bytes, ciphertext %d bytes for %d", res.IV, len(res.Tag), len(res.Ciphertext), size)
		}
		seen[string(res.IV)] = true
		if got := append(bytes.Clone(res.Ciphertext), res.Tag...); !bytes.Equal(got, aead.Seal(nil, res.IV, pt, aad)) {
			t.Fatalf("ciphertext of %d bytes differs from crypto/cipher's", size)
		}
		tag := bytes.Clone(res.Tag)
		tag[15] ^= 1
		if _, err := b.Decrypt(bg, "nss-k1", res.IV, res.Ciphertext, tag, aad); !errors.Is(err, ErrInvalidCiphertext) {
			t.Fatalf("Decrypt with a wrong tag: %v", err)
		}
		if back, err := b.Decrypt(bg, "nss-k1", res.IV, res.Ciphertext, res.Tag, aad); err != nil || !bytes.Equal(back, pt) {
			t.Fatalf("Decrypt(%d): %v", size, err)
		}
		if _, err := b.Decrypt(bg, "nss-k1", res.IV, res.Ciphertext, res.Tag, aad[1:]); !errors.Is(err, ErrInvalidCiphertext) {
			t.Fatalf("Decrypt with another AAD: %v", err)
		}
	}

	t.Run("wrong iv mode", func(t *testing.T) {
		c := cfg
		c.IVMode = "hsm"
		_, err := Open("nss-hsm", c, zaptest.NewLogger(t))
		if err == nil || !strings.Contains(err.Error(), "the self-test passes with iv caller") {
			t.Fatalf("iv hsm on NSS softokn: %v", err)
		}
	})

	t.Run("keygen", func(t *testing.T) {
		if _, err := b.GenerateKey(bg, "nss-generated"); err != nil {
			t.Fatal(err)
		}
		res, err := b.Encrypt(bg, "nss-generated", []byte("x"), nil)
		if err != nil {
			t.Fatal(err)
		}
		if pt, err := b.Decrypt(bg, "nss-generated", res.IV, res.Ciphertext, res.Tag, nil); err != nil || string(pt) != "x" {
			t.Fatalf("Decrypt: %q %v", pt, err)
		}
	})

	t.Run("faults", func(t *testing.T) {
		faults := faultshim.New(t, tk.Module)
		c := cfg
		c.Module = faults.Path
		c.CallTimeout = caddy.Duration(2 * time.Second)
		fb := open(t, "nss-faults", c)
		t.Cleanup(func() {
			faults.Set()
			waitFor(t, settle, func() bool { return !fb.tok.lib.down.Load() })
		})
		faults.Set("C_EncryptInit=0x30")
		if _, err := fb.Encrypt(bg, "nss-k1", []byte("x"), nil); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Encrypt on a failing device: %v", err)
		}
		faults.Set()
		waitFor(t, settle, func() bool {
			_, err := fb.Encrypt(bg, "nss-k1", []byte("x"), nil)
			return err == nil
		})
		faults.Set("C_Encrypt=hang")
		if _, err := fb.Encrypt(bg, "nss-k1", []byte("x"), nil); !errors.Is(err, ErrTimeout) {
			t.Fatalf("Encrypt on a hung HSM: %v", err)
		}
		faults.Set()
		waitFor(t, settle, func() bool { return fb.Stats().StuckCalls == 0 })
		before := faults.Calls("C_Encrypt")
		faults.Set("C_Encrypt=0xB3*1")
		if _, err := fb.Encrypt(bg, "nss-k1", []byte("x"), nil); err != nil {
			t.Fatalf("Encrypt with a session dying once: %v", err)
		}
		if faults.Calls("C_Encrypt")-before < 2 {
			t.Fatal("C_Encrypt was not retried")
		}
	})
}
