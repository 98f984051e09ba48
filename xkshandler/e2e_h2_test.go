package xkshandler_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Attacker speaks raw HTTP/2 frames to the proxy over TLS, as a client
// that does not follow the protocol's courtesies would: it opens streams
// without regard to the server's limit and never sends their bodies.
type h2Attacker struct {
	t     *testing.T
	conn  *tls.Conn
	fr    *http2.Framer
	wmu   sync.Mutex // the framer's writes: the test's and the reader's acks
	enc   *hpack.Encoder
	hbuf  bytes.Buffer
	next  uint32 // the next stream id
	reset atomic.Int64
	// maxStreams is the server's SETTINGS_MAX_CONCURRENT_STREAMS, 0 until
	// its SETTINGS arrived.
	maxStreams atomic.Uint32
	settled    chan struct{} // closed once the server's SETTINGS were acked
	done       chan struct{} // closed when the reader stops
}

// dialH2 opens a TLS connection that negotiates h2 and exchanges the
// connection preface and SETTINGS.
func dialH2(t *testing.T, port int, caFile string) *h2Attacker {
	t.Helper()
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	conn, err := tls.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		&tls.Config{ServerName: "localhost", RootCAs: roots, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	if p := conn.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("negotiated %q, want h2", p)
	}
	a := &h2Attacker{t: t, conn: conn, fr: http2.NewFramer(conn, conn), next: 1, settled: make(chan struct{}), done: make(chan struct{})}
	a.enc = hpack.NewEncoder(&a.hbuf)
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	a.write(func() error { return a.fr.WriteSettings() })
	go a.read()
	select {
	case <-a.settled:
	case <-a.done:
		t.Fatal("the connection closed before the server's SETTINGS")
	}
	return a
}

func (a *h2Attacker) write(f func() error) {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	if err := f(); err != nil {
		a.t.Errorf("writing a frame: %v", err)
	}
}

// read acks the server's SETTINGS and PINGs and counts the streams it
// resets, until the connection closes.
func (a *h2Attacker) read() {
	defer close(a.done)
	var once sync.Once
	for {
		f, err := a.fr.ReadFrame()
		if err != nil {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() {
				continue
			}
			if v, ok := f.Value(http2.SettingMaxConcurrentStreams); ok {
				a.maxStreams.Store(v)
			}
			a.write(func() error { return a.fr.WriteSettingsAck() })
			once.Do(func() { close(a.settled) })
		case *http2.PingFrame:
			if !f.IsAck() {
				a.write(func() error { return a.fr.WritePing(true, f.Data) })
			}
		case *http2.RSTStreamFrame:
			a.reset.Add(1)
		case *http2.GoAwayFrame:
			a.t.Errorf("the server sent GOAWAY (%v) on an open connection", f.ErrCode)
		}
	}
}

// openStreams sends n HEADERS frames, each a POST to path that declares a
// body of declared bytes, and sends no body.
func (a *h2Attacker) openStreams(n int, path string, declared int) {
	for range n {
		a.hbuf.Reset()
		for _, hf := range []hpack.HeaderField{
			{Name: ":method", Value: "POST"},
			{Name: ":scheme", Value: "https"},
			{Name: ":authority", Value: "localhost"},
			{Name: ":path", Value: path},
			{Name: "content-type", Value: "application/json"},
			{Name: "content-length", Value: strconv.Itoa(declared)},
		} {
			if err := a.enc.WriteField(hf); err != nil {
				a.t.Fatal(err)
			}
		}
		id := a.next
		a.next += 2
		a.write(func() error {
			return a.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: a.hbuf.Bytes(), EndHeaders: true})
		})
	}
}

// goroutinesIn counts the goroutines whose stack holds fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return bytes.Count(buf[:n], []byte(fn+"("))
		}
		buf = make([]byte, 2*len(buf))
	}
}

// liveHeap is the heap in use after a full collection.
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC() // the second also empties what sync.Pools kept from the first
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// maxAttackHeapGrowth bounds what one connection of unsigned HEADERS may
// make the proxy hold: the server lets it have defaultStreams requests
// open, and each holds some 12 KiB (the request, Caddy's state for it, the
// HTTP/2 response writer's 4 KiB buffer, and the first 2 KiB of a body)
// while its body does not come.
const (
	maxAttackHeapGrowth = 512 << 10
	defaultStreams      = 32
)

// TestUnsignedHTTP2BodiesHoldNoMemory: a client that knows a key store's
// path, and nothing else, opens 240 HTTP/2 streams on one TLS connection,
// each an Encrypt that declares a 64 KiB body and never sends it. What the
// proxy holds for them while they wait must grow with the bytes that
// arrived, not with the bytes declared, and with the streams the server
// allows, not with those the client opens: the heap grows by at most
// maxAttackHeapGrowth. (Reading the declared length at once, the proxy
// held 17 MiB.)
//
// The heap is measured in this process, where Caddy runs: live bytes after
// a full collection, before the first HEADERS frame and once every stream
// is either reset by the server or has its handler waiting in readBody
// (seen in the goroutines' stacks), so that no allocation of the attack is
// still to come.
func TestUnsignedHTTP2BodiesHoldNoMemory(t *testing.T) {
	const streams, declared = 240, 64 << 10
	f := newFixture(t)
	a := dialH2(t, f.proxy.HTTPSPort, f.cert)
	// The proxy is warm and the connection set up: what grows from here
	// is the attack's.
	before := liveHeap()
	a.openStreams(streams, "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", declared)
	// Every stream is either refused by the server (reset) or has its
	// handler waiting for the body.
	const waiting = "github.com/caddy-xks/caddy-xks/xkshandler.readBody"
	deadline := time.Now().Add(2 * time.Minute)
	for {
		w := goroutinesIn(waiting)
		if w+int(a.reset.Load()) >= streams {
			break
		}
		select {
		case <-a.done:
			t.Fatalf("the connection closed with %d handlers waiting and %d streams reset", w, a.reset.Load())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 2m, %d handlers wait for a body and %d streams were reset, of %d", w, a.reset.Load(), streams)
		}
		time.Sleep(10 * time.Millisecond)
	}
	after := liveHeap()
	held := goroutinesIn(waiting)
	growth := int64(after) - int64(before) //nolint:gosec // heap sizes, far below 2^63
	t.Logf("%d streams declaring %d bytes each: %d handlers waiting, %d streams reset (server's MAX_CONCURRENT_STREAMS %d); heap %d KiB -> %d KiB, growth %d KiB",
		streams, declared, held, a.reset.Load(), a.maxStreams.Load(), before>>10, after>>10, growth>>10)
	if growth > maxAttackHeapGrowth {
		t.Errorf("the heap grew by %d KiB for bodies that never came, want at most %d KiB", growth>>10, maxAttackHeapGrowth>>10)
	}
	if held > defaultStreams {
		t.Errorf("%d handlers wait for a body on one connection, want at most the %d streams the server allows", held, defaultStreams)
	}
	_ = a.conn.Close()
	<-a.done
}
