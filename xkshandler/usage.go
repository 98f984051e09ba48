package xkshandler

import (
	"context"
	"crypto/rand"
	"encoding/hex"
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
// Each process keeps its own count of a label in memory and writes it,
// every usage_flush_interval, to Caddy's storage (the storage the fleet
// already shares for certificates) under xks/usage/<label>/<writer>.json.
// A writer is one process's counter of one label: its name is Caddy's
// instance id and a random part drawn when the counter starts. Two
// processes never write one record, even when they share a data directory
// (and so an instance id, as instances cloned from one image do). When a
// process writes its record it reads the others', so its total is its own
// live count plus what the others last wrote.
//
// A writer only ever writes its own record, and its count only grows.
// Before each write it checks that the record still holds what it last
// wrote; if someone else changed or removed it, the writer logs that and
// goes on under a new name with its whole count, so the fleet's total can
// only come out too high.
//
// A clean stop writes the record one last time, marked clean. A crash loses
// what the process counted since its last write: at most one flush
// interval of Encrypts. That loss is counted as used: a record not marked
// clean whose writer has been silent for staleAfter of its intervals counts
// flush_interval times the larger of KMS's default quota (1,800 requests per
// second) and twice the rate it last wrote, on top of its count.
//
// Sums saturate at the largest uint64, and a record above
// maxPlausibleEncryptions, which no fleet can reach, counts as that: the
// limit reached. A starting writer absorbs into its own record, under the
// storage's lock, the records nobody will write again (those marked clean,
// and those silent for absorbAfter), and deletes them, so that restarts do
// not pile up records; its record names what it absorbed until the
// deletions are done, and readers skip those, so no count is added twice.

// usagePrefix is where the records live in storage.
const usagePrefix = "xks/usage"

// defaultUsageFlushInterval is how often records are written.
const defaultUsageFlushInterval = 10 * time.Second

// kmsDefaultRate is KMS's default request quota per external key store, the
// rate a crashed process is assumed to have encrypted at, at least.
const kmsDefaultRate = 1800

// DefaultEncryptLimit is NIST SP 800-38D §8.3's limit on invocations of
// AES-GCM with one key when IVs are random 96-bit values: 2^32.
const DefaultEncryptLimit = 1 << 32

// maxPlausibleEncryptions is a count no fleet can reach: 2^56 Encrypts take
// more than 2,000 years at a million a second. A record above it was not
// written by a counter, and counts as every Encrypt a key may have.
const maxPlausibleEncryptions = 1 << 56

// staleAfter is how many of its flush intervals a writer that did not stop
// cleanly may be silent before the most it can have lost is counted as
// used. A writer that is only late brings its record up to date and the
// allowance goes.
const staleAfter = 3

// absorbAfter is how long a record not marked clean must be silent before a
// starting writer absorbs it (with its allowance): far longer than any
// outage a live writer rides out, so that a live writer is not absorbed.
const absorbAfter = time.Hour

// usageRecord is one writer's record of one HSM key label.
type usageRecord struct {
	// Writer is the record's name: Caddy's instance id and a random part.
	Writer string `json:"writer"`
	// Instance is Caddy's instance id of the process, for people reading
	// the records.
	Instance    string    `json:"instance"`
	Label       string    `json:"label"`
	Encryptions uint64    `json:"encryptions"`
	Decryptions uint64    `json:"decryptions"`
	LastDecrypt time.Time `json:"last_decryption,omitzero"`
	// Rate is the process's Encrypts per second over its last interval.
	Rate          float64   `json:"encryptions_per_second"`
	FlushInterval float64   `json:"flush_interval_seconds"`
	Updated       time.Time `json:"updated"`
	// Clean is true when the process stopped and wrote this last.
	Clean bool `json:"clean"`
	// Absorbed names the records whose counts this one took over and
	// that may not be deleted yet: readers skip them.
	Absorbed []string `json:"absorbed,omitempty"`

	name string // the record's file name, less .json
}

// silent reports how long the record's writer has not written, as of now.
func (r *usageRecord) silent(now time.Time) time.Duration { return now.Sub(r.Updated) }

// interval is the record's flush interval, or the default for a record
// that does not say.
func (r *usageRecord) interval() time.Duration {
	if r.FlushInterval <= 0 {
		return defaultUsageFlushInterval
	}
	return time.Duration(r.FlushInterval * float64(time.Second))
}

// lostAllowance is the most Encrypts a writer can have counted since it
// last wrote the record.
func (r *usageRecord) lostAllowance() uint64 {
	// Less a nanosecond's worth, so that float rounding of an exact
	// product does not add one.
	return uint64(math.Ceil(r.interval().Seconds()*max(kmsDefaultRate, 2*r.Rate) - 1e-9))
}

// encryptions is what the record adds to the fleet's count as of now: its
// count, plus the lost allowance when its writer stopped without a last
// write; a count no fleet can reach is every Encrypt there is.
func (r *usageRecord) encryptions(now time.Time) uint64 {
	if r.Encryptions > maxPlausibleEncryptions {
		return math.MaxUint64
	}
	if !r.Clean && r.silent(now) > staleAfter*r.interval() {
		return addSat(r.Encryptions, r.lostAllowance())
	}
	return r.Encryptions
}

// addSat adds without wrapping: a sum past the largest uint64 is that.
func addSat(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return math.MaxUint64
}

// addSatAtomic adds n to v without wrapping and returns the new value.
func addSatAtomic(v *atomic.Uint64, n uint64) uint64 {
	for {
		old := v.Load()
		if s := addSat(old, n); v.CompareAndSwap(old, s) {
			return s
		}
	}
}

// usageSum is what a set of records adds up to.
type usageSum struct {
	encryptions, decryptions uint64
	lastDecrypt              int64 // Unix nanoseconds; 0: none
	rate                     float64
	implausible              []string // records above maxPlausibleEncryptions
}

// sumUsage adds up the records as of now, but for those another record
// has absorbed and those named in skip.
func sumUsage(recs []usageRecord, now time.Time, skip ...string) usageSum {
	absorbed := map[string]bool{}
	for _, s := range skip {
		absorbed[s] = true
	}
	for _, r := range recs {
		for _, a := range r.Absorbed {
			absorbed[a] = true
		}
	}
	var s usageSum
	for i := range recs {
		r := &recs[i]
		if absorbed[r.name] {
			continue
		}
		if r.Encryptions > maxPlausibleEncryptions {
			s.implausible = append(s.implausible, r.name)
		}
		s.encryptions = addSat(s.encryptions, r.encryptions(now))
		s.decryptions = addSat(s.decryptions, r.Decryptions)
		if !r.LastDecrypt.IsZero() {
			s.lastDecrypt = max(s.lastDecrypt, r.LastDecrypt.UnixNano())
		}
		// A stopped process adds nothing to the rate.
		if !r.Clean && r.silent(now) <= staleAfter*r.interval() {
			s.rate += r.Rate
		}
	}
	return s
}

// usageCounter counts one HSM key label's use by this process.
type usageCounter struct {
	label    string
	instance string // Caddy's instance id: the first part of writer names
	storage  certmagic.Storage
	interval time.Duration
	logger   *zap.Logger
	// storageConfig is the usageStores key of storage, given back when
	// the counter stops if releaseStorage.
	storageConfig  json.RawMessage
	releaseStorage bool

	own         atomic.Uint64 // this process's Encrypts, and the counts its record absorbed
	ownDecrypts atomic.Uint64
	lastDecrypt atomic.Int64 // Unix nanoseconds; 0: none

	// What the other writers last wrote, summed.
	others         atomic.Uint64
	othersDecrypts atomic.Uint64
	othersLast     atomic.Int64

	mu        sync.Mutex // serializes writes
	writer    string     // the name of the record this process writes
	written   *usageRecord
	absorbed  []string // records absorbed whose deletion is not known done
	compacted bool     // the starting absorption ran
	warned    map[string]bool
	flushedAt time.Time
	flushed   uint64 // own at flushedAt
	rate      float64
	stop      chan struct{}
	done      chan struct{}
}

// total is the fleet's count of Encrypts with the label, as this process
// knows it.
func (c *usageCounter) total() uint64 { return addSat(c.own.Load(), c.others.Load()) }

// decrypts is the fleet's count of Decrypts with the label and the time of
// the latest.
func (c *usageCounter) decrypts() (uint64, time.Time) {
	last := max(c.lastDecrypt.Load(), c.othersLast.Load())
	var t time.Time
	if last != 0 {
		t = time.Unix(0, last)
	}
	return addSat(c.ownDecrypts.Load(), c.othersDecrypts.Load()), t
}

// countDecrypt records one Decrypt.
func (c *usageCounter) countDecrypt() {
	c.ownDecrypts.Add(1)
	c.lastDecrypt.Store(time.Now().UnixNano())
}

func (c *usageCounter) key(writer string) string {
	return path.Join(usagePrefix, c.label, writer+".json")
}

// newWriter draws a writer name: the instance id and 64 random bits.
func (c *usageCounter) newWriter() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24)
	return c.instance + "." + hex.EncodeToString(b[:])
}

// write stores this process's record and reads the others'. Writes are
// serialized.
func (c *usageCounter) write(ctx context.Context, clean bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.checkOwn(ctx); err != nil {
		return err
	}
	if err := c.store(ctx, clean); err != nil {
		return err
	}
	c.deleteAbsorbed(ctx)
	recs, err := readUsage(ctx, c.storage, c.label)
	if err != nil {
		return err
	}
	sum := sumUsage(recs, time.Now(), c.writer)
	c.warnImplausible(sum.implausible)
	c.others.Store(sum.encryptions)
	c.othersDecrypts.Store(sum.decryptions)
	c.othersLast.Store(sum.lastDecrypt)
	return nil
}

// checkOwn makes sure that the record this process writes holds what it
// last wrote (or, before its first write, does not exist), and takes a new
// name if it does not: someone else wrote or removed it.
func (c *usageCounter) checkOwn(ctx context.Context) error {
	raw, err := c.storage.Load(ctx, c.key(c.writer))
	var found *usageRecord
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("reading the usage record of %s: %w", c.label, err)
	default:
		found = new(usageRecord)
		if json.Unmarshal(raw, found) != nil {
			found.Writer = "(not a usage record)"
		}
	}
	if sameRecord(found, c.written) {
		return nil
	}
	old := c.writer
	c.writer, c.written = c.newWriter(), nil
	c.logger.Warn("the key usage record this process writes was changed or removed by someone else; "+
		"it goes on under a new name with its whole count, so the fleet's total may come out higher than the truth, never lower",
		zap.String("label", c.label), zap.String("record", c.key(old)), zap.String("new_record", c.key(c.writer)))
	return nil
}

// sameRecord reports whether the record found in storage is the one
// written last (both nil: not written yet, and not there).
func sameRecord(found, written *usageRecord) bool {
	if found == nil || written == nil {
		return found == nil && written == nil
	}
	return found.Writer == written.Writer && found.Encryptions == written.Encryptions &&
		found.Decryptions == written.Decryptions && found.Updated.Equal(written.Updated)
}

// store writes this process's record.
func (c *usageCounter) store(ctx context.Context, clean bool) error {
	now := time.Now()
	own := c.own.Load()
	if d := now.Sub(c.flushedAt).Seconds(); d > 0.5 {
		c.rate = float64(own-c.flushed) / d
		c.flushed, c.flushedAt = own, now
	}
	rec := usageRecord{
		Writer: c.writer, Instance: c.instance, Label: c.label, Encryptions: own, Decryptions: c.ownDecrypts.Load(),
		Rate: c.rate, FlushInterval: c.interval.Seconds(), Updated: now.UTC(), Clean: clean,
		Absorbed: c.absorbed,
	}
	if last := c.lastDecrypt.Load(); last != 0 {
		rec.LastDecrypt = time.Unix(0, last).UTC()
	}
	raw, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := c.storage.Store(ctx, c.key(c.writer), raw); err != nil {
		return fmt.Errorf("writing the usage record of %s: %w", c.label, err)
	}
	c.written = &rec
	return nil
}

// compact absorbs the records nobody will write again into this process's
// record and deletes them, under the storage's lock so that two starting
// writers do not both absorb one record. It runs once, at the first
// interval that can take the lock.
func (c *usageCounter) compact(ctx context.Context) error {
	lock := "xks_usage_" + c.label
	if err := c.storage.Lock(ctx, lock); err != nil {
		return fmt.Errorf("locking the usage records of %s: %w", c.label, err)
	}
	defer func() {
		if err := c.storage.Unlock(context.WithoutCancel(ctx), lock); err != nil {
			c.logger.Error("unlocking the usage records", zap.String("label", c.label), zap.Error(err))
		}
	}()
	c.mu.Lock()
	defer c.mu.Unlock()
	recs, err := readUsage(ctx, c.storage, c.label)
	if err != nil {
		return err
	}
	now := time.Now()
	var take []usageRecord
	for _, r := range recs {
		// A count no fleet can reach stays where it is, counting as the
		// limit reached: added to this process's own count it would wrap.
		if r.name != c.writer && r.Encryptions <= maxPlausibleEncryptions &&
			(r.Clean || r.silent(now) > max(absorbAfter, 100*r.interval())) {
			take = append(take, r)
		}
	}
	if len(take) > 0 {
		if err := c.checkOwn(ctx); err != nil {
			return err
		}
		sum := sumUsage(take, now)
		taken := make([]string, 0, len(take))
		for _, r := range take {
			taken = append(taken, r.name)
		}
		// What the others add up to without the records taken: the own
		// count grows first, so that the total is too high for an instant,
		// never too low.
		rest := sumUsage(recs, now, append(taken, c.writer)...)
		addSatAtomic(&c.own, sum.encryptions)
		c.ownDecrypts.Add(sum.decryptions)
		c.others.Store(rest.encryptions)
		c.othersDecrypts.Store(rest.decryptions)
		c.flushed += sum.encryptions // absorbed, not encrypted: not in the rate
		if sum.lastDecrypt > c.lastDecrypt.Load() {
			c.lastDecrypt.Store(sum.lastDecrypt)
		}
		c.absorbed = append(c.absorbed, taken...)
		if err := c.store(ctx, false); err != nil {
			return err
		}
		c.deleteAbsorbed(ctx)
	}
	c.compacted = true
	return nil
}

// deleteAbsorbed deletes the records this one absorbed; those it cannot
// delete stay named in it.
func (c *usageCounter) deleteAbsorbed(ctx context.Context) {
	var left []string
	for _, name := range c.absorbed {
		err := c.storage.Delete(ctx, c.key(name))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			left = append(left, name)
		}
	}
	c.absorbed = left
}

// warnImplausible logs, once per record, a count no fleet can reach.
func (c *usageCounter) warnImplausible(names []string) {
	for _, name := range names {
		if c.warned[name] {
			continue
		}
		if c.warned == nil {
			c.warned = map[string]bool{}
		}
		c.warned[name] = true
		c.logger.Error("a key usage record holds a count no fleet can reach; it counts as the encryption limit reached",
			zap.String("label", c.label), zap.String("record", c.key(name)))
	}
}

// readUsage reads every record of label.
func readUsage(ctx context.Context, storage certmagic.Storage, label string) ([]usageRecord, error) {
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
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		raw, err := storage.Load(ctx, path.Join(dir, name))
		if errors.Is(err, fs.ErrNotExist) {
			continue // absorbed and deleted since the listing
		}
		if err != nil {
			return nil, fmt.Errorf("reading the usage record %s: %w", k, err)
		}
		var r usageRecord
		if err := json.Unmarshal(raw, &r); err != nil {
			return nil, fmt.Errorf("the usage record %s is not valid: %w", k, err)
		}
		r.name = strings.TrimSuffix(name, ".json")
		out = append(out, r)
	}
	return out, nil
}

// ReadUsage is the fleet's count of Encrypts and Decrypts with an HSM key
// label, from the records in storage (counting what a process that stopped
// without its last write can have lost as used), and the fleet's Encrypts
// per second (the processes that have not stopped).
//
// A label that is not a valid external key id is an error: its path in
// storage could lead out of the usage records ("../..").
func ReadUsage(ctx context.Context, storage certmagic.Storage, label string) (encrypts, decrypts uint64, rate float64, err error) {
	if !validKeyID(label) {
		return 0, 0, 0, fmt.Errorf("reading usage: %q is not a valid external key id, and no usage is recorded under it", label)
	}
	recs, err := readUsage(ctx, storage, label)
	s := sumUsage(recs, time.Now())
	return s.encryptions, s.decryptions, s.rate, err
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
			if !c.compacted {
				if err := c.compact(ctx); err != nil {
					c.logger.Warn("old key usage records not absorbed; they still count, and this is tried again at the next interval",
						zap.String("label", c.label), zap.Error(err))
				}
			}
			if err := c.write(ctx, false); err != nil {
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
	if c.releaseStorage {
		defer releaseUsageStore(c.storageConfig)
	}
	if err := c.write(ctx, true); err != nil {
		c.logger.Error("key usage count not written at stop: the fleet counts a flush interval as used",
			zap.String("label", c.label), zap.Uint64("unwritten_encryptions", c.own.Load()-c.writtenEncryptions()), zap.Error(err))
		return err
	}
	return nil
}

// writtenEncryptions is the count the record last written holds.
func (c *usageCounter) writtenEncryptions() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.written == nil {
		return 0
	}
	return c.written.Encryptions
}

// counters holds the usage counters of the process, by label, across config
// reloads: a reload must neither lose a count nor start a second counter.
var counters = caddy.NewUsagePool()

// acquireCounter returns the process's counter of label, writing its first
// record and reading the fleet's the first time. release must be called
// when the config is done with it.
func acquireCounter(ctx context.Context, usage usageSettings, label string, logger *zap.Logger) *usageCounter {
	if !validKeyID(label) {
		// Callers pass only valid key ids; a label that is not one must
		// never become a storage path.
		panic(fmt.Sprintf("xks: usage counter for an invalid label %q", label))
	}
	v, _, _ := counters.LoadOrNew(label, func() (caddy.Destructor, error) {
		c := &usageCounter{
			label: label, instance: usage.instance, interval: usage.interval, logger: logger,
			stop: make(chan struct{}), done: make(chan struct{}),
		}
		c.writer, c.flushedAt = c.newWriter(), time.Now()
		// The counter's own hold on a storage the handler opened for the
		// counters (usageStores), which it holds open already: the
		// counter outlives the handler.
		c.storage = usage.storage
		if usage.storageConfig != nil {
			if storage, err := acquireUsageStore(usage.storageConfig); err == nil {
				c.storage, c.storageConfig, c.releaseStorage = storage, usage.storageConfig, true
			} else {
				logger.Error("opening the storage for key usage records; writing through the handler's until it is unloaded",
					zap.String("label", label), zap.Error(err))
			}
		}
		if err := c.write(ctx, false); err != nil {
			// Counting goes on in memory; the records are written and read
			// at the next interval. Refusing the config would take the
			// proxy down for want of a count.
			logger.Error("key usage record not written; counting in memory until it can be",
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

// instanceID is the first part of this process's usage record names:
// Caddy's instance id, or if Caddy cannot keep one (a data directory it
// cannot write), the host name. It tells people which instance wrote a
// record; the random part of the name keeps writers apart.
func instanceID(logger *zap.Logger) string {
	id, err := caddy.InstanceID()
	if err == nil {
		return id.String()
	}
	host, herr := os.Hostname()
	if herr != nil {
		host = "unknown"
	}
	logger.Warn("Caddy's instance id is not available; key usage records are named by the host name",
		zap.String("host", host), zap.Error(err))
	return "host-" + host
}
