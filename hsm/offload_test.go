package hsm

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
	"github.com/caddy-xks/caddy-xks/internal/vendorshim"
)

// Crypt calls of a module that answers in milliseconds are made on lanes
// (crypt.go), so that a goroutine waiting for the HSM holds no P.

func TestCallTimesTellLocalFromNetworkModules(t *testing.T) {
	var c callTimes
	window := func(d time.Duration, n int, offloaded bool) {
		for range n {
			c.observe(d, offloaded)
		}
	}
	window(6*time.Microsecond, callWindow, false)
	if c.slow() {
		t.Fatalf("6 µs calls counted slow (shortest %s)", time.Duration(c.floor.Load()))
	}
	// A window of network round trips moves the next calls to lanes...
	window(2*time.Millisecond, callWindow, false)
	if !c.slow() {
		t.Fatalf("2 ms calls did not count slow (shortest %s)", time.Duration(c.floor.Load()))
	}
	// ...but not a window in which a local token's calls waited for one
	// another, if one of them was answered at once...
	window(2*time.Millisecond, callWindow-1, true)
	window(6*time.Microsecond, 1, true)
	if c.slow() {
		t.Fatalf("a window with one 6 µs call counted slow (shortest %s)", time.Duration(c.floor.Load()))
	}
	// ...nor one slow call among fast ones, such as a hang that ended.
	window(6*time.Microsecond, callWindow-1, false)
	window(10*time.Second, 1, false)
	if c.slow() {
		t.Fatalf("one hung call made the module slow (shortest %s)", time.Duration(c.floor.Load()))
	}
	if got := c.offloaded.Load(); got != callWindow {
		t.Fatalf("offloaded %d, want %d", got, callWindow)
	}
}

// TestNetworkHSMCallsRunOnLanes: the nShield personality with 2 ms per
// C_Encrypt and C_Decrypt, as a network HSM's client library blocks, from
// several goroutines at once. Every result is checked with Go's AES-GCM.
func TestNetworkHSMCallsRunOnLanes(t *testing.T) {
	p := vendorshim.NShield
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1", hsmtest.Extractable(), hsmtest.Private(p.PrivateKeys))
	shim := vendorshim.New(t, p, tk.Module, tk.Label, vendorshim.Latency(2*time.Millisecond))
	b := open(t, p.Name, vendorConfig(tk, shim, shim.Path))
	block, err := aes.NewCipher(tk.KeyValue(t, "k1"))
	if err != nil {
		t.Fatal(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		t.Fatal(err)
	}
	aad := bytes.Repeat([]byte{'a'}, 35)
	var wg sync.WaitGroup
	// Each of a goroutine's rounds is an Encrypt and a Decrypt.
	const goroutines, rounds = 8, 10
	const crypts = 2 * goroutines * rounds
	errs := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			for i := range rounds {
				pt := []byte(fmt.Sprintf("goroutine %d call %d", g, i))
				res, err := b.Encrypt(bg, "k1", pt, aad)
				if err != nil {
					errs <- fmt.Errorf("Encrypt: %w", err)
					return
				}
				sealed := append(append([]byte{}, res.Ciphertext...), res.Tag...)
				if want, err := aead.Open(nil, res.IV, sealed, aad); err != nil || !bytes.Equal(want, pt) {
					errs <- fmt.Errorf("Go's AES-GCM does not open the lane's ciphertext: %v", err)
					return
				}
				got, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, aad)
				if err != nil || !bytes.Equal(got, pt) {
					errs <- fmt.Errorf("Decrypt: %q, %v", got, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	calls := b.tok.lib.fns.calls
	// The test's crypts, but for the window in which the module's first
	// calls (the start-up self-test's among them) were measured, and for
	// the calls of the other goroutines that had already chosen the direct
	// path when it closed.
	if n, want := calls.offloaded.Load(), uint64(crypts-callWindow-goroutines); n < want {
		t.Fatalf("%d crypt calls on lanes, want %d at least (shortest call %s)", n, want, time.Duration(calls.floor.Load()))
	}
	// A bad tag is still invalid ciphertext, not a fault.
	res, err := b.Encrypt(bg, "k1", []byte("x"), aad)
	if err != nil {
		t.Fatal(err)
	}
	res.Tag[0] ^= 1
	if _, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, aad); !errors.Is(err, ErrInvalidCiphertext) {
		t.Fatalf("Decrypt of a bad tag on a lane: %v", err)
	}
}
