package vendorshim

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

func TestMain(m *testing.M) { os.Exit(hsmtest.Main(m)) }

// TestABIMatchesMiekgHeader compiles the shim against miekg/pkcs11's
// PKCS#11 headers, whose CK_MECHANISM, CK_GCM_PARAMS, CK_ATTRIBUTE,
// CK_TOKEN_INFO and CK_FUNCTION_LIST the shim's own declarations must match
// field for field (static assertions in the source).
func TestABIMatchesMiekgHeader(t *testing.T) {
	cc := testenv.CC(t)
	dir, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/miekg/pkcs11").Output()
	if err != nil {
		t.Fatalf("finding miekg/pkcs11: %v", err)
	}
	src := t.TempDir() + "/vendorshim.c"
	if err := os.WriteFile(src, source, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(cc, "-fsyntax-only", "-Wall", "-DVENDORSHIM_CHECK_ABI",
		"-I", strings.TrimSpace(string(dir)), src).CombinedOutput()
	if err != nil {
		t.Fatalf("the shim's PKCS#11 declarations differ from miekg/pkcs11's: %v\n%s", err, out)
	}
}

// raw opens the shim with miekg/pkcs11 directly: the path the proxy's
// backend takes for C_EncryptInit and the IV, here without the backend.
func raw(t *testing.T, p Personality, opts ...Option) (*pkcs11.Ctx, pkcs11.SessionHandle, pkcs11.ObjectHandle, cipher.Block) {
	t.Helper()
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1", hsmtest.Extractable(), hsmtest.Private(false))
	block, err := aes.NewCipher(tk.KeyValue(t, "k1"))
	if err != nil {
		t.Fatal(err)
	}
	shim := New(t, p, tk.Module, tk.Label, opts...)
	ctx := pkcs11.New(shim.Path)
	if ctx == nil {
		t.Fatal("loading the shim failed")
	}
	if err := ctx.Initialize(); err != nil && err != pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		t.Fatal(err)
	}
	slots, err := ctx.GetSlotList(true)
	if err != nil || len(slots) != 1 {
		t.Fatalf("slots %v %v: the shim shows one token", slots, err)
	}
	info, err := ctx.GetTokenInfo(slots[0])
	if err != nil || strings.TrimSpace(info.Label) != shim.TokenLabel(tk.Label) {
		t.Fatalf("token %q %v", info.Label, err)
	}
	sh, err := ctx.OpenSession(slots[0], pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ctx.CloseSession(sh) })
	if err := ctx.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, "k1")}); err != nil {
		t.Fatal(err)
	}
	keys, _, err := ctx.FindObjects(sh, 2)
	_ = ctx.FindObjectsFinal(sh)
	if err != nil || len(keys) != 1 {
		t.Fatalf("keys %v %v", keys, err)
	}
	return ctx, sh, keys[0], block
}

func gcm(params *pkcs11.GCMParams) []*pkcs11.Mechanism {
	return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
}

// TestWriteBackThroughMiekg: the nShield and CloudHSM personalities write the
// IV into the buffer miekg/pkcs11 gave C_EncryptInit, once C_Encrypt has
// produced the ciphertext, and GCMParams.IV() reads it back: the production
// path for those HSMs. A non-zero IV is refused.
func TestWriteBackThroughMiekg(t *testing.T) {
	for _, p := range []Personality{NShield, CloudHSM} {
		t.Run(p.Name, func(t *testing.T) {
			ctx, sh, key, block := raw(t, p)
			params := pkcs11.NewGCMParams(make([]byte, 12), []byte("aad"), 128)
			defer params.Free()
			if err := ctx.EncryptInit(sh, gcm(params), key); err != nil {
				t.Fatal(err)
			}
			if iv := params.IV(); !bytes.Equal(iv, make([]byte, 12)) {
				t.Fatalf("iv %x before C_Encrypt; the module writes it with the output", iv)
			}
			out, err := ctx.Encrypt(sh, []byte("plaintext"))
			if err != nil {
				t.Fatal(err)
			}
			iv := params.IV()
			if bytes.Equal(iv, make([]byte, 12)) {
				t.Fatal("no iv written back")
			}
			aead, _ := cipher.NewGCM(block)
			if !bytes.Equal(out, aead.Seal(nil, iv, []byte("plaintext"), []byte("aad"))) {
				t.Fatal("output differs from crypto/cipher's under the written-back iv")
			}
			refused := pkcs11.NewGCMParams(bytes.Repeat([]byte{1}, 12), nil, 128)
			defer refused.Free()
			if err := ctx.EncryptInit(sh, gcm(refused), key); err != pkcs11.Error(pkcs11.CKR_MECHANISM_PARAM_INVALID) {
				t.Fatalf("caller iv: %v, want CKR_MECHANISM_PARAM_INVALID", err)
			}
		})
	}
}

// TestLunaAppendsIV: both Luna personalities append a 16-byte IV after the
// tag when given no IV; the older firmware also takes a zeroed IV buffer,
// the newer refuses it.
func TestLunaAppendsIV(t *testing.T) {
	for _, tc := range []struct {
		p           Personality
		zeroedIVErr error
	}{
		{LunaIgnoresIV, nil},
		{LunaRefusesIV, pkcs11.Error(pkcs11.CKR_MECHANISM_PARAM_INVALID)},
	} {
		t.Run(tc.p.Name, func(t *testing.T) {
			ctx, sh, key, block := raw(t, tc.p)
			params := pkcs11.NewGCMParams(nil, []byte("aad"), 128)
			defer params.Free()
			if err := ctx.EncryptInit(sh, gcm(params), key); err != nil {
				t.Fatal(err)
			}
			out, err := ctx.Encrypt(sh, []byte("plaintext"))
			if err != nil {
				t.Fatal(err)
			}
			if len(out) != 9+16+16 {
				t.Fatalf("%d bytes, want ciphertext, tag and a 16-byte iv", len(out))
			}
			iv := out[9+16:]
			aead, _ := cipher.NewGCMWithNonceSize(block, 16)
			if !bytes.Equal(out[:9+16], aead.Seal(nil, iv, []byte("plaintext"), []byte("aad"))) {
				t.Fatal("output differs from crypto/cipher's under the appended iv")
			}
			zeroed := pkcs11.NewGCMParams(make([]byte, 12), nil, 128)
			defer zeroed.Free()
			err = ctx.EncryptInit(sh, gcm(zeroed), key)
			if err != tc.zeroedIVErr {
				t.Fatalf("zeroed iv buffer: %v, want %v", err, tc.zeroedIVErr)
			}
			if err == nil {
				if _, err := ctx.Encrypt(sh, []byte("x")); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestStrictLengthFailsMiekgsLengthQuery: miekg/pkcs11's Encrypt asks the
// output length with a NULL buffer; the strict-length personality answers
// it as NSS softokn does, too short, and the real call then fails. A
// buffer sized for ciphertext and tag works (what the backend does).
func TestStrictLengthFailsMiekgsLengthQuery(t *testing.T) {
	ctx, sh, key, _ := raw(t, StrictLength)
	params := pkcs11.NewGCMParams(bytes.Repeat([]byte{3}, 12), nil, 128)
	defer params.Free()
	if err := ctx.EncryptInit(sh, gcm(params), key); err != nil {
		t.Fatal(err)
	}
	if _, err := ctx.Encrypt(sh, []byte("plaintext")); err != pkcs11.Error(pkcs11.CKR_BUFFER_TOO_SMALL) {
		t.Fatalf("miekg Encrypt: %v, want CKR_BUFFER_TOO_SMALL", err)
	}
}

// TestLatencyLogCountsEachDelay: with VENDORSHIM_LATENCY_LOG the shim counts
// every delay it adds, once per C_Encrypt or C_Decrypt that produces output
// (miekg/pkcs11 makes a length query before each: not delayed, not counted),
// in the bucket of the time it slept, never below the latency asked for.
func TestLatencyLogCountsEachDelay(t *testing.T) {
	const (
		latency = 2 * time.Millisecond
		buckets = 1024 // SLEPT_BUCKETS
		step    = 50 * time.Microsecond
	)
	histogram := filepath.Join(t.TempDir(), "slept")
	ctx, sh, key, block := raw(t, NShield, Latency(latency), LatencyLog(histogram))
	aead, _ := cipher.NewGCM(block)
	const encrypts = 4
	var iv, out []byte
	for range encrypts {
		params := pkcs11.NewGCMParams(make([]byte, 12), nil, 128)
		if err := ctx.EncryptInit(sh, gcm(params), key); err != nil {
			t.Fatal(err)
		}
		var err error
		if out, err = ctx.Encrypt(sh, []byte("plaintext")); err != nil {
			t.Fatal(err)
		}
		iv = params.IV()
		params.Free()
	}
	params := pkcs11.NewGCMParams(iv, nil, 128)
	defer params.Free()
	if err := ctx.DecryptInit(sh, gcm(params), key); err != nil {
		t.Fatal(err)
	}
	if pt, err := ctx.Decrypt(sh, out); err != nil || string(pt) != "plaintext" {
		t.Fatalf("decrypt: %q %v", pt, err)
	}
	if _, err := aead.Open(nil, iv, out, nil); err != nil {
		t.Fatalf("the last ciphertext does not open with crypto/cipher: %v", err)
	}

	counts, err := os.ReadFile(histogram)
	if err != nil {
		t.Fatal(err)
	}
	if len(counts) != buckets*8 {
		t.Fatalf("histogram of %d bytes, want %d", len(counts), buckets*8)
	}
	var total uint64
	for b := range buckets {
		n := binary.NativeEndian.Uint64(counts[8*b:])
		if n > 0 && time.Duration(b+1)*step <= latency {
			t.Errorf("%d delays counted in [%v, %v), below the %v asked for", n, time.Duration(b)*step, time.Duration(b+1)*step, latency)
		}
		total += n
	}
	if total != encrypts+1 {
		t.Fatalf("%d delays counted, want %d: one per C_Encrypt or C_Decrypt with output", total, encrypts+1)
	}
}
