/*
 * faultshim: a PKCS#11 module that forwards to a real one (P11SHIM_TARGET)
 * and, per call, re-reads a control file (P11SHIM_CTL) to fail chosen calls
 * with chosen CKR codes or to make them hang. It exists because SoftHSM2
 * cannot produce CKR_DEVICE_ERROR, a dead session in the middle of a call,
 * or a hang on demand.
 *
 * Control file, one rule per line:
 *   C_Encrypt=0x30        every C_Encrypt returns CKR_DEVICE_ERROR
 *   C_Decrypt=0xB3*1      the next C_Decrypt only (counts reset when the
 *                         file changes)
 *   C_Encrypt=sleep:1500  C_Encrypt sleeps 1500 ms, then forwards
 *   C_Encrypt=hang        C_Encrypt blocks until its rule leaves the file,
 *                         then forwards: an HSM that hangs for as long as
 *                         the test wants, however slow the machine
 * With P11SHIM_LOG set, the name of every wrapped call is appended to it,
 * and "<name> hang" when that call starts to hang.
 *
 * No PKCS#11 header is needed: the function list is a version followed by
 * the 68 function pointers of PKCS#11 v2.40, in the standard's order, and the
 * wrappers below only forward their arguments.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef unsigned long CK_RV;
typedef unsigned long CK_ULONG;
typedef struct { unsigned char major, minor; } CK_VERSION;

#define NFUNC 68
typedef struct {
	CK_VERSION version;
	void *fn[NFUNC];
} function_list;

enum {
	I_Initialize = 0, I_Finalize = 1, I_GetSlotList = 4, I_GetTokenInfo = 6,
	I_GetMechanismInfo = 8, I_OpenSession = 12, I_GetSessionInfo = 15,
	I_Login = 18, I_CreateObject = 20, I_DestroyObject = 22,
	I_GetAttributeValue = 24, I_FindObjectsInit = 26, I_FindObjects = 27,
	I_EncryptInit = 29, I_Encrypt = 30, I_DecryptInit = 33, I_Decrypt = 34,
	I_GenerateKey = 58, I_WrapKey = 60, I_UnwrapKey = 61,
};

static function_list shim, *real;
static char ctl_path[4096], log_path[4096];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char last_rules[8192];
static long fired[NFUNC];

static size_t read_rules(char *buf, size_t size) {
	size_t n = 0;
	if (ctl_path[0]) {
		FILE *f = fopen(ctl_path, "r");
		if (f) {
			n = fread(buf, 1, size - 1, f);
			fclose(f);
		}
	}
	buf[n] = 0;
	return n;
}

static void log_line(const char *name, const char *suffix) {
	if (!log_path[0])
		return;
	FILE *l = fopen(log_path, "a");
	if (l) {
		fprintf(l, "%s%s\n", name, suffix);
		fclose(l);
	}
}

/* hang_rule_present says whether the rules hold a "name=hang" line. */
static int hang_rule_present(const char *name) {
	char buf[8192], want[128];
	read_rules(buf, sizeof buf);
	snprintf(want, sizeof want, "%s=hang", name);
	size_t wl = strlen(want);
	for (char *line = buf; line && *line;) {
		char *next = strchr(line, '\n');
		if (next)
			*next++ = 0;
		if (strncmp(line, want, wl) == 0 && (line[wl] == 0 || line[wl] == '*'))
			return 1;
		line = next;
	}
	return 0;
}

/* inject returns 1 with *rv set when the call must fail now; a sleep rule
 * sleeps and returns 0 so the call is forwarded. */
static int inject(const char *name, int idx, CK_RV *rv) {
	char buf[8192];
	long sleep_ms = 0;
	int fail = 0, hang = 0;
	size_t n = read_rules(buf, sizeof buf);

	pthread_mutex_lock(&mu);
	log_line(name, "");
	if (strcmp(buf, last_rules) != 0) {
		memcpy(last_rules, buf, n + 1);
		memset(fired, 0, sizeof fired);
	}
	size_t nl = strlen(name);
	for (char *line = buf; line && *line;) {
		char *next = strchr(line, '\n');
		if (next)
			*next++ = 0;
		if (strncmp(line, name, nl) == 0 && line[nl] == '=') {
			char *v = line + nl + 1;
			long limit = -1;
			char *star = strchr(v, '*');
			if (star) {
				limit = strtol(star + 1, NULL, 10);
				*star = 0;
			}
			if (limit < 0 || fired[idx] < limit) {
				fired[idx]++;
				if (strncmp(v, "sleep:", 6) == 0) {
					sleep_ms = strtol(v + 6, NULL, 10);
				} else if (strcmp(v, "hang") == 0) {
					hang = 1;
					log_line(name, " hang");
				} else {
					*rv = strtoul(v, NULL, 0);
					fail = 1;
				}
			}
			break;
		}
		line = next;
	}
	pthread_mutex_unlock(&mu);
	if (sleep_ms > 0) {
		struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
		nanosleep(&ts, NULL);
	}
	while (hang && hang_rule_present(name)) {
		struct timespec ts = {0, 5 * 1000000L};
		nanosleep(&ts, NULL);
	}
	return fail;
}

#define WRAP(idx, name, params, args)                                  \
	static CK_RV w_##name params {                                     \
		CK_RV rv;                                                      \
		if (inject(#name, idx, &rv))                                   \
			return rv;                                                 \
		return ((CK_RV(*) params)real->fn[idx]) args;                  \
	}

typedef void *P;
typedef unsigned long U;
WRAP(I_Initialize, C_Initialize, (P a), (a))
WRAP(I_Finalize, C_Finalize, (P a), (a))
WRAP(I_GetSlotList, C_GetSlotList, (unsigned char a, P b, P c), (a, b, c))
WRAP(I_GetTokenInfo, C_GetTokenInfo, (U a, P b), (a, b))
WRAP(I_OpenSession, C_OpenSession, (U a, U b, P c, P d, P e), (a, b, c, d, e))
WRAP(I_GetSessionInfo, C_GetSessionInfo, (U a, P b), (a, b))
WRAP(I_Login, C_Login, (U a, U b, P c, U d), (a, b, c, d))
WRAP(I_GetAttributeValue, C_GetAttributeValue, (U a, U b, P c, U d), (a, b, c, d))
WRAP(I_FindObjectsInit, C_FindObjectsInit, (U a, P b, U c), (a, b, c))
WRAP(I_FindObjects, C_FindObjects, (U a, P b, U c, P d), (a, b, c, d))
WRAP(I_EncryptInit, C_EncryptInit, (U a, P b, U c), (a, b, c))
WRAP(I_Encrypt, C_Encrypt, (U a, P b, U c, P d, P e), (a, b, c, d, e))
WRAP(I_DecryptInit, C_DecryptInit, (U a, P b, U c), (a, b, c))
WRAP(I_Decrypt, C_Decrypt, (U a, P b, U c, P d, P e), (a, b, c, d, e))
WRAP(I_GenerateKey, C_GenerateKey, (U a, P b, P c, U d, P e), (a, b, c, d, e))
WRAP(I_GetMechanismInfo, C_GetMechanismInfo, (U a, U b, P c), (a, b, c))
WRAP(I_CreateObject, C_CreateObject, (U a, P b, U c, P d), (a, b, c, d))
WRAP(I_DestroyObject, C_DestroyObject, (U a, U b), (a, b))
WRAP(I_WrapKey, C_WrapKey, (U a, P b, U c, U d, P e, P f), (a, b, c, d, e, f))
WRAP(I_UnwrapKey, C_UnwrapKey, (U a, P b, U c, P d, U e, P f, U g, P h), (a, b, c, d, e, f, g, h))

CK_RV C_GetFunctionList(function_list **list) {
	pthread_mutex_lock(&mu);
	if (!real) {
		const char *target = getenv("P11SHIM_TARGET");
		void *h = target ? dlopen(target, RTLD_NOW | RTLD_LOCAL) : NULL;
		CK_RV (*get)(function_list **) = h ? (CK_RV(*)(function_list **))dlsym(h, "C_GetFunctionList") : NULL;
		if (!get || get(&real) != 0 || !real) {
			real = NULL;
			pthread_mutex_unlock(&mu);
			return 0x5; /* CKR_GENERAL_ERROR */
		}
		memcpy(&shim, real, sizeof shim);
		const char *c = getenv("P11SHIM_CTL");
		const char *l = getenv("P11SHIM_LOG");
		snprintf(ctl_path, sizeof ctl_path, "%s", c ? c : "");
		snprintf(log_path, sizeof log_path, "%s", l ? l : "");
		shim.fn[I_Initialize] = (P)w_C_Initialize;
		shim.fn[I_Finalize] = (P)w_C_Finalize;
		shim.fn[I_GetSlotList] = (P)w_C_GetSlotList;
		shim.fn[I_GetTokenInfo] = (P)w_C_GetTokenInfo;
		shim.fn[I_OpenSession] = (P)w_C_OpenSession;
		shim.fn[I_GetSessionInfo] = (P)w_C_GetSessionInfo;
		shim.fn[I_Login] = (P)w_C_Login;
		shim.fn[I_GetAttributeValue] = (P)w_C_GetAttributeValue;
		shim.fn[I_FindObjectsInit] = (P)w_C_FindObjectsInit;
		shim.fn[I_FindObjects] = (P)w_C_FindObjects;
		shim.fn[I_EncryptInit] = (P)w_C_EncryptInit;
		shim.fn[I_Encrypt] = (P)w_C_Encrypt;
		shim.fn[I_DecryptInit] = (P)w_C_DecryptInit;
		shim.fn[I_Decrypt] = (P)w_C_Decrypt;
		shim.fn[I_GenerateKey] = (P)w_C_GenerateKey;
		shim.fn[I_GetMechanismInfo] = (P)w_C_GetMechanismInfo;
		shim.fn[I_CreateObject] = (P)w_C_CreateObject;
		shim.fn[I_DestroyObject] = (P)w_C_DestroyObject;
		shim.fn[I_WrapKey] = (P)w_C_WrapKey;
		shim.fn[I_UnwrapKey] = (P)w_C_UnwrapKey;
	}
	pthread_mutex_unlock(&mu);
	*list = &shim;
	return 0;
}
