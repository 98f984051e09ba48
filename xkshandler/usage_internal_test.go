package xkshandler

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"math"
	"path"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestSumUsage: how records add up to the fleet's count of a label.
func TestSumUsage(t *testing.T) {
	now := time.Now()
	rec := func(name string, n uint64, clean bool, silent time.Duration) usageRecord {
		return usageRecord{name: name, Encryptions: n, Clean: clean, FlushInterval: 10, Updated: now.Add(-silent)}
	}
	for _, tc := range []struct {
		name string
		recs []usageRecord
		want uint64
	}{
		{"counts add up", []usageRecord{rec("a", 3, false, 0), rec("b", 4, true, time.Hour)}, 7},
		{"a writer silent for less than three intervals is only late", []usageRecord{rec("a", 3, false, 29*time.Second)}, 3},
		{"a writer that stopped without its last write lost at most an interval at KMS's quota",
			[]usageRecord{rec("a", 3, false, 31*time.Second)}, 3 + 10*kmsDefaultRate},
		{"a stopped writer's lost interval is twice its last rate when that was higher",
			[]usageRecord{{name: "a", Encryptions: 3, FlushInterval: 10, Rate: 5000, Updated: now.Add(-time.Minute)}}, 3 + 10*2*5000},
		{"a clean stop lost nothing", []usageRecord{rec("a", 3, true, time.Hour)}, 3},
		{"sums saturate instead of wrapping", []usageRecord{rec("a", math.MaxUint64-2, false, 0), rec("b", 10, false, 0)}, math.MaxUint64},
		{"a count past what any fleet can reach is the limit reached", []usageRecord{rec("a", maxPlausibleEncryptions+1, true, 0)}, math.MaxUint64},
		{"2^64-3 is not a count, whatever it adds up to", []usageRecord{rec("a", 1<<64-3, true, 0), rec("b", 10, true, 0)}, math.MaxUint64},
		{"a record another one absorbed is not counted twice",
			[]usageRecord{{name: "a", Encryptions: 10, Absorbed: []string{"b"}, Updated: now}, rec("b", 7, true, time.Hour)}, 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := sumUsage(tc.recs, now).encryptions; got != tc.want {
				t.Fatalf("sum %d, want %d", got, tc.want)
			}
		})
	}
}

// newTestCounter is a counter of label as acquireCounter makes one, but
// outside the process's pool, so that a test can run several writers.
func newTestCounter(t *testing.T, storage certmagic.Storage, instance, label string, logger *zap.Logger) *usageCounter {
	t.Helper()
	c := &usageCounter{label: label, instance: instance, storage: storage, interval: time.Hour, logger: logger,
		stop: make(chan struct{}), done: make(chan struct{})}
	c.writer, c.flushedAt = c.newWriter(), time.Now()
	if err := c.write(context.Background(), false); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestUsageWritersSharingAnInstanceID: two processes with one instance id
// (one data directory, or instances cloned from one image) each write a
// record of their own, and both know the fleet's exact count.
func TestUsageWritersSharingAnInstanceID(t *testing.T) {
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	ctx := context.Background()
	a := newTestCounter(t, storage, "same-instance", "k", zap.NewNop())
	b := newTestCounter(t, storage, "same-instance", "k", zap.NewNop())
	a.own.Add(3)
	b.own.Add(4)
	for _, c := range []*usageCounter{a, b, a} {
		if err := c.write(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	if a.total() != 7 || b.total() != 7 {
		t.Fatalf("totals %d and %d, want 7 and 7", a.total(), b.total())
	}
	recs, err := readUsage(ctx, storage, "k")
	if err != nil || len(recs) != 2 {
		t.Fatalf("%d records (%v), want one per process", len(recs), err)
	}
}

// TestUsageRecordChangedBySomeoneElse: a writer whose record someone else
// rewrote or removed says so and goes on under a new name with its whole
// count; the record it left is never written with a smaller count.
func TestUsageRecordChangedBySomeoneElse(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, storage certmagic.Storage, key string)
		left   uint64 // what the old record holds after, if it is there
	}{
		{"rewritten with a higher count", func(t *testing.T, storage certmagic.Storage, key string) {
			raw, _ := json.Marshal(usageRecord{Writer: path.Base(strings.TrimSuffix(key, ".json")), Encryptions: 9, Updated: time.Now()})
			if err := storage.Store(context.Background(), key, raw); err != nil {
				t.Fatal(err)
			}
		}, 9},
		{"removed", func(t *testing.T, storage certmagic.Storage, key string) {
			if err := storage.Delete(context.Background(), key); err != nil {
				t.Fatal(err)
			}
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			storage := &certmagic.FileStorage{Path: t.TempDir()}
			core, logs := observer.New(zap.WarnLevel)
			c := newTestCounter(t, storage, "i", "k", zap.New(core))
			c.own.Add(5)
			if err := c.write(context.Background(), false); err != nil {
				t.Fatal(err)
			}
			first := c.key(c.writer)
			tc.change(t, storage, first)
			c.own.Add(1)
			if err := c.write(context.Background(), false); err != nil {
				t.Fatal(err)
			}
			if c.key(c.writer) == first {
				t.Fatal("the writer kept writing a record someone else changed")
			}
			if logs.FilterMessageSnippet("changed or removed by someone else").Len() != 1 {
				t.Fatalf("no warning logged: %v", logs.All())
			}
			raw, err := storage.Load(context.Background(), first)
			switch {
			case tc.left == 0 && !errors.Is(err, fs.ErrNotExist):
				t.Fatalf("the removed record is back: %s %v", raw, err)
			case tc.left != 0:
				var r usageRecord
				if err != nil || json.Unmarshal(raw, &r) != nil || r.Encryptions != tc.left {
					t.Fatalf("the changed record now holds %s (%v), want its count %d kept", raw, err, tc.left)
				}
			}
			var r usageRecord
			raw, err = storage.Load(context.Background(), c.key(c.writer))
			if err != nil || json.Unmarshal(raw, &r) != nil || r.Encryptions != 6 {
				t.Fatalf("the new record holds %s (%v), want the writer's whole count, 6", raw, err)
			}
		})
	}
}

// TestUsageCompaction: starting writers absorb the records nobody will
// write again, exactly once between them, and every count stays counted.
func TestUsageCompaction(t *testing.T) {
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	ctx := context.Background()
	now := time.Now()
	for _, r := range []usageRecord{
		{Writer: "clean-a", Encryptions: 5, Clean: true, Updated: now.Add(-time.Minute)},
		{Writer: "clean-b", Encryptions: 6, Decryptions: 2, Clean: true, Updated: now.Add(-time.Minute)},
		{Writer: "crashed-long-ago", Encryptions: 7, FlushInterval: 10, Updated: now.Add(-2 * absorbAfter)},
		{Writer: "live", Encryptions: 8, FlushInterval: 10, Updated: now},
		{Writer: "implausible", Encryptions: math.MaxUint64 - 2, Clean: true, Updated: now},
	} {
		raw, _ := json.Marshal(r)
		if err := storage.Store(ctx, path.Join(usagePrefix, "k", r.Writer+".json"), raw); err != nil {
			t.Fatal(err)
		}
	}
	a := newTestCounter(t, storage, "i", "k", zap.NewNop())
	b := newTestCounter(t, storage, "i", "k", zap.NewNop())
	var wg sync.WaitGroup
	for _, c := range []*usageCounter{a, b} {
		wg.Go(func() {
			if err := c.compact(ctx); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	recs, err := readUsage(ctx, storage, "k")
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, 0, len(recs))
	for _, r := range recs {
		names = append(names, strings.TrimPrefix(r.name, "i."))
	}
	if len(recs) != 4 {
		t.Fatalf("records left: %v; want the two writers', the live one and the implausible one", names)
	}
	if got := a.own.Load() + b.own.Load(); got != 5+6+7+10*kmsDefaultRate {
		t.Fatalf("the writers absorbed %d Encrypts, want %d: each record once, the crashed one with its lost interval", got, 5+6+7+10*kmsDefaultRate)
	}
	a.own.Add(1)
	if err := a.write(ctx, false); err != nil {
		t.Fatal(err)
	}
	if err := b.write(ctx, false); err != nil {
		t.Fatal(err)
	}
	if a.total() != math.MaxUint64 || b.total() != math.MaxUint64 {
		t.Fatalf("totals %d, %d: the implausible record must keep counting as the limit reached", a.total(), b.total())
	}
	s := sumUsage(recs, time.Now(), "implausible")
	if want := uint64(5 + 6 + 7 + 10*kmsDefaultRate + 8); s.encryptions != want || s.decryptions != 2 {
		t.Fatalf("without the implausible record the fleet counts %d and %d decrypts, want %d and 2", s.encryptions, s.decryptions, want)
	}
}
