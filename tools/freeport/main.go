// Command freeport prints TCP ports that the kernel picked as free, one per
// line, for scripts that start a server and must not share a fixed port with
// another run on the same machine (Caddy binds with SO_REUSEPORT, so two
// servers on one port silently split each other's connections).
//
//	go run ./tools/freeport [count]
package main

import (
	"fmt"
	"net"
	"os"
	"strconv"
)

func main() {
	n := 1
	if len(os.Args) > 1 {
		var err error
		if n, err = strconv.Atoi(os.Args[1]); err != nil || n < 1 || n > 16 {
			fmt.Fprintln(os.Stderr, "usage: freeport [count 1-16]")
			os.Exit(2)
		}
	}
	// Hold every listener until all are picked, so that the ports differ.
	listeners := make([]net.Listener, 0, n)
	for range n {
		// Every interface, as Caddy binds: the port must be free on all.
		l, err := net.Listen("tcp", ":0") //nolint:gosec // closed at once; see above
		if err != nil {
			fmt.Fprintln(os.Stderr, "freeport:", err)
			os.Exit(1)
		}
		listeners = append(listeners, l)
	}
	for _, l := range listeners {
		fmt.Println(l.Addr().(*net.TCPAddr).Port)
		_ = l.Close()
	}
}
