package xkscmd

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// benchOp is one kind of request in the load's mix.
type benchOp struct {
	name   string
	weight int
	path   string
	body   []byte
}

// parseMix reads --mix, e.g. "encrypt=3,decrypt=1".
func parseMix(s string) (map[string]int, error) {
	mix := make(map[string]int)
	for part := range strings.SplitSeq(s, ",") {
		name, w, found := strings.Cut(strings.TrimSpace(part), "=")
		n := 1
		if found {
			var err error
			if n, err = strconv.Atoi(w); err != nil || n < 0 {
				return nil, fmt.Errorf("--mix %q: weight of %s must be a whole number", s, name)
			}
		}
		switch name {
		case "encrypt", "decrypt", "metadata", "health":
			mix[name] = n
		default:
			return nil, fmt.Errorf("--mix %q: unknown operation %q (encrypt, decrypt, metadata, health)", s, name)
		}
	}
	return mix, nil
}

// benchMetadata is the requestMetadata of the load's calls.
var benchMetadata = xksapi.RequestMetadata{
	AWSPrincipalARN: "arn:aws:iam::111122223333:role/caddy-xks-bench",
	KMSKeyARN:       "arn:aws:kms:us-east-1:111122223333:key/caddy-xks-bench",
	KMSOperation:    "Encrypt",
	KMSRequestID:    "caddy-xks-bench",
}

// benchOps builds the mix's requests. Decrypt needs a ciphertext, which is
// made with one Encrypt first.
func benchOps(ctx context.Context, c *xksClient, key string, mix map[string]int, plaintextLen int, raw bool) ([]benchOp, error) {
	pt := make([]byte, plaintextLen)
	if _, err := rand.Read(pt); err != nil {
		return nil, err
	}
	encryptBody := mustJSON(xksapi.EncryptRequest{RequestMetadata: benchMetadata, Plaintext: pt, Algorithm: "AES_GCM"})
	if raw {
		// A route that is not the XKS API: the same signed Encrypt request,
		// sent to the URL as given, for a baseline of TLS and HTTP alone.
		return []benchOp{{name: "raw", weight: 1, body: encryptBody}}, nil
	}
	keyPath := "/keys/" + key + "/"
	var ops []benchOp
	for _, name := range []string{"encrypt", "decrypt", "metadata", "health"} {
		w := mix[name]
		if w == 0 {
			continue
		}
		op := benchOp{name: name, weight: w}
		switch name {
		case "encrypt":
			op.path, op.body = keyPath+"encrypt", encryptBody
		case "metadata":
			op.path, op.body = keyPath+"metadata", mustJSON(xksapi.MetadataOnlyRequest{RequestMetadata: benchMetadata})
		case "health":
			op.path, op.body = "/health", mustJSON(xksapi.MetadataOnlyRequest{RequestMetadata: xksapi.RequestMetadata{KMSOperation: "KmsHealthCheck", KMSRequestID: "caddy-xks-bench"}})
		case "decrypt":
			r, err := c.call(ctx, http.MethodPost, keyPath+"encrypt", encryptBody, nil)
			if err != nil {
				return nil, fmt.Errorf("making a ciphertext to decrypt: %w", err)
			}
			if r.status != http.StatusOK {
				return nil, fmt.Errorf("making a ciphertext to decrypt: %s: %s", r.errorName(), r.body)
			}
			var sealed xksapi.EncryptResponse
			if err := json.Unmarshal(r.body, &sealed); err != nil {
				return nil, fmt.Errorf("making a ciphertext to decrypt: %w", err)
			}
			op.path = keyPath + "decrypt"
			op.body = mustJSON(decryptRequestFor(benchMetadata, sealed, nil))
		}
		ops = append(ops, op)
	}
	if len(ops) == 0 {
		return nil, errors.New("--mix has no operation with a weight above 0")
	}
	return ops, nil
}

// benchStats collects the answers of a load run.
type benchStats struct {
	mu        sync.Mutex
	latencies []time.Duration
	// paced is a load at a fixed rate; late is then how long after it was
	// due each call was sent, part of every latency: the client's own
	// delay, and the server's once every worker is waiting for an answer.
	paced  bool
	late   []time.Duration
	errors map[string]int
	// due is the number of calls a paced load was to send in its
	// duration; each is sent, or not sent because the run ended first.
	due      int64
	ok, sent atomic.Int64
}

func (s *benchStats) record(r result, err error, latency, late time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.paced {
		s.late = append(s.late, late)
	}
	switch {
	case err != nil:
		s.errors["transport: "+shortError(err)]++
	case r.status != http.StatusOK:
		s.errors[r.errorName()]++
	default:
		s.ok.Add(1)
		s.latencies = append(s.latencies, latency)
	}
}

func shortError(err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return msg
}

// percentile of sorted latencies, nearest rank.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(i, 0)]
}

// runLoad sends the mix for the duration: at a fixed rate (latency counted
// from when each request was due, so a stalled server cannot hide its
// queue) or, with rate 0, as fast as concurrency allows.
func runLoad(ctx context.Context, c *xksClient, ops []benchOp, rate float64, concurrency int, duration time.Duration, progress io.Writer) *benchStats {
	stats := &benchStats{errors: make(map[string]int), paced: rate > 0}
	var schedule []int // ops indexes by weight, cycled through
	for i, op := range ops {
		for range op.weight {
			schedule = append(schedule, i)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, duration)
	defer cancel()
	due := make(chan time.Time, concurrency)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range concurrency {
		wg.Go(func() {
			for at := range due {
				late := time.Since(at)
				op := ops[schedule[int(next.Add(1)-1)%len(schedule)]]
				r, err := c.call(context.Background(), http.MethodPost, op.path, op.body, nil)
				stats.record(r, err, time.Since(at), late)
			}
		})
	}
	start := time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tick.C:
				elapsed := now.Sub(start).Seconds()
				fmt.Fprintf(progress, "  %4.0fs  sent %d  ok %d  %.0f req/s\n", elapsed, stats.sent.Load(), stats.ok.Load(), float64(stats.ok.Load())/elapsed)
			}
		}
	}()
	if rate > 0 {
		interval := time.Duration(float64(time.Second) / rate)
		// The calls due before the end: n*interval < duration.
		stats.due = int64((duration + interval - 1) / interval)
		for n := 0; ; n++ {
			at := start.Add(time.Duration(n) * interval)
			// A call due at the end itself is not part of the run: without
			// this, the timer and the deadline race, and a run sends one
			// call more than its rate times its duration now and then.
			if !at.Before(start.Add(duration)) {
				break
			}
			if d := time.Until(at); d > 0 {
				select {
				case <-ctx.Done():
				case <-time.After(d):
				}
			}
			if ctx.Err() != nil {
				break
			}
			select {
			case due <- at:
				stats.sent.Add(1)
			case <-ctx.Done():
			}
		}
	} else {
		for ctx.Err() == nil {
			select {
			case due <- time.Now():
				stats.sent.Add(1)
			case <-ctx.Done():
			}
		}
	}
	close(due)
	wg.Wait()
	<-done
	return stats
}

func cmdBench(fl caddycmd.Flags, out io.Writer) (int, error) {
	target := fl.Arg(0)
	if target == "" {
		return caddy.ExitCodeFailedStartup, errors.New("usage: caddy xks bench <key store URL> (see --help)")
	}
	concurrency := fl.Int("concurrency")
	if concurrency < 1 {
		return caddy.ExitCodeFailedStartup, errors.New("--concurrency must be at least 1")
	}
	duration := fl.Duration("duration")
	if duration <= 0 || duration > time.Hour {
		return caddy.ExitCodeFailedStartup, errors.New("--duration must be between 0 and 1h")
	}
	mix, err := parseMix(fl.String("mix"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	c, err := clientFromFlags(fl, target, concurrency)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	ctx := context.Background()
	ops, err := benchOps(ctx, c, fl.String("key"), mix, fl.Int("plaintext"), fl.Bool("raw"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	rate := fl.Float64("rate")
	mode := "as fast as possible"
	if rate > 0 {
		mode = fmt.Sprintf("at %.0f req/s", rate)
	}
	fmt.Fprintf(os.Stderr, "%s: %s for %s, %d concurrent\n", c.base, mode, duration, concurrency)
	// With a server on the same cores, its CPU time and this client's:
	// together they are what a request costs the machine.
	var server, client *processCPUMeter
	if pid := fl.Int("server-pid"); pid != 0 {
		if server, err = startProcessCPU("server", pid); err != nil {
			return caddy.ExitCodeFailedStartup, fmt.Errorf("--server-pid: %w", err)
		}
		if client, err = startProcessCPU("client", os.Getpid()); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
	}
	stats := runLoad(ctx, c, ops, rate, concurrency, duration, os.Stderr)
	printBench(out, stats, duration)
	fmt.Fprintf(out, "protocol  %s\n", c.protocols)
	for _, m := range []*processCPUMeter{server, client} {
		if m == nil {
			continue
		}
		if err := m.print(out, stats.ok.Load()+int64(stats.failed())); err != nil {
			return caddy.ExitCodeFailedStartup, err
		}
	}
	if len(stats.errors) > 0 {
		return caddy.ExitCodeFailedStartup, errors.New("some requests failed (see the errors above)")
	}
	return caddy.ExitCodeSuccess, nil
}

// failed counts the calls that got no answer or an error.
func (s *benchStats) failed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, e := range s.errors {
		n += e
	}
	return n
}

func printBench(w io.Writer, s *benchStats, duration time.Duration) {
	slices.Sort(s.latencies)
	slices.Sort(s.late)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	// Every call is accounted for: a paced one due is sent or not sent, a
	// sent one answered ok or failed.
	if s.paced {
		fmt.Fprintf(tw, "calls\t%d due, %d sent, %d not sent before the end\n", s.due, s.sent.Load(), s.due-s.sent.Load())
	} else {
		fmt.Fprintf(tw, "calls\t%d sent\n", s.sent.Load())
	}
	fmt.Fprintf(tw, "requests\t%d ok, %d failed\n", s.ok.Load(), s.failed())
	fmt.Fprintf(tw, "throughput\t%.0f req/s\n", float64(s.ok.Load())/duration.Seconds())
	// p99.9 and max are what a paced run is judged by: KMS gives a call
	// 250 ms, and at 1,800 req/s one call in a thousand is two a second.
	for _, p := range []float64{50, 90, 99, 99.9} {
		fmt.Fprintf(tw, "p%g\t%s\n", p, percentile(s.latencies, p).Round(time.Microsecond))
	}
	if n := len(s.latencies); n > 0 {
		fmt.Fprintf(tw, "max\t%s\n", s.latencies[n-1].Round(time.Microsecond))
	}
	if n := len(s.late); n > 0 {
		fmt.Fprintf(tw, "sent late\tp50 %s, p99 %s, max %s\n", percentile(s.late, 50).Round(time.Microsecond),
			percentile(s.late, 99).Round(time.Microsecond), s.late[n-1].Round(time.Microsecond))
	}
	names := make([]string, 0, len(s.errors))
	for name := range s.errors {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Fprintf(tw, "error\t%s: %d\n", name, s.errors[name])
	}
	tw.Flush()
}

// processCPUMeter measures the CPU time a process on this machine spends
// during a run, from /proc/<pid>/stat: what the proxy (or the client)
// costs per request, whoever else shares the cores.
type processCPUMeter struct {
	name  string
	pid   int
	start time.Duration
}

func startProcessCPU(name string, pid int) (*processCPUMeter, error) {
	t, err := processCPU(pid)
	if err != nil {
		return nil, err
	}
	return &processCPUMeter{name: name, pid: pid, start: t}, nil
}

// print writes the process's CPU time per request since the run started.
func (c *processCPUMeter) print(w io.Writer, requests int64) error {
	t, err := processCPU(c.pid)
	if err != nil {
		return fmt.Errorf("%s cpu: %w", c.name, err)
	}
	used := t - c.start
	per := time.Duration(0)
	if requests > 0 {
		per = used / time.Duration(requests)
	}
	fmt.Fprintf(w, "%s cpu  %s in all, %s per request\n", c.name, used.Round(time.Millisecond), per.Round(100*time.Nanosecond))
	return nil
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// processCPU returns the user plus system time of process pid and of its
// threads, living and exited.
func processCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces;
	// utime and stime are fields 14 and 15, the 12th and 13th after it.
	i := strings.LastIndexByte(string(b), ')')
	fields := strings.Fields(string(b[i+1:]))
	if i < 0 || len(fields) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	var ticks int64
	for _, f := range fields[11:13] {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}
