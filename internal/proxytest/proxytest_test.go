package proxytest

import (
	"context"
	"net"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestListeningSocketsCountsTheKernelsSockets: two sockets on one port with
// SO_REUSEPORT, as Caddy's old and new config hold during a reload, count
// as two until one is closed.
func TestListeningSocketsCountsTheKernelsSockets(t *testing.T) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	first, err := lc.Listen(context.Background(), "tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	port := first.Addr().(*net.TCPAddr).Port
	second, err := lc.Listen(context.Background(), "tcp", first.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if n, err := listeningSockets(port); n != 2 || err != nil {
		t.Fatalf("two sockets listen: counted %d, %v", n, err)
	}
	if err := second.Close(); err != nil {
		t.Fatal(err)
	}
	if n, err := listeningSockets(port); n != 1 || err != nil {
		t.Fatalf("one socket listens: counted %d, %v", n, err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if n, err := listeningSockets(port); n != 0 || err != nil {
		t.Fatalf("none listens: counted %d, %v", n, err)
	}
}
