package hsm

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
)

func TestConcurrentOperations(t *testing.T) {
	const goroutines, ops = 64, 500
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1")
	cfg := configFor(tk)
	// Generous waits: this test is about correctness under -race on two
	// cores, where the race detector slows every call tenfold.
	cfg.SessionWait = caddy.Duration(10 * time.Second)
	cfg.CallTimeout = caddy.Duration(10 * time.Second)
	b := open(t, "primary", cfg)
	ivs := make([][][]byte, goroutines)
	var wg sync.WaitGroup
	var failures atomic.Int64
	for g := range goroutines {
		wg.Go(func() {
			aad := []byte(fmt.Sprintf("goroutine %d", g))
			for i := range ops {
				pt := []byte(fmt.Sprintf("op %d", i))
				res, err := b.Encrypt(bg, "k1", pt, aad)
				if err != nil {
					failures.Add(1)
					t.Errorf("Encrypt: %v", err)
					return
				}
				ivs[g] = append(ivs[g], res.IV)
				if i%10 == 0 {
					back, err := b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, aad)
					if err != nil || string(back) != string(pt) {
						failures.Add(1)
						t.Errorf("Decrypt: %q %v", back, err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	if failures.Load() > 0 {
		t.FailNow()
	}
	seen := make(map[string]bool, goroutines*ops)
	for _, list := range ivs {
		for _, iv := range list {
			if seen[string(iv)] {
				t.Fatalf("iv %x returned twice", iv)
			}
			seen[string(iv)] = true
		}
	}
	if len(seen) != goroutines*ops {
		t.Fatalf("%d ivs, want %d", len(seen), goroutines*ops)
	}
	// A worker puts its session back after it has handed the caller the
	// result (pool.go, Backend.work), so the last put can trail the last
	// call's return: wait for every session to come back, then check.
	waitFor(t, settle, func() bool { return b.Stats().SessionsInUse == 0 })
	if s := b.Stats(); s.StuckCalls != 0 || s.SessionsIdle > s.MaxSessions {
		t.Fatalf("stats after the run: %+v", s)
	}
}

// TestReloadKeepsSharedToken plays a config reload: two backends on one
// token (the old and the new config's), the old one closed while both are
// busy. Caddy cleans up an old config while requests it accepted still run,
// so the closed backend keeps serving as long as the token lives.
func TestReloadKeepsSharedToken(t *testing.T) {
	const workers, ops = 8, 1000 / 8
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1") // private: only visible while logged in
	cfg := configFor(tk)
	cfg.SessionWait = caddy.Duration(10 * time.Second)
	cfg.CallTimeout = caddy.Duration(10 * time.Second)
	old := open(t, "old", cfg)
	cur := open(t, "new", cfg)
	if old.tok != cur.tok {
		t.Fatal("backends on one token do not share it")
	}

	var wg sync.WaitGroup
	var oldOK, curOK atomic.Int64
	run := func(b *Backend, ok *atomic.Int64) {
		defer wg.Done()
		for range ops {
			res, err := b.Encrypt(bg, "k1", []byte("payload"), []byte("aad"))
			if err == nil {
				_, err = b.Decrypt(bg, "k1", res.IV, res.Ciphertext, res.Tag, []byte("aad"))
			}
			if err != nil {
				t.Errorf("%s: %v", b.Name(), err)
				return
			}
			ok.Add(1)
		}
	}
	for range workers {
		wg.Add(2)
		go run(old, &oldOK)
		go run(cur, &curOK)
	}
	waitFor(t, settle, func() bool { return oldOK.Load() > 100 })
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	if n := old.inflight.Load(); n != 0 {
		t.Fatalf("Close returned with %d operations in flight", n)
	}
	wg.Wait()
	if curOK.Load() != workers*ops {
		t.Fatalf("surviving backend: %d of %d operations succeeded", curOK.Load(), workers*ops)
	}
	if oldOK.Load() != workers*ops {
		t.Fatalf("closed backend: %d of %d operations succeeded", oldOK.Load(), workers*ops)
	}
	// The login survived: the private key is still found by a new backend.
	cur.tok.keys.clear()
	again := open(t, "newer", cfg)
	if _, err := again.Encrypt(bg, "k1", []byte("x"), nil); err != nil {
		t.Fatalf("after reload: %v", err)
	}
	if refs, _ := tokens.References(cur.key); refs != 2 {
		t.Fatalf("token references = %d, want 2", refs)
	}
}

func TestAppFromJSON(t *testing.T) {
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k1")
	t.Setenv("HSMTEST_PIN", tk.PIN)
	load := func(ttl string) *App {
		t.Helper()
		cfg, _ := json.Marshal(map[string]any{
			"admin": map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
			"apps": map[string]any{"hsm": map[string]any{"backends": map[string]any{
				"primary": map[string]any{"module": tk.Module, "token": tk.Label, "pin": "{env.HSMTEST_PIN}", "iv": "caller", "health_ttl": ttl},
			}}},
		})
		if err := caddy.Load(cfg, true); err != nil {
			t.Fatalf("caddy.Load: %v", err)
		}
		ctx, ok := caddy.ActiveContext(), true
		app, err := ctx.App("hsm")
		if err != nil || !ok {
			t.Fatalf("hsm app: %v", err)
		}
		return app.(*App)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	first := load("30s")
	b, err := first.Backend("primary")
	if err != nil {
		t.Fatal(err)
	}
	res, err := b.Encrypt(context.Background(), "k1", []byte("x"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.Backend("secondary"); err == nil {
		t.Fatal("unknown backend found")
	}
	// A reload to a changed config shares the token; the old backend closes.
	second := load("10s")
	nb, _ := second.Backend("primary")
	if nb == b || nb.tok != b.tok {
		t.Fatal("reload did not share the token with a new backend")
	}
	if _, err := nb.Decrypt(context.Background(), "k1", res.IV, res.Ciphertext, res.Tag, nil); err != nil {
		t.Fatalf("after reload: %v", err)
	}
	// A request the old config accepted before the reload is still
	// served: the token lives on in the new config.
	if _, err := b.Encrypt(context.Background(), "k1", []byte("late"), nil); err != nil {
		t.Fatalf("old config's backend after reload: %v", err)
	}
	// A bad PIN placeholder fails provisioning and keeps the running config.
	bad, _ := json.Marshal(map[string]any{
		"admin": map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"apps": map[string]any{"hsm": map[string]any{"backends": map[string]any{
			"primary": map[string]any{"module": tk.Module, "token": tk.Label, "pin": "{env.HSMTEST_NO_SUCH_VAR}"},
		}}},
	})
	if err := caddy.Load(bad, true); err == nil {
		t.Fatal("config with an unresolvable pin loaded")
	}
	if _, err := nb.Encrypt(context.Background(), "k1", []byte("x"), nil); err != nil {
		t.Fatalf("running config after a failed reload: %v", err)
	}
}
