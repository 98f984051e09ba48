package hsm

import (
	"errors"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
)

// TestDuplicateLabelIsFoundByMetadata: another process gives a second key
// the label of a key in use. A fresh lookup (Metadata, which the key
// store's health check runs for each key) finds it at once, and from then
// on every call fails, as after a restart: the cached handle is dropped.
func TestDuplicateLabelIsFoundByMetadata(t *testing.T) {
	b, tk := newBackend(t, "k")
	if _, err := b.Encrypt(bg, "k", []byte("pt"), nil); err != nil {
		t.Fatal(err)
	}
	tk.CreateKey(t, "k") // another session, as another process would
	if _, err := b.Metadata(bg, "k"); !errors.Is(err, ErrDuplicateKey) {
		t.Fatalf("Metadata after a second key got the label: %v, want ErrDuplicateKey", err)
	}
	if _, err := b.Encrypt(bg, "k", []byte("pt"), nil); !errors.Is(err, ErrDuplicateKey) {
		t.Fatalf("Encrypt after the duplicate was found: %v, want ErrDuplicateKey", err)
	}
}

// TestDuplicateLabelIsFoundWithoutARestart: without any health check, a
// cached handle is searched again after keyRecheck, so a second key given
// its label is found by the calls themselves; once the keys are sorted out
// the label serves again.
func TestDuplicateLabelIsFoundWithoutARestart(t *testing.T) {
	defer func(d time.Duration) { keyRecheck = d }(keyRecheck)
	keyRecheck = 20 * time.Millisecond
	tk := hsmtest.NewToken(t)
	tk.CreateKey(t, "k")
	b, logs := openObserved(t, "primary", configFor(tk))
	if _, err := b.Encrypt(bg, "k", []byte("pt"), nil); err != nil {
		t.Fatal(err)
	}
	tk.CreateKey(t, "k")
	waitFor(t, settle, func() bool { // the duplicate is found
		_, err := b.Encrypt(bg, "k", []byte("pt"), nil)
		return errors.Is(err, ErrDuplicateKey)
	})
	if n := logs.FilterMessageSnippet("a second key now has the label").FilterLevelExact(zapcore.ErrorLevel).Len(); n != 1 {
		t.Errorf("%d log lines about the duplicate, want 1:\n%s", n, logText(logs))
	}
	// The administrator removes both and makes one again.
	tk.DestroyKeys(t, "k")
	tk.CreateKey(t, "k")
	waitFor(t, settle, func() bool { // the label serves again
		_, err := b.Encrypt(bg, "k", []byte("pt"), nil)
		return err == nil
	})
}

// TestCheckKeyFindsAKeyMadeAMomentAgo: a label found missing is not
// searched for again by Metadata for notFoundTTL, which bounds the searches
// callers can cause; CheckKey (the key check of a reload after keygen)
// searches regardless, and its finding serves Metadata from then on.
func TestCheckKeyFindsAKeyMadeAMomentAgo(t *testing.T) {
	old := notFoundTTL
	notFoundTTL = time.Hour // no test run is that slow
	t.Cleanup(func() { notFoundTTL = old })
	b, tk := newBackend(t, "k")
	if _, err := b.Metadata(bg, "new"); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("Metadata of a label not on the token: %v", err)
	}
	tk.CreateKey(t, "new")
	if _, err := b.Metadata(bg, "new"); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("Metadata within notFoundTTL searched again: %v", err)
	}
	if _, err := b.CheckKey(bg, "new"); err != nil {
		t.Fatalf("CheckKey of a key made a moment ago: %v", err)
	}
	if _, err := b.Metadata(bg, "new"); err != nil {
		t.Fatalf("Metadata after CheckKey found the key: %v", err)
	}
}
