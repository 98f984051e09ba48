package hsm

import (
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/miekg/pkcs11"
	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
)

// The benchmarks compare the Backend with a bare miekg/pkcs11 loop (one
// session per goroutine, cached key handle, fresh GCM parameters per call)
// on the same token and key, for 1 to 16 goroutines. Goroutines are started
// by hand: b.RunParallel starts a multiple of GOMAXPROCS, which cannot
// express one goroutine on a multi-core machine.

var benchGoroutines = []int{1, 2, 4, 8, 16}

type benchEnv struct {
	b   *Backend
	ctx *pkcs11.Ctx
	tk  hsmtest.Token
	key pkcs11.ObjectHandle
	// publicKey is a key like key that is not CKA_PRIVATE: SoftHSM2
	// decrypts a private token object's value with the token's key on every
	// C_EncryptInit, and stores one that is not private in the clear.
	publicKey pkcs11.ObjectHandle
}

var benchOnce struct {
	sync.Once
	env *benchEnv
}

func setupBench(b *testing.B) *benchEnv {
	benchOnce.Do(func() {
		tk := hsmtest.NewToken(b)
		tk.CreateKey(b, "bench")
		tk.CreateKey(b, "bench-not-private", hsmtest.Private(false))
		cfg := configFor(tk)
		// Benchmarks measure throughput, not deadlines: a busy machine's
		// tail latency must not abort a run.
		cfg.SessionWait = caddy.Duration(10 * time.Second)
		cfg.CallTimeout = caddy.Duration(10 * time.Second)
		be, err := Open("bench", cfg, zap.NewNop())
		if err != nil {
			b.Fatal(err)
		}
		p := pkcs11.New(tk.Module)
		if err := p.Initialize(); err != nil && !isCKR(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			b.Fatal(err)
		}
		env := &benchEnv{b: be, ctx: p, tk: tk}
		sh := env.session(b)
		find := func(label string) pkcs11.ObjectHandle {
			if err := p.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}); err != nil {
				b.Fatal(err)
			}
			hs, _, err := p.FindObjects(sh, 1)
			_ = p.FindObjectsFinal(sh)
			if err != nil || len(hs) != 1 {
				b.Fatalf("finding the bench key %q: %v", label, err)
			}
			return hs[0]
		}
		env.key, env.publicKey = find("bench"), find("bench-not-private")
		_ = p.CloseSession(sh)
		benchOnce.env = env
	})
	if benchOnce.env == nil {
		b.Skip("no bench token")
	}
	return benchOnce.env
}

func (e *benchEnv) session(b *testing.B) pkcs11.SessionHandle {
	slots, err := e.ctx.GetSlotList(true)
	if err != nil {
		b.Fatal(err)
	}
	for _, s := range slots {
		if ti, err := e.ctx.GetTokenInfo(s); err == nil && strings.TrimSpace(ti.Label) == e.tk.Label {
			sh, err := e.ctx.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
			if err != nil {
				b.Fatal(err)
			}
			// The backend's anchor session keeps the token logged in.
			return sh
		}
	}
	b.Fatal("bench token not found")
	return 0
}

// parallel runs b.N calls of op over g goroutines; setup runs once per
// goroutine before the timer starts.
func parallel(b *testing.B, g int, setup func() (op func() error, done func())) {
	var next atomic.Int64
	ops := make([]func() error, g)
	dones := make([]func(), g)
	for i := range ops {
		ops[i], dones[i] = setup()
	}
	defer func() {
		for _, d := range dones {
			if d != nil {
				d()
			}
		}
	}()
	var wg sync.WaitGroup
	var failed atomic.Value
	b.ResetTimer()
	for i := range g {
		wg.Add(1)
		go func(op func() error) {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				if err := op(); err != nil {
					failed.Store(fmt.Errorf("%w", err))
					return
				}
			}
		}(ops[i])
	}
	wg.Wait()
	b.StopTimer()
	if err := failed.Load(); err != nil {
		b.Fatal(err)
	}
}

func bareEncrypt(p *pkcs11.Ctx, sh pkcs11.SessionHandle, key pkcs11.ObjectHandle, pt, aad []byte) ([]byte, []byte, error) {
	iv := make([]byte, 12)
	_, _ = rand.Read(iv)
	params := pkcs11.NewGCMParams(iv, aad, 128)
	defer params.Free()
	if err := p.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, key); err != nil {
		return nil, nil, err
	}
	out, err := p.Encrypt(sh, pt)
	return iv, out, err
}

func bareDecrypt(p *pkcs11.Ctx, sh pkcs11.SessionHandle, key pkcs11.ObjectHandle, iv, in, aad []byte) error {
	params := pkcs11.NewGCMParams(iv, aad, 128)
	defer params.Free()
	if err := p.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, key); err != nil {
		return err
	}
	_, err := p.Decrypt(sh, in)
	return err
}

// BenchmarkEncryptNotPrivate is the bare loop of BenchmarkEncrypt on a key
// that is not CKA_PRIVATE: what SoftHSM2 costs a development token whose
// keys are made with private_keys false, against the private key of the
// production default.
func BenchmarkEncryptNotPrivate(b *testing.B) {
	env := setupBench(b)
	pt := make([]byte, 32)
	for _, k := range []struct {
		name string
		h    pkcs11.ObjectHandle
	}{{"private", env.key}, {"not-private", env.publicKey}} {
		b.Run(fmt.Sprintf("bare/%s/32B/g1", k.name), func(b *testing.B) {
			parallel(b, 1, func() (func() error, func()) {
				sh := env.session(b)
				return func() error {
					_, _, err := bareEncrypt(env.ctx, sh, k.h, pt, benchAAD)
					return err
				}, func() { _ = env.ctx.CloseSession(sh) }
			})
		})
	}
}

// benchAAD has the XKS full-AAD shape: 2-byte length, sha256, 1-byte length.
var benchAAD = make([]byte, 35)

func BenchmarkEncrypt(b *testing.B) {
	env := setupBench(b)
	for _, size := range []int{32, 4096} {
		pt := make([]byte, size)
		for _, g := range benchGoroutines {
			b.Run(fmt.Sprintf("bare/%dB/g%d", size, g), func(b *testing.B) {
				b.SetBytes(int64(size))
				parallel(b, g, func() (func() error, func()) {
					sh := env.session(b)
					return func() error {
						_, _, err := bareEncrypt(env.ctx, sh, env.key, pt, benchAAD)
						return err
					}, func() { _ = env.ctx.CloseSession(sh) }
				})
			})
			b.Run(fmt.Sprintf("backend/%dB/g%d", size, g), func(b *testing.B) {
				b.SetBytes(int64(size))
				parallel(b, g, func() (func() error, func()) {
					return func() error {
						_, err := env.b.Encrypt(bg, "bench", pt, benchAAD)
						return err
					}, nil
				})
			})
		}
	}
}

func BenchmarkDecrypt(b *testing.B) {
	env := setupBench(b)
	for _, size := range []int{32, 4096} {
		res, err := env.b.Encrypt(bg, "bench", make([]byte, size), benchAAD)
		if err != nil {
			b.Fatal(err)
		}
		in := append(append([]byte{}, res.Ciphertext...), res.Tag...)
		for _, g := range benchGoroutines {
			b.Run(fmt.Sprintf("bare/%dB/g%d", size, g), func(b *testing.B) {
				b.SetBytes(int64(size))
				parallel(b, g, func() (func() error, func()) {
					sh := env.session(b)
					return func() error {
						return bareDecrypt(env.ctx, sh, env.key, res.IV, in, benchAAD)
					}, func() { _ = env.ctx.CloseSession(sh) }
				})
			})
			b.Run(fmt.Sprintf("backend/%dB/g%d", size, g), func(b *testing.B) {
				b.SetBytes(int64(size))
				parallel(b, g, func() (func() error, func()) {
					return func() error {
						_, err := env.b.Decrypt(bg, "bench", res.IV, res.Ciphertext, res.Tag, benchAAD)
						return err
					}, nil
				})
			})
		}
	}
}

// BenchmarkInvalidCiphertext is a Decrypt whose tag does not authenticate,
// which SoftHSM2 answers CKR_GENERAL_ERROR: through the backend, which then
// checks the token before it answers ErrInvalidCiphertext, and the bare
// check alone (C_GetSessionInfo and C_GetTokenInfo).
func BenchmarkInvalidCiphertext(b *testing.B) {
	env := setupBench(b)
	res, err := env.b.Encrypt(bg, "bench", make([]byte, 32), benchAAD)
	if err != nil {
		b.Fatal(err)
	}
	badTag := append([]byte{}, res.Tag...)
	badTag[0] ^= 1
	for _, g := range []int{1, 4} {
		b.Run(fmt.Sprintf("check/g%d", g), func(b *testing.B) {
			parallel(b, g, func() (func() error, func()) {
				sh := env.session(b)
				info, err := env.ctx.GetSessionInfo(sh)
				if err != nil {
					b.Fatal(err)
				}
				return func() error {
					if _, err := env.ctx.GetSessionInfo(sh); err != nil {
						return err
					}
					_, err := env.ctx.GetTokenInfo(info.SlotID)
					return err
				}, func() { _ = env.ctx.CloseSession(sh) }
			})
		})
		b.Run(fmt.Sprintf("backend/32B/g%d", g), func(b *testing.B) {
			parallel(b, g, func() (func() error, func()) {
				return func() error {
					_, err := env.b.Decrypt(bg, "bench", res.IV, res.Ciphertext, badTag, benchAAD)
					if errors.Is(err, ErrInvalidCiphertext) {
						return nil
					}
					return fmt.Errorf("decrypting a bad tag: %w", err)
				}, nil
			})
		})
	}
}

// BenchmarkRun is what Backend.run adds to a call, without the HSM: a body
// that keeps its goroutine's CPU busy for about as long as SoftHSM2's
// C_EncryptInit and C_Encrypt take (40 µs), made through run, against the
// same body called directly. run hands every call to a goroutine of its
// own, so that a call that hangs in the HSM is answered at its deadline;
// that costs two wake-ups per call (the worker's start, the caller's
// answer), and while a P is idle, as it always is with one caller and
// GOMAXPROCS above 1, each wakes a thread on it. The gap is the backend's
// against the bare loop in BenchmarkEncrypt with one goroutine.
func BenchmarkRun(b *testing.B) {
	env := setupBench(b)
	const busy = 40 * time.Microsecond
	spin := func() {
		for end := time.Now().Add(busy); time.Now().Before(end); {
		}
	}
	b.Run("direct/g1", func(b *testing.B) {
		for b.Loop() {
			spin()
		}
	})
	b.Run("run/g1", func(b *testing.B) {
		for b.Loop() {
			if err := env.b.run(bg, "bench", "bench", env.b.callTimeout, func(*callSession) error {
				spin()
				return nil
			}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
