package xkshandler

import (
	"bytes"
	"context"
	"io/fs"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

func TestVersionMetadataRoundTrip(t *testing.T) {
	for _, v := range []uint32{2, 3, 255, 256, 1 << 31, 1<<32 - 1} {
		md := versionMetadata(v)
		if len(md) != versionFormat1Len || len(md) > 20 {
			t.Fatalf("version %d: %d bytes of metadata", v, len(md))
		}
		got, err := metadataVersion(md)
		if err != nil || got != v {
			t.Fatalf("version %d read back as %d, %v", v, got, err)
		}
	}
	if want := []byte{0, 'x', 'k', 1, 0, 0, 0, 2}; !bytes.Equal(versionMetadata(2), want) {
		t.Fatalf("format 1 of version 2 is %x, want %x: the format is fixed by the ciphertexts already written", versionMetadata(2), want)
	}
}

func TestMetadataVersion(t *testing.T) {
	for _, tc := range []struct {
		md      string
		version uint32
		err     string
	}{
		{"", 1, ""},
		{"key_version=1", 1, ""},
		{"test-v1", 1, ""},
		{"\x00", 1, ""},
		{"\x00x", 1, ""},
		{"\x00xj\x01\x00\x00\x00\x02", 1, ""},
		{"\x00xk", 0, "format this proxy does not know"},
		{"\x00xk\x02\x00\x00\x00\x02", 0, "format this proxy does not know"},
		{"\x00xk\x01\x00\x00\x02", 0, "with 7 bytes"},
		{"\x00xk\x01\x00\x00\x00\x00\x02", 0, "with 9 bytes"},
		{"\x00xk\x01\x00\x00\x00\x01", 0, "never does"},
		{"\x00xk\x01\x00\x00\x00\x00", 0, "never does"},
		{"\x00xk\x01\x00\x00\x01\x00", 256, ""},
	} {
		v, err := metadataVersion([]byte(tc.md))
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: %d, %v; want an error saying %q", tc.md, v, err, tc.err)
		case tc.err == "" && (err != nil || v != tc.version):
			t.Errorf("%q: %d, %v; want version %d", tc.md, v, err, tc.version)
		}
	}
}

// FuzzMetadataVersion: any ciphertextMetadata KMS may send (at most 20
// bytes) reads as version 1, a version from 2 up that writes back to the
// same bytes, or an error; never a panic.
func FuzzMetadataVersion(f *testing.F) {
	for _, s := range []string{"", "key_version=1", "\x00xk\x01\x00\x00\x00\x02", "\x00xk\x02", "\x00xk\x01\xff\xff\xff\xff"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, md []byte) {
		if len(md) > 20 {
			return
		}
		v, err := metadataVersion(md)
		switch {
		case err != nil:
			if !bytes.HasPrefix(md, versionPrefix) {
				t.Fatalf("%x: an error for metadata that is not version metadata: %v", md, err)
			}
		case v == 1:
			if bytes.HasPrefix(md, versionPrefix) {
				t.Fatalf("%x: version metadata read as version 1", md)
			}
		case v < 2:
			t.Fatalf("%x: version %d", md, v)
		case !bytes.Equal(versionMetadata(v), md):
			t.Fatalf("%x: read as version %d, which writes %x", md, v, versionMetadata(v))
		}
	})
}

func TestKeyVersionsValidate(t *testing.T) {
	keys := []string{"k", "other"}
	for _, tc := range []struct {
		kv  KeyVersions
		err string
	}{
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 2, Label: "k-v2"}}, Current: 2}, ""},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 2, Label: "k-v2"}}, Current: 1}, ""},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 1, Disabled: true}, {Version: 2, Label: "k-v2"}}, Current: 2}, ""},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 2, Label: "k-v2"}}}, "say which version is current"},
		{KeyVersions{Key: "nope", Versions: []KeyVersion{{Version: 2, Label: "k-v2"}}, Current: 2}, "not among the key store's keys"},
		{KeyVersions{Key: "k", Current: 1}, "no version is listed"},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 0, Label: "x"}}, Current: 1}, "numbered from 1"},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 2, Label: "a"}, {Version: 2, Label: "b"}}, Current: 2}, "listed twice"},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 1, Label: "z"}}, Current: 1}, "version 1 is the HSM key labelled k"},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 2}}, Current: 2}, "needs the label"},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 2, Label: "a"}, {Version: 3, Label: "a"}}, Current: 2}, "names two versions"},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 2, Label: "k"}}, Current: 2}, "names two versions"},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 2, Label: "a"}}, Current: 3}, "current version 3 is not listed"},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 2, Label: "a", Disabled: true}}, Current: 2}, "current version 2 is disabled"},
		{KeyVersions{Key: "k", Versions: []KeyVersion{{Version: 1, Disabled: true}}, Current: 1}, "current version 1 is disabled"},
	} {
		err := tc.kv.validate(keys)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%+v: %v", tc.kv, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%+v: %v, want an error saying %q", tc.kv, err, tc.err)
		}
	}
}

func TestVersionedKeyCurrentAndPromotion(t *testing.T) {
	vk := newVersionedKey("k", &KeyVersions{Key: "k", Current: 2, Versions: []KeyVersion{
		{Version: 4, Label: "k-v4"}, {Version: 2, Label: "k-v2"}, {Version: 3, Label: "k-v3", Disabled: true},
	}})
	if got := vk.current.Load(); got.n != 2 || got.label != "k-v2" {
		t.Fatalf("current %d %s, want 2 k-v2", got.n, got.label)
	}
	if got := vk.next(vk.version(2)); got == nil || got.n != 4 {
		t.Fatalf("next after 2 is %v, want 4 (3 is disabled)", got)
	}
	if got := vk.labels(); strings.Join(got, " ") != "k k-v2 k-v4" {
		t.Fatalf("labels %v", got)
	}
	plain := newVersionedKey("p", nil)
	if got := plain.current.Load(); got.n != 1 || got.label != "p" || len(plain.versions) != 1 {
		t.Fatalf("a key without versions: current %d %s, %d versions", got.n, got.label, len(plain.versions))
	}
}

// TestEncryptLimitIsExactUnderConcurrency: with the caller IV mode, of many
// Encrypts racing for the last places below the limit, exactly the limit's
// worth are counted and the rest are refused.
func TestEncryptLimitIsExactUnderConcurrency(t *testing.T) {
	ks := &KeyStore{URIPath: "/t/kms/xks/v1", Keys: []string{"k"}, EncryptLimit: 50, callerIVs: true,
		logger: zap.NewNop(), usage: fileUsage(t.TempDir())}
	ks.keys = map[string]bool{"k": true}
	ks.provisionVersions(context.Background())
	t.Cleanup(ks.cleanup)
	vk := ks.versioned["k"]
	var ok, refused atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 25 {
				if _, err := ks.forEncrypt(vk); err != nil {
					refused.Add(1)
				} else {
					ok.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if ok.Load() != 50 || refused.Load() != 150 || vk.current.Load().usage.total() != 50 {
		t.Fatalf("%d counted, %d refused, total %d; want 50, 150, 50", ok.Load(), refused.Load(), vk.current.Load().usage.total())
	}
}

// TestProvisionNamesNoRecordBeforeValidation: Caddy provisions before it
// validates, so a key id or version label that validation refuses must not
// reach storage first.
func TestProvisionNamesNoRecordBeforeValidation(t *testing.T) {
	dir := t.TempDir()
	ks := &KeyStore{URIPath: "/t/kms/xks/v1", Keys: []string{"../escape", "ok"}, logger: zap.NewNop(),
		Versions: []KeyVersions{{Key: "ok", Current: 2, Versions: []KeyVersion{{Version: 2, Label: "../../v2"}}}},
		usage:    fileUsage(filepath.Join(dir, "storage"))}
	ks.keys = map[string]bool{"../escape": true, "ok": true}
	ks.provisionVersions(context.Background())
	ks.cleanup()
	var files []string
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			files = append(files, path)
		}
		return nil
	})
	want := filepath.Join(dir, "storage", "xks", "usage", "ok") + string(filepath.Separator) + "test."
	if len(files) != 1 || !strings.HasPrefix(files[0], want) {
		t.Fatalf("records %v, want only one, %s<random>.json", files, want)
	}
	if err := ks.validate(); err == nil {
		t.Fatal("validate accepts the key store")
	}
}

// TestReadUsageOfWhatIsNoKeyID: only a valid external key id names usage
// records; any other label, such as one a token holds, is an error and
// reads nothing, so that "../.." cannot lead out of them.
func TestReadUsageOfWhatIsNoKeyID(t *testing.T) {
	dir := t.TempDir()
	storage := &certmagic.FileStorage{Path: dir}
	ctx := context.Background()
	if err := storage.Store(ctx, "planted.json", []byte(`{"instance":"planted","encryptions":7}`)); err != nil {
		t.Fatal(err)
	}
	for _, label := range []string{"../..", "..", ".", "a/b", ""} {
		if n, _, _, err := ReadUsage(ctx, storage, label); err == nil || n != 0 {
			t.Errorf("ReadUsage(%q) = %d, %v; want an error and nothing read", label, n, err)
		}
	}
	if _, _, _, err := ReadUsage(ctx, storage, "k"); err != nil {
		t.Errorf("ReadUsage of a key without records: %v", err)
	}
}

// fileUsage is what a key store's counters need to count in a file_system
// storage at dir, writing every hour.
func fileUsage(dir string) usageSettings {
	return usageSettings{storage: &certmagic.FileStorage{Path: dir}, instance: "test", interval: time.Hour}
}
