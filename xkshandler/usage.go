package xkshandler

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// Usage counting: every Encrypt with a key version is counted, per HSM key
// label, and the counts add up across a fleet and survive restarts.
//
// Each instance keeps its own count in memory and writes it, every
// usage_flush_interval, to Caddy's storage (the storage the fleet already
// shares for certificates) under xks/usage/<label>/<instance>.json; the
// instance is Caddy's instance id (caddy.InstanceID, kept in the data
// directory). When it writes its own record it reads the others', so an
// instance's total is its own live count plus what the others last wrote.
//
// A clean stop writes the record one last time, marked clean. A crash loses
// what the instance counted since its last write: at most one flush
// interval of Encrypts. That loss is counted as used: an instance whose
// record is not marked clean starts from it plus flush_interval times the
// larger of KMS's default quota (1,800 requests per second) and twice the
// rate it last wrote. The count is only ever too high, never too low.

// usagePrefix is where the records live in storage.
const usagePrefix = "xks/usage"

// defaultUsageFlushInterval is how often records are written.
const defaultUsageFlushInterval = 10 * time.Second

// kmsDefaultRate is KMS's default request quota per external key store, the
// rate a crashed instance is assumed to have encrypted at, at least.
const kmsDefaultRate = 1800

// DefaultEncryptLimit is NIST SP 800-38D §8.3's limit on invocations of
// AES-GCM with one key when IVs are random 96-bit values: 2^32.
const DefaultEncryptLimit = 1 << 32

// usageRecord is one instance's record of one HSM key label.
type usageRecord struct {
	Instance    string    `json:"instance"`
	Label       string    `json:"label"`
	Encryptions uint64    `json:"encryptions"`
	Decryptions uint64    `json:"decryptions"`
	LastDecrypt time.Time `json:"last_decryption,omitzero"`
	// Rate is the instance's Encrypts per second over its last interval.
	Rate          float64   `json:"encryptions_per_second"`
	FlushInterval float64   `json:"flush_interval_seconds"`
	Updated       time.Time `json:"updated"`
	// Clean is true when the instance stopped and wrote this last.
	Clean bool `json:"clean"`
}

// usageCounter counts one HSM key label's use by this process.
type usageCounter struct {
	label    string
	instance string
	storage  certmagic.Storage
	interval time.Duration
	logger   *zap.Logger

	own         atomic.Uint64 // this instance's Encrypts, since the label was first counted
	ownDecrypts atomic.Uint64
	lastDecrypt atomic.Int64 // Unix nanoseconds; 0: none

	// What the other instances last wrote, summed.
	others         atomic.Uint64
	othersDecrypts atomic.Uint64
	othersLast     atomic.Int64

	// loaded is true once this instance's record has been read: until
	// then nothing is written, so that a record that could not be read is
	// never replaced by a smaller count.
	loaded atomic.Bool

	mu        sync.Mutex // serializes writes
	flushedAt time.Time
	flushed   uint64 // own at flushedAt
	rate      float64
	stop      chan struct{}
	done      chan struct{}
}

// total is the fleet's count of Encrypts with the label, as this instance
// knows it.
func (c *usageCounter) total() uint64 { return c.own.Load() + c.others.Load() }

// decrypts is the fleet's count of Decrypts with the label and the time of
// the latest.
func (c *usageCounter) decrypts() (uint64, time.Time) {
	last := max(c.lastDecrypt.Load(), c.othersLast.Load())
	var t time.Time
	if last != 0 {
		t = time.Unix(0, last)
	}
	return c.ownDecrypts.Load() + c.othersDecrypts.Load(), t
}

// countDecrypt records one Decrypt.
func (c *usageCounter) countDecrypt() {
	c.ownDecrypts.Add(1)
	c.lastDecrypt.Store(time.Now().UnixNano())
}

func (c *usageCounter) key(instance string) string {
	return path.Join(usagePrefix, c.label, instance+".json")
}

// load starts the counter from this instance's record, counting a crash's
// loss as used, and marks the record as running.
func (c *usageCounter) load(ctx context.Context) error {
	raw, err := c.storage.Load(ctx, c.key(c.instance))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("reading the usage record of %s: %w", c.label, err)
	default:
		var rec usageRecord
		if err := json.Unmarshal(raw, &rec); err != nil {
			return fmt.Errorf("the usage record %s is not valid: %w", c.key(c.instance), err)
		}
		n := rec.Encryptions
		if !rec.Clean {
			// Less a nanosecond's worth, so that float rounding of an exact
			// product does not add one.
			lost := uint64(math.Ceil(rec.FlushInterval*max(kmsDefaultRate, 2*rec.Rate) - 1e-9))
			n += lost
			c.logger.Warn("this instance stopped without writing its last key usage count; counting the most it can have lost as used",
				zap.String("label", c.label), zap.Uint64("written", rec.Encryptions), zap.Uint64("counted_as_used", lost))
		}
		// Added: what was counted before the record could be read stays.
		c.own.Add(n)
		c.ownDecrypts.Add(rec.Decryptions)
		if !rec.LastDecrypt.IsZero() && c.lastDecrypt.Load() == 0 {
			c.lastDecrypt.Store(rec.LastDecrypt.UnixNano())
		}
	}
	c.loaded.Store(true)
	c.mu.Lock()
	c.flushed, c.flushedAt = c.own.Load(), time.Now()
	c.mu.Unlock()
	return c.write(ctx, false)
}

// write stores this instance's record and reads the others'.
func (c *usageCounter) write(ctx context.Context, clean bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	own := c.own.Load()
	if d := now.Sub(c.flushedAt).Seconds(); d > 0.5 {
		c.rate = float64(own-c.flushed) / d
		c.flushed, c.flushedAt = own, now
	}
	rec := usageRecord{
		Instance: c.instance, Label: c.label, Encryptions: own, Decryptions: c.ownDecrypts.Load(),
		Rate: c.rate, FlushInterval: c.interval.Seconds(), Updated: now.UTC(), Clean: clean,
	}
	if last := c.lastDecrypt.Load(); last != 0 {
		rec.LastDecrypt = time.Unix(0, last).UTC()
	}
	raw, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := c.storage.Store(ctx, c.key(c.instance), raw); err != nil {
		return fmt.Errorf("writing the usage record of %s: %w", c.label, err)
	}
	others, err := readUsage(ctx, c.storage, c.label, c.instance)
	if err != nil {
		return err
	}
	var sum, dec uint64
	var last int64
	for _, r := range others {
		sum += r.Encryptions
		dec += r.Decryptions
		if !r.LastDecrypt.IsZero() {
			last = max(last, r.LastDecrypt.UnixNano())
		}
	}
	c.others.Store(sum)
	c.othersDecrypts.Store(dec)
	c.othersLast.Store(last)
	return nil
}

// readUsage reads every instance's record of label but skip's.
func readUsage(ctx context.Context, storage certmagic.Storage, label, skip string) ([]usageRecord, error) {
	dir := path.Join(usagePrefix, label)
	keys, err := storage.List(ctx, dir, false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing the usage records of %s: %w", label, err)
	}
	var out []usageRecord
	for _, k := range keys {
		name := path.Base(k)
		if !strings.HasSuffix(name, ".json") || strings.TrimSuffix(name, ".json") == skip {
			continue
		}
		raw, err := storage.Load(ctx, path.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("reading the usage record %s: %w", k, err)
		}
		var r usageRecord
		if err := json.Unmarshal(raw, &r); err != nil {
			return nil, fmt.Errorf("the usage record %s is not valid: %w", k, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// ReadUsage is the fleet's count of Encrypts and Decrypts with an HSM key
// label, from the records in storage, and the fleet's Encrypts per second
// (the instances that have not stopped).
//
// A label that is not a valid external key id is an error: its path in
// storage could lead out of the usage records ("../..").
func ReadUsage(ctx context.Context, storage certmagic.Storage, label string) (encrypts, decrypts uint64, rate float64, err error) {
	if !validKeyID(label) {
		return 0, 0, 0, fmt.Errorf("reading usage: %q is not a valid external key id, and no usage is recorded under it", label)
	}
	recs, err := readUsage(ctx, storage, label, "")
	for _, r := range recs {
		encrypts += r.Encryptions
		decrypts += r.Decryptions
		// A stopped instance adds nothing to the rate.
		if !r.Clean {
			rate += r.Rate
		}
	}
	return encrypts, decrypts, rate, err
}

// run writes the record every interval until stopped.
func (c *usageCounter) run() {
	defer close(c.done)
	t := time.NewTicker(c.interval)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			write := func() error { return c.write(ctx, false) }
			if !c.loaded.Load() {
				write = func() error { return c.load(ctx) }
			}
			if err := write(); err != nil {
				c.logger.Error("key usage count not written; it is kept in memory and written at the next interval",
					zap.String("label", c.label), zap.Error(err))
			}
			cancel()
		}
	}
}

// Destruct stops the counter and writes its record one last time, clean.
// Caddy's usage pool calls it when the last config counting the label is
// cleaned up.
func (c *usageCounter) Destruct() error {
	close(c.stop)
	<-c.done
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if !c.loaded.Load() {
		if err := c.load(ctx); err != nil {
			c.logger.Error("key usage count not written at stop: its record could not be read",
				zap.String("label", c.label), zap.Uint64("uncounted_encryptions", c.own.Load()), zap.Error(err))
			return err
		}
	}
	if err := c.write(ctx, true); err != nil {
		c.logger.Error("key usage count not written at stop: the next start counts a flush interval as used",
			zap.String("label", c.label), zap.Error(err))
		return err
	}
	return nil
}

// counters holds the usage counters of the process, by label, across config
// reloads: a reload must neither lose a count nor start a second counter.
var counters = caddy.NewUsagePool()

// acquireCounter returns the process's counter of label, starting it from
// storage the first time. release must be called when the config is done
// with it.
func acquireCounter(ctx context.Context, storage certmagic.Storage, instance, label string, interval time.Duration, logger *zap.Logger) *usageCounter {
	if !validKeyID(label) {
		// Callers pass only valid key ids; a label that is not one must
		// never become a storage path.
		panic(fmt.Sprintf("xks: usage counter for an invalid label %q", label))
	}
	v, _, _ := counters.LoadOrNew(label, func() (caddy.Destructor, error) {
		c := &usageCounter{
			label: label, instance: instance, storage: storage, interval: interval, logger: logger,
			stop: make(chan struct{}), done: make(chan struct{}),
		}
		if err := c.load(ctx); err != nil {
			// Counting goes on in memory; the record is read and written
			// at the next interval. Refusing the config would take the
			// proxy down for want of a count.
			logger.Error("key usage record not read; counting in memory until it can be",
				zap.String("label", label), zap.Error(err))
		}
		go c.run()
		return c, nil
	})
	return v.(*usageCounter)
}

// releaseCounter gives back a counter acquired by acquireCounter.
func releaseCounter(c *usageCounter) {
	if _, err := counters.Delete(c.label); err != nil {
		c.logger.Error("releasing the key usage counter", zap.String("label", c.label), zap.Error(err))
	}
}

// instanceID names this instance in usage records: Caddy's instance id, or
// if Caddy cannot keep one (a data directory it cannot write), the host
// name, which also stays the same across restarts.
func instanceID(logger *zap.Logger) string {
	id, err := caddy.InstanceID()
	if err == nil {
		return id.String()
	}
	host, herr := os.Hostname()
	if herr != nil {
		host = "unknown"
	}
	logger.Warn("Caddy's instance id is not available; key usage records are named by the host name, so instances sharing storage must have different host names",
		zap.String("host", host), zap.Error(err))
	return "host-" + host
}
