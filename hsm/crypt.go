package hsm

/*
#include <dlfcn.h>
#include <stdlib.h>

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

static CK_RV crypt(function_list *l, int fn, CK_ULONG session, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out, CK_ULONG *out_len) {
	return ((crypt_fn)l->fn[fn])(session, in, in_len, out, out_len);
}
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// functionList is a module's CK_FUNCTION_LIST, for the calls miekg/pkcs11
// makes in a way some modules refuse.
type functionList struct{ p *C.function_list }

// loadFunctionList returns the function list of the module at path, which
// miekg/pkcs11 has loaded already.
func loadFunctionList(path string) (functionList, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	l := C.function_list_of(cpath)
	if l == nil {
		return functionList{}, fmt.Errorf("loading pkcs11 module %q: no function list", path)
	}
	return functionList{p: l}, nil
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
		rv := C.crypt(f.p, fn, C.CK_ULONG(sh), (*C.CK_BYTE)(unsafe.Pointer(&inBuf[0])), C.CK_ULONG(len(in)),
			(*C.CK_BYTE)(unsafe.Pointer(&out[0])), &n)
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
