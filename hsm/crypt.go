package hsm

/*
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef unsigned char CK_BYTE;

// The PKCS#11 v2.40 CK_FUNCTION_LIST: a CK_VERSION, then the standard's 68
// function pointers in its order. C_Encrypt is the 31st, C_Decrypt the 35th.
typedef struct {
	struct { unsigned char major, minor; } version;
	void *fn[68];
} function_list;

enum { fn_encrypt = 30, fn_decrypt = 34 };

typedef CK_RV (*crypt_fn)(CK_ULONG, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);

// function_list_of loads path (the module miekg/pkcs11 loaded already, so
// the same handle and the same module state) and returns its function list.
static function_list *function_list_of(const char *path) {
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h)
		return NULL;
	CK_RV (*get)(function_list **) = (CK_RV(*)(function_list **))dlsym(h, "C_GetFunctionList");
	function_list *list = NULL;
	if (!get || get(&list) != 0)
		return NULL;
	return list;
}

static CK_RV crypt_call(function_list *l, int fn, CK_ULONG session, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out, CK_ULONG *out_len) {
	return ((crypt_fn)l->fn[fn])(session, in, in_len, out, out_len);
}

// A lane is a thread of its own that makes one crypt call at a time for a
// goroutine, and says it is done by writing to its eventfd, which the
// goroutine reads through Go's network poller.
typedef struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int pending;
	int efd;
	function_list *l;
	int fn;
	CK_ULONG session, in_len, out_len;
	CK_BYTE *in, *out;
	CK_RV rv;
} lane;

static void *lane_main(void *arg) {
	lane *ln = arg;
	for (;;) {
		pthread_mutex_lock(&ln->mu);
		while (!ln->pending)
			pthread_cond_wait(&ln->cv, &ln->mu);
		function_list *l = ln->l;
		int fn = ln->fn;
		CK_ULONG session = ln->session, in_len = ln->in_len, n = ln->out_len;
		CK_BYTE *in = ln->in, *out = ln->out;
		pthread_mutex_unlock(&ln->mu);

		CK_RV rv = crypt_call(l, fn, session, in, in_len, out, &n);

		pthread_mutex_lock(&ln->mu);
		ln->rv = rv;
		ln->out_len = n;
		ln->pending = 0;
		pthread_mutex_unlock(&ln->mu);
		uint64_t one = 1;
		while (write(ln->efd, &one, sizeof one) < 0 && errno == EINTR)
			;
	}
	return NULL;
}

// lane_new starts a lane; NULL if the process is out of threads or fds.
static lane *lane_new(void) {
	lane *ln = calloc(1, sizeof *ln);
	if (!ln)
		return NULL;
	ln->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (ln->efd < 0) {
		free(ln);
		return NULL;
	}
	pthread_mutex_init(&ln->mu, NULL);
	pthread_cond_init(&ln->cv, NULL);
	pthread_attr_t attr;
	pthread_t th;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	int err = pthread_create(&th, &attr, lane_main, ln);
	pthread_attr_destroy(&attr);
	if (err) {
		close(ln->efd);
		pthread_cond_destroy(&ln->cv);
		pthread_mutex_destroy(&ln->mu);
		free(ln);
		return NULL;
	}
	return ln;
}

static int lane_fd(lane *ln) { return ln->efd; }

static void lane_submit(lane *ln, function_list *l, int fn, CK_ULONG session, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out, CK_ULONG out_len) {
	pthread_mutex_lock(&ln->mu);
	ln->l = l;
	ln->fn = fn;
	ln->session = session;
	ln->in = in;
	ln->in_len = in_len;
	ln->out = out;
	ln->out_len = out_len;
	ln->pending = 1;
	pthread_cond_signal(&ln->cv);
	pthread_mutex_unlock(&ln->mu);
}

static CK_RV lane_result(lane *ln, CK_ULONG *out_len) {
	pthread_mutex_lock(&ln->mu);
	CK_RV rv = ln->rv;
	*out_len = ln->out_len;
	pthread_mutex_unlock(&ln->mu);
	return rv;
}
*/
import "C"

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// functionList is a module's CK_FUNCTION_LIST, for the calls miekg/pkcs11
// makes in a way some modules refuse, and how long its crypt calls take.
type functionList struct {
	p     *C.function_list
	calls *callTimes
}

// loadFunctionList returns the function list of the module at path, which
// miekg/pkcs11 has loaded already.
func loadFunctionList(path string) (functionList, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	l := C.function_list_of(cpath)
	if l == nil {
		return functionList{}, fmt.Errorf("loading pkcs11 module %q: no function list", path)
	}
	return functionList{p: l, calls: new(callTimes)}, nil
}

// encrypt and decrypt are single-part C_Encrypt and C_Decrypt into an output
// buffer sized up front. miekg/pkcs11's Encrypt and Decrypt first ask the
// length with a NULL buffer, and some modules answer that query wrongly for
// AES-GCM: NSS softokn reports the plaintext's length without the 16-byte
// tag, so the real call then fails with CKR_BUFFER_TOO_SMALL. A buffer large
// enough for the longest output the mechanism can give needs no query, and
// saves a call into the module. A module that still finds it too small
// (PKCS#11 says it then reports the length it needs, and the operation stays
// active) is given that length once.
func (f functionList) encrypt(sh pkcs11.SessionHandle, in []byte, outCap int) ([]byte, error) {
	return f.crypt(C.fn_encrypt, sh, in, outCap)
}

func (f functionList) decrypt(sh pkcs11.SessionHandle, in []byte, outCap int) ([]byte, error) {
	return f.crypt(C.fn_decrypt, sh, in, outCap)
}

func (f functionList) crypt(fn C.int, sh pkcs11.SessionHandle, in []byte, outCap int) ([]byte, error) {
	// A module may not be handed a NULL input, even an empty one.
	inBuf := in
	if len(inBuf) == 0 {
		inBuf = make([]byte, 1)
	}
	for try := 0; ; try++ {
		out := make([]byte, max(outCap, 1))
		n := C.CK_ULONG(outCap)
		rv := f.call(fn, sh, inBuf, len(in), out, &n)
		switch {
		case rv == pkcs11.CKR_OK && int(n) <= outCap:
			return out[:n:n], nil
		case rv == pkcs11.CKR_BUFFER_TOO_SMALL && try == 0 && int(n) > outCap:
			outCap = int(n)
			continue
		case rv == pkcs11.CKR_OK:
			// A module that wrote past the length it was given.
			return nil, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
		}
		return nil, pkcs11.Error(rv)
	}
}

// call makes one crypt call: on the calling thread while the module answers
// in microseconds (a local token: a hand-off would cost more than the call),
// on a lane once its calls take longer than offloadAbove (a network HSM,
// whose client library blocks in C for a round trip). A goroutine in a cgo
// call keeps its thread and its P, Go's right to run Go code, and the
// runtime gives that P to other work only when sysmon retakes it, which it
// does not do within 10 ms while the P's run queue is empty and another P is
// idle (Go 1.26, runtime.retake). With as many Ps as CPUs, as Caddy runs,
// a few calls in the HSM then leave the HTTP side without a P, and at 1 and
// 5 ms per call a paced load of 1,800 requests/s on two CPUs fell behind
// and did not catch up (docs/operations.md, "Capacity at network-HSM
// latency"). A goroutine waiting for a lane waits in the network poller and
// holds neither a thread nor a P.
func (f functionList) call(fn C.int, sh pkcs11.SessionHandle, in []byte, inLen int, out []byte, n *C.CK_ULONG) C.CK_RV {
	inp, outp := (*C.CK_BYTE)(unsafe.Pointer(&in[0])), (*C.CK_BYTE)(unsafe.Pointer(&out[0]))
	start := time.Now()
	var rv C.CK_RV
	offloaded := false
	if f.calls.slow() {
		rv, offloaded = offload(f.p, fn, C.CK_ULONG(sh), inp, C.CK_ULONG(inLen), outp, n)
	}
	if !offloaded {
		rv = C.crypt_call(f.p, fn, C.CK_ULONG(sh), inp, C.CK_ULONG(inLen), outp, n)
	}
	f.calls.observe(time.Since(start), offloaded)
	return rv
}

// offloadAbove is the shortest crypt call of a window above which a
// module's calls are made on lanes: over ten times what SoftHSM2's
// C_Encrypt takes (about 6 µs on a 2-core VM), a tenth of a fast network
// round trip.
// The shortest call, not the average, because a local token under full
// load makes calls wait for one another and for a CPU, and an average of
// those passes 100 µs (measured with SoftHSM2 and 32 requests in flight),
// where lanes only add a hand-off; a network HSM never answers faster than
// its round trip.
const offloadAbove = 100 * time.Microsecond

// callWindow is how many calls each shortest call is taken over.
const callWindow = 32

// callTimes says whether a module's crypt calls are slow: the shortest of
// each window of callWindow calls decides for the next window. Concurrent
// updates at a window's end may lose a call to the next window; it only
// has to tell microseconds from milliseconds.
type callTimes struct {
	// floor is the shortest call of the last complete window, in
	// nanoseconds; 0 until one is complete.
	floor atomic.Int64
	// shortest is the shortest call of the current window plus one
	// nanosecond, 0 while it has none.
	shortest atomic.Int64
	calls    atomic.Int64
	// offloaded counts the calls made on lanes.
	offloaded atomic.Uint64
}

func (c *callTimes) slow() bool { return time.Duration(c.floor.Load()) > offloadAbove }

func (c *callTimes) observe(d time.Duration, offloaded bool) {
	v := int64(d) + 1
	for {
		m := c.shortest.Load()
		if m != 0 && m <= v {
			break
		}
		if c.shortest.CompareAndSwap(m, v) {
			break
		}
	}
	if c.calls.Add(1)%callWindow == 0 {
		// 0 when the close of the window before, racing with this
		// window's calls, took their shortest with it.
		if m := c.shortest.Swap(0); m != 0 {
			c.floor.Store(m - 1)
		}
	}
	if offloaded {
		c.offloaded.Add(1)
	}
}

// lane is a C lane and its eventfd as a pollable file.
type lane struct {
	c    *C.lane
	done *os.File
}

// lanes holds the idle lanes of the process, shared by every module. There
// are never more than the crypt calls that were in flight at once, which
// the session pools' slots bound.
var lanes struct {
	sync.Mutex
	idle []*lane
}

func getLane() *lane {
	lanes.Lock()
	if n := len(lanes.idle); n > 0 {
		l := lanes.idle[n-1]
		lanes.idle = lanes.idle[:n-1]
		lanes.Unlock()
		return l
	}
	lanes.Unlock()
	c := C.lane_new()
	if c == nil {
		return nil
	}
	// The eventfd is non-blocking, so os.NewFile puts it in the poller.
	return &lane{c: c, done: os.NewFile(uintptr(C.lane_fd(c)), "pkcs11 lane")}
}

func putLane(l *lane) {
	lanes.Lock()
	lanes.idle = append(lanes.idle, l)
	lanes.Unlock()
}

// offload makes a crypt call on a lane and waits for it in the poller. It
// reports false, having called nothing, when no lane could be started. The
// buffers stay pinned until the lane is done with them; a call abandoned by
// its caller (Backend.run) still holds its lane and its worker goroutine
// until the module returns, as a direct call holds its thread.
func offload(p *C.function_list, fn C.int, sh C.CK_ULONG, in *C.CK_BYTE, inLen C.CK_ULONG, out *C.CK_BYTE, n *C.CK_ULONG) (C.CK_RV, bool) {
	l := getLane()
	if l == nil {
		return 0, false
	}
	var pin runtime.Pinner
	pin.Pin(in)
	pin.Pin(out)
	defer pin.Unpin()
	C.lane_submit(l.c, p, fn, sh, in, inLen, out, *n)
	var buf [8]byte
	for {
		if _, err := l.done.Read(buf[:]); err == nil {
			break
		}
		// The poller waits out EAGAIN and retries EINTR, and the file is
		// never closed: no error is expected. Whatever it was, the lane
		// still owns the buffers; wait for it without spinning.
		time.Sleep(time.Millisecond)
	}
	rv := C.lane_result(l.c, n)
	putLane(l)
	return rv, true
}
