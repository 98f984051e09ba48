package fleet_test

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The hosts of the fleet, on one bridge: every address is in
// 198.18.0.0/24 (RFC 2544's benchmarking range, used nowhere real), and no
// namespace has a default route. Each host has a port space of its own, so
// the fixed ports below cannot meet another test's.
const (
	harnessAddr = "198.18.0.5" // the test itself: Pebble, the load
	lbAddr      = "198.18.0.10"
	redisAddr   = "198.18.0.20"
	fleetFQDN   = "xks.test"
	ekmFQDN     = "ekm.test" // Caddyfile.example's Azure EKM site, with a certificate of its own
	pebblePort  = 14000
	readyPort   = 8081
)

// proxyAddrs are the three proxies' addresses.
var proxyAddrs = [3]string{"198.18.0.11", "198.18.0.12", "198.18.0.13"}

// outside is an address outside the test's network (TEST-NET-1): a dial to
// it must fail at once with "network is unreachable".
const outside = "192.0.2.1:443"

// network is the test's hosts: a network namespace each, joined by a
// bridge in a namespace of its own, with the test's own namespace on the
// bridge too.
type network struct {
	prefix string
	hosts  []string // namespace names, the bridge's last
}

// ns is the namespace name of host.
func (n *network) ns(host string) string { return n.prefix + "-" + host }

// run runs a command and fails the test with its output if it fails.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newNetwork makes the hosts lb, p1 to p3 and redis, and puts the test's
// own namespace on their bridge. It is removed when the test ends,
// processes and all.
func newNetwork(t *testing.T) *network {
	t.Helper()
	// Names of at most 15 bytes, unique on the machine while the test runs.
	n := &network{prefix: fmt.Sprintf("xf%d", os.Getpid())}
	t.Cleanup(n.destroy)
	sw := n.ns("sw")
	run(t, "ip", "netns", "add", sw)
	n.hosts = append(n.hosts, sw)
	run(t, "ip", "-n", sw, "link", "add", "br0", "type", "bridge")
	run(t, "ip", "-n", sw, "link", "set", "br0", "up")
	hosts := map[string]string{"lb": lbAddr, "redis": redisAddr}
	for i, a := range proxyAddrs {
		hosts[fmt.Sprintf("p%d", i+1)] = a
	}
	for host, addr := range hosts {
		ns := n.ns(host)
		run(t, "ip", "netns", "add", ns)
		n.hosts = append([]string{ns}, n.hosts...)
		run(t, "ip", "-n", ns, "link", "set", "lo", "up")
		run(t, "ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "v-"+host, "netns", sw)
		n.plug(t, host, addr)
	}
	// The test's own namespace: made for it by the process that started
	// it, with nothing in it until now.
	run(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "v-test", "netns", sw)
	run(t, "ip", "-n", sw, "link", "set", "v-test", "master", "br0", "up")
	run(t, "ip", "addr", "add", harnessAddr+"/24", "dev", "eth0")
	run(t, "ip", "link", "set", "eth0", "up")
	for host := range hosts {
		if out, err := exec.Command("ip", "-n", n.ns(host), "route", "get", "192.0.2.1").CombinedOutput(); err == nil ||
			!strings.Contains(string(out), "Network is unreachable") {
			t.Fatalf("host %s has a route off the test's network: %s", host, out)
		}
	}
	assertNoRouteOut(t)
	return n
}

// plug connects host's eth0 to the bridge, with addr.
func (n *network) plug(t *testing.T, host, addr string) {
	t.Helper()
	ns, sw := n.ns(host), n.ns("sw")
	run(t, "ip", "-n", sw, "link", "set", "v-"+host, "master", "br0", "up")
	run(t, "ip", "-n", ns, "addr", "add", addr+"/24", "dev", "eth0")
	run(t, "ip", "-n", ns, "link", "set", "eth0", "up")
}

// cut takes host off the bridge, as a lost host or a partition: its peers
// get no answer at all, not even a reset.
func (n *network) cut(t *testing.T, host string) {
	t.Helper()
	run(t, "ip", "-n", n.ns("sw"), "link", "set", "v-"+host, "down")
}

// mend puts host back on the bridge.
func (n *network) mend(t *testing.T, host string) {
	t.Helper()
	run(t, "ip", "-n", n.ns("sw"), "link", "set", "v-"+host, "up")
}

// destroy kills what runs in the namespaces and removes them.
func (n *network) destroy() {
	for _, ns := range n.hosts {
		out, _ := exec.Command("ip", "netns", "pids", ns).Output()
		for pid := range strings.FieldsSeq(string(out)) {
			_ = exec.Command("kill", "-KILL", pid).Run()
		}
	}
	for _, ns := range n.hosts {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
}

// assertIsolated fails the test unless it runs in a network namespace
// other than parent's (the namespace of the process that started it), in
// which there is no default route and a dial off the test's network fails
// with "network is unreachable".
func assertIsolated(t *testing.T, parent string) {
	t.Helper()
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if parent == "" || parent == self {
		t.Fatalf("the fleet test runs in the network namespace of the process that started it (%s, its own: %s): it must not", parent, self)
	}
	routes, err := os.Open("/proc/net/route")
	if err != nil {
		t.Fatal(err)
	}
	defer routes.Close()
	s := bufio.NewScanner(routes)
	for s.Scan() {
		if f := strings.Fields(s.Text()); len(f) > 2 && f[1] == "00000000" {
			t.Fatalf("the test's namespace has a default route: %s", s.Text())
		}
	}
	assertNoRouteOut(t)
}

// assertNoRouteOut fails the test unless a dial off its network fails at
// once as unreachable (over IPv6, where the namespace has no address at
// all, as having no address to send from).
func assertNoRouteOut(t *testing.T) {
	t.Helper()
	for addr, want := range map[string][]error{
		outside:             {syscall.ENETUNREACH},
		"[2001:db8::1]:443": {syscall.ENETUNREACH, syscall.EADDRNOTAVAIL},
	} {
		c, err := net.DialTimeout("tcp", addr, time.Minute)
		if err == nil {
			_ = c.Close()
			t.Fatalf("a dial to %s from the test's namespace connected: it must fail", addr)
		}
		if !slices.ContainsFunc(want, func(e error) bool { return errors.Is(err, e) }) {
			t.Fatalf("a dial to %s from the test's namespace failed with %v, want %v", addr, err, want)
		}
	}
}

// process is a program running on one of the hosts.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// start runs bin on host, its output in a log file of dir. It is killed
// when the test ends, and when the test process dies.
func (n *network) start(t *testing.T, host, dir, name string, env []string, bin string, args ...string) *process {
	t.Helper()
	p := &process{name: name, log: filepath.Join(dir, name+".log"), done: make(chan struct{})}
	out, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	// ip netns exec execs bin itself: a signal to the process is a signal
	// to bin.
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", n.ns(host), bin}, args...)...)
	p.cmd.Env, p.cmd.Stdout, p.cmd.Stderr = env, out, out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() {
		_ = p.cmd.Wait()
		_ = out.Close()
		close(p.done)
	}()
	t.Cleanup(func() { p.stop(syscall.SIGKILL) })
	return p
}

// running reports whether the process has not exited.
func (p *process) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// signal sends sig, if the process runs.
func (p *process) signal(sig syscall.Signal) {
	if p.running() {
		_ = p.cmd.Process.Signal(sig)
	}
}

// stop sends sig and waits for the process to exit.
func (p *process) stop(sig syscall.Signal) {
	p.signal(sig)
	<-p.done
}

// output is what the process has logged so far.
func (p *process) output() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}
