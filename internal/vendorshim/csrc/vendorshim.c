/*
 * vendorshim: a PKCS#11 module that forwards to a real one
 * (VENDORSHIM_TARGET, SoftHSM2 in the tests) and takes on the documented
 * AES-GCM behaviour of a production HSM, chosen by VENDORSHIM_PERSONALITY.
 * The cryptography stays real: the shim makes the IV the vendor's module
 * would make, puts it into the CK_GCM_PARAMS that the real module sees, and
 * hands it back the vendor's way, so every ciphertext still checks against
 * any other AES-GCM implementation.
 *
 * Sources of each behaviour: shared/reference/pkcs11.md §3 ("nShield and
 * other vendors: IV handling and quirks") and the vendor documents it quotes;
 * §8 for NSS softokn's length query. A behaviour that no vendor source gives
 * is marked ASSUMPTION: the shim has to answer something, and the proxy must
 * not depend on that answer alone (docs/nshield.md §14 lists them).
 *
 * Personalities:
 *
 *   nshield          Entrust nShield, FIPS 140 Level 3 Security World, module
 *                    protection on the load-shared accelerator slot.
 *                    - The caller passes a 12-byte zero IV buffer and the
 *                      module writes the IV it generated into it (AWS's
 *                      reference proxy, settings_nshield.toml: "nShield HSM
 *                      requires to generate the IV"; Mastercard p11perftest's
 *                      entrust path: "IV is 12 bytes wide and MUST be filled
 *                      with 0x00"). The IV is written when C_Encrypt
 *                      produces its output, so a caller must keep the buffer
 *                      until then and read it after.
 *                    - ASSUMPTION: a caller IV that is not all zero, or not
 *                      12 bytes, is refused with CKR_MECHANISM_PARAM_INVALID.
 *                      The sources say only that the buffer MUST be 12 zero
 *                      bytes; Entrust's footnote on CKM_AES_GCM was not
 *                      found, so the refusal and its code are PKCS#11's
 *                      general answer for bad mechanism parameters. The
 *                      proxy detects the IV mode by a self-test that needs
 *                      no particular code.
 *                    - A tag that does not verify is CKR_FUNCTION_FAILED
 *                      (reference proxy handlers/mod.rs: "CKR_FUNCTION_FAILED
 *                      is reported to be returned in nShield"; second hand,
 *                      so the proxy takes it for a bad ciphertext only when
 *                      the token then answers a check).
 *                    - Only the accelerator slot is shown, labelled
 *                      "loadshared accelerator" (CKNFAST_LOADSHARING=1;
 *                      nshielddocs "nShield PKCS #11 library environment
 *                      variables"; the label from Entrust's own samples).
 *                    - Module-protected keys need no login: C_Login succeeds
 *                      without a PIN check only with
 *                      CKNFAST_FAKE_ACCELERATOR_LOGIN set, read once, at
 *                      C_Initialize (nshielddocs, as above: the variables
 *                      are read once, at start).
 *                      ASSUMPTION: without it, C_Login answers
 *                      CKR_USER_PIN_NOT_INITIALIZED, PKCS#11's code for a
 *                      token without a user PIN; nShield's own code is not
 *                      documented. VENDORSHIM_NSHIELD_LOGIN_CKR sets another
 *                      (hex or decimal), for tests that the proxy's answer
 *                      does not depend on it.
 *                    - The accelerator slot cannot hold private objects
 *                      (nshielddocs: it "cannot create private objects"):
 *                      a template with CKA_PRIVATE true is refused.
 *                      ASSUMPTION: with CKR_ATTRIBUTE_VALUE_INVALID, which
 *                      the documents do not give;
 *                      VENDORSHIM_NSHIELD_PRIVATE_CKR sets another. The
 *                      proxy recognises the refusal by a second session key
 *                      made without CKA_PRIVATE, not by the code.
 *   cloudhsm         AWS CloudHSM, Client SDK 5.
 *                    - IV written back as nShield (miekg/pkcs11 PR #72;
 *                      AWS: "the HSM does not accept initialization vector
 *                      data from the application ... The 12-byte IV provided
 *                      by the HSM is written into the memory reference
 *                      pointed to by the pIV element"). A non-zero IV is
 *                      refused ("Expect IV to be all 0"), as is no IV
 *                      ("Expected 'ulIvBits' or 'ulIvLen' to be non-zero"),
 *                      both CKR_MECHANISM_PARAM_INVALID.
 *                    - A tag that does not verify is
 *                      CKR_ENCRYPTED_DATA_INVALID, input shorter than the
 *                      tag CKR_ENCRYPTED_DATA_LEN_RANGE: the codes PKCS#11
 *                      gives for them, which the reference proxy maps to
 *                      InvalidCiphertextException first.
 *                    - A small per-application session limit, reported in
 *                      CK_TOKEN_INFO's ulMaxSessionCount and
 *                      ulMaxRwSessionCount and enforced by C_OpenSession
 *                      (CKR_SESSION_COUNT): VENDORSHIM_MAX_SESSIONS, 16
 *                      unless set.
 *   luna-ignores-iv  Thales Luna 7 in FIPS mode (HSM policy 12), firmware
 *                    that ignores a zeroed IV buffer: the HSM generates a
 *                    16-byte IV and appends it, the output being ciphertext
 *                    ‖ tag ‖ IV (thalesdocs Luna 7 CKM_AES_GCM: "The IV
 *                    generated by the HSM is concatenated at the end ... The
 *                    buffer must be large enough to store the GMAC tag plus
 *                    the generated IV (which has a length of 16 bytes)").
 *                    No IV, or an all-zero one, is accepted; a caller IV
 *                    with data is refused, CKR_MECHANISM_PARAM_INVALID.
 *   luna-refuses-iv  The same, firmware 7.9.3 and later: any caller IV
 *                    buffer is refused with CKR_MECHANISM_PARAM_INVALID,
 *                    and the HSM generates one only when ulIvLen is 0.
 *                    Both Luna personalities refuse to decrypt when
 *                    ulIvBits does not match ulIvLen (rust-cryptoki#247:
 *                    Luna in FIPS mode fails to decrypt with ulIvBits 0).
 *   strict-length    Answers the NULL-buffer length query of a GCM C_Encrypt
 *                    the way NSS softokn 3.87 does (measured: it reports the
 *                    plaintext's length, without the 16-byte tag, and the
 *                    real call with a buffer that size then fails with
 *                    CKR_BUFFER_TOO_SMALL). IVs are the caller's.
 *
 * Also, for every personality:
 *   VENDORSHIM_TOKEN       the label of the real token to show; other slots
 *                          are hidden (the tests' SoftHSM2 holds many).
 *   VENDORSHIM_LATENCY_US  a fixed delay added to each C_Encrypt and
 *                          C_Decrypt that produces output (a length query
 *                          is answered at once, as a client library does),
 *                          standing for a network HSM's round trip.
 *   VENDORSHIM_LATENCY_LOG a file the shim keeps a histogram in of each such
 *                          delay as slept (the machine's timers overshoot):
 *                          SLEPT_BUCKETS native-endian 64-bit counters, the
 *                          delay in steps of SLEPT_STEP_US, the last one for
 *                          all longer; mapped shared, so a reader sees it
 *                          while the module is loaded (scripts/capacity.sh).
 *
 * Only single-part GCM is emulated, which is what the proxy uses (Luna
 * accumulates multi-part GCM anyway); C_EncryptUpdate and C_EncryptFinal
 * during an emulated operation answer CKR_FUNCTION_NOT_SUPPORTED.
 *
 * No PKCS#11 header is needed: the function list is a version followed by
 * the 68 function pointers of PKCS#11 v2.40 in the standard's order, and the
 * two structures below are PKCS#11 v2.40's, as in miekg/pkcs11's pkcs11t.h
 * (the package's test compiles this file against that header to prove it).
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>
#include <time.h>

#ifdef VENDORSHIM_CHECK_ABI
#include "pkcs11go.h"
#else
typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef unsigned char CK_BYTE;
typedef struct { unsigned char major, minor; } CK_VERSION;
#endif

typedef struct {
	CK_ULONG mechanism;
	void *pParameter;
	CK_ULONG ulParameterLen;
} mechanism;

typedef struct {
	CK_BYTE *pIv;
	CK_ULONG ulIvLen;
	CK_ULONG ulIvBits;
	CK_BYTE *pAAD;
	CK_ULONG ulAADLen;
	CK_ULONG ulTagBits;
} gcm_params;

typedef struct {
	CK_ULONG type;
	void *pValue;
	CK_ULONG ulValueLen;
} attribute;

/* CK_TOKEN_INFO, up to the fields the shim changes. */
typedef struct {
	CK_BYTE label[32];
	CK_BYTE manufacturerID[32];
	CK_BYTE model[16];
	CK_BYTE serialNumber[16];
	CK_ULONG flags;
	CK_ULONG ulMaxSessionCount;
	CK_ULONG ulSessionCount;
	CK_ULONG ulMaxRwSessionCount;
	CK_ULONG ulRwSessionCount;
} token_info_head;

#ifdef VENDORSHIM_CHECK_ABI
_Static_assert(sizeof(mechanism) == sizeof(CK_MECHANISM), "CK_MECHANISM");
_Static_assert(offsetof(mechanism, pParameter) == offsetof(CK_MECHANISM, pParameter), "CK_MECHANISM.pParameter");
_Static_assert(offsetof(mechanism, ulParameterLen) == offsetof(CK_MECHANISM, ulParameterLen), "CK_MECHANISM.ulParameterLen");
_Static_assert(sizeof(gcm_params) == sizeof(CK_GCM_PARAMS), "CK_GCM_PARAMS");
_Static_assert(offsetof(gcm_params, ulIvLen) == offsetof(CK_GCM_PARAMS, ulIvLen), "CK_GCM_PARAMS.ulIvLen");
_Static_assert(offsetof(gcm_params, ulIvBits) == offsetof(CK_GCM_PARAMS, ulIvBits), "CK_GCM_PARAMS.ulIvBits");
_Static_assert(offsetof(gcm_params, pAAD) == offsetof(CK_GCM_PARAMS, pAAD), "CK_GCM_PARAMS.pAAD");
_Static_assert(offsetof(gcm_params, ulAADLen) == offsetof(CK_GCM_PARAMS, ulAADLen), "CK_GCM_PARAMS.ulAADLen");
_Static_assert(offsetof(gcm_params, ulTagBits) == offsetof(CK_GCM_PARAMS, ulTagBits), "CK_GCM_PARAMS.ulTagBits");
_Static_assert(sizeof(attribute) == sizeof(CK_ATTRIBUTE), "CK_ATTRIBUTE");
_Static_assert(offsetof(attribute, ulValueLen) == offsetof(CK_ATTRIBUTE, ulValueLen), "CK_ATTRIBUTE.ulValueLen");
_Static_assert(offsetof(token_info_head, flags) == offsetof(CK_TOKEN_INFO, flags), "CK_TOKEN_INFO.flags");
_Static_assert(offsetof(token_info_head, ulMaxSessionCount) == offsetof(CK_TOKEN_INFO, ulMaxSessionCount), "CK_TOKEN_INFO.ulMaxSessionCount");
_Static_assert(offsetof(token_info_head, ulMaxRwSessionCount) == offsetof(CK_TOKEN_INFO, ulMaxRwSessionCount), "CK_TOKEN_INFO.ulMaxRwSessionCount");
_Static_assert(offsetof(CK_FUNCTION_LIST, C_Encrypt) == offsetof(CK_FUNCTION_LIST, C_Initialize) + 30 * sizeof(void *), "C_Encrypt is the 31st function");
_Static_assert(offsetof(CK_FUNCTION_LIST, C_GenerateKey) == offsetof(CK_FUNCTION_LIST, C_Initialize) + 58 * sizeof(void *), "C_GenerateKey is the 59th function");
_Static_assert(sizeof(CK_FUNCTION_LIST) == offsetof(CK_FUNCTION_LIST, C_Initialize) + 68 * sizeof(void *), "68 functions");
#else

#define CKR_OK 0x0UL
#define CKR_GENERAL_ERROR 0x5UL
#define CKR_FUNCTION_FAILED 0x6UL
#define CKR_ATTRIBUTE_VALUE_INVALID 0x13UL
#define CKR_ENCRYPTED_DATA_INVALID 0x40UL
#define CKR_ENCRYPTED_DATA_LEN_RANGE 0x41UL
#define CKR_FUNCTION_NOT_SUPPORTED 0x54UL
#define CKR_MECHANISM_PARAM_INVALID 0x71UL
#define CKR_SESSION_COUNT 0xB1UL
#define CKR_USER_PIN_NOT_INITIALIZED 0x102UL
#define CKR_BUFFER_TOO_SMALL 0x150UL
#define CKM_AES_GCM 0x1087UL
#define CKA_PRIVATE 0x2UL
#define CKF_LOGIN_REQUIRED 0x4UL
#define CKF_USER_PIN_INITIALIZED 0x8UL

#define GCM_TAG 16
#define NFUNC 68
typedef struct {
	CK_VERSION version;
	void *fn[NFUNC];
} function_list;

enum {
	I_Initialize = 0, I_Finalize = 1, I_GetSlotList = 4, I_GetTokenInfo = 6,
	I_OpenSession = 12, I_CloseSession = 13, I_CloseAllSessions = 14,
	I_Login = 18, I_CreateObject = 20, I_CopyObject = 21,
	I_EncryptInit = 29, I_Encrypt = 30, I_EncryptUpdate = 31, I_EncryptFinal = 32,
	I_DecryptInit = 33, I_Decrypt = 34, I_GenerateKey = 58,
};

enum personality { NSHIELD, CLOUDHSM, LUNA_IGNORES_IV, LUNA_REFUSES_IV, STRICT_LENGTH };
static const char *personality_names[] = {"nshield", "cloudhsm", "luna-ignores-iv", "luna-refuses-iv", "strict-length"};

static function_list shim, *real;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static enum personality who;
static char token_label[33];
static long latency_us;
#define SLEPT_BUCKETS 1024
#define SLEPT_STEP_US 50
static unsigned long long *slept; /* VENDORSHIM_LATENCY_LOG's counters, or NULL */
static long max_sessions;
static long open_sessions;
static int fake_login;
/* The nshield personality's assumed codes (see the top of the file). */
static CK_RV login_refusal = CKR_USER_PIN_NOT_INITIALIZED;
static CK_RV private_refusal = CKR_ATTRIBUTE_VALUE_INVALID;

/* How the IV of an emulated encryption goes back to the caller. */
enum iv_return { IV_WRITE_BACK, IV_APPEND, IV_CALLERS };

/* op is an AES-GCM operation in progress on a session. */
typedef struct {
	int used;
	CK_ULONG session;
	int encrypt;
	enum iv_return how;
	CK_BYTE *caller_iv; /* the caller's pIv, written back on output */
	CK_BYTE iv[16];
	CK_ULONG iv_len;
} op;

#define NOPS 1024
static op ops[NOPS];

#define REAL(idx, type) ((type)real->fn[idx])

static op *find_op(CK_ULONG session) {
	for (int i = 0; i < NOPS; i++)
		if (ops[i].used && ops[i].session == session)
			return &ops[i];
	return NULL;
}

/* take_op removes and returns the session's operation (copied into *out). */
static int take_op(CK_ULONG session, op *out) {
	pthread_mutex_lock(&mu);
	op *o = find_op(session);
	if (o) {
		*out = *o;
		o->used = 0;
	}
	pthread_mutex_unlock(&mu);
	return o != NULL;
}

static int peek_op(CK_ULONG session, op *out) {
	pthread_mutex_lock(&mu);
	op *o = find_op(session);
	if (o)
		*out = *o;
	pthread_mutex_unlock(&mu);
	return o != NULL;
}

static void put_op(const op *o) {
	pthread_mutex_lock(&mu);
	op *slot = find_op(o->session);
	for (int i = 0; !slot && i < NOPS; i++)
		if (!ops[i].used)
			slot = &ops[i];
	if (slot) {
		*slot = *o;
		slot->used = 1;
	}
	pthread_mutex_unlock(&mu);
}

static void drop_op(CK_ULONG session) {
	op o;
	take_op(session, &o);
}

static long long now_us(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long long)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static void pause_for_latency(void) {
	if (latency_us > 0) {
		struct timespec ts = {latency_us / 1000000, (latency_us % 1000000) * 1000L};
		long long start = now_us();
		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			; /* a signal does not cut the round trip short */
		if (slept) {
			long long b = (now_us() - start) / SLEPT_STEP_US;
			__atomic_fetch_add(&slept[b < SLEPT_BUCKETS ? b : SLEPT_BUCKETS - 1], 1, __ATOMIC_RELAXED);
		}
	}
}

/* map_latency_log maps VENDORSHIM_LATENCY_LOG's histogram, creating it
   zeroed; an existing one goes on counting. */
static void map_latency_log(const char *path) {
	const size_t size = SLEPT_BUCKETS * sizeof *slept;
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0 || ftruncate(fd, size) != 0) {
		fprintf(stderr, "vendorshim: VENDORSHIM_LATENCY_LOG %s cannot be used\n", path);
		if (fd >= 0)
			close(fd);
		return;
	}
	void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	slept = m == MAP_FAILED ? NULL : m;
}

static int all_zero(const CK_BYTE *p, CK_ULONG n) {
	for (CK_ULONG i = 0; i < n; i++)
		if (p[i])
			return 0;
	return 1;
}

static CK_RV random_iv(CK_BYTE *iv, CK_ULONG n) {
	return getrandom(iv, n, 0) == (ssize_t)n ? CKR_OK : CKR_GENERAL_ERROR;
}

static CK_RV w_C_Initialize(void *args) {
	const char *v = getenv("CKNFAST_FAKE_ACCELERATOR_LOGIN");
	fake_login = v && *v && strcmp(v, "0") != 0;
	return REAL(I_Initialize, CK_RV (*)(void *))(args);
}

static CK_RV w_C_Finalize(void *reserved) {
	CK_RV rv = REAL(I_Finalize, CK_RV (*)(void *))(reserved);
	pthread_mutex_lock(&mu);
	memset(ops, 0, sizeof ops);
	open_sessions = 0;
	pthread_mutex_unlock(&mu);
	return rv;
}

/* slot_shown says whether the real slot holds the token to show. */
static int slot_shown(CK_ULONG slot) {
	if (!token_label[0])
		return 1;
	token_info_head info[4]; /* room for the whole CK_TOKEN_INFO (208 bytes) */
	if (REAL(I_GetTokenInfo, CK_RV (*)(CK_ULONG, void *))(slot, info) != CKR_OK)
		return 0;
	char label[33];
	memcpy(label, info[0].label, 32);
	label[32] = 0;
	for (int i = 31; i >= 0 && label[i] == ' '; i--)
		label[i] = 0;
	return strcmp(label, token_label) == 0;
}

static CK_RV w_C_GetSlotList(unsigned char present, CK_ULONG *list, CK_ULONG *count) {
	CK_RV (*get)(unsigned char, CK_ULONG *, CK_ULONG *) = REAL(I_GetSlotList, CK_RV (*)(unsigned char, CK_ULONG *, CK_ULONG *));
	CK_ULONG n = 0;
	CK_RV rv = get(present, NULL, &n);
	if (rv != CKR_OK)
		return rv;
	CK_ULONG *all = calloc(n + 1, sizeof *all);
	if (!all)
		return CKR_GENERAL_ERROR;
	rv = get(present, all, &n);
	CK_ULONG shown = 0;
	for (CK_ULONG i = 0; rv == CKR_OK && i < n; i++)
		if (slot_shown(all[i]))
			all[shown++] = all[i];
	if (rv == CKR_OK && list) {
		if (*count < shown)
			rv = CKR_BUFFER_TOO_SMALL;
		else
			memcpy(list, all, shown * sizeof *all);
	}
	*count = shown;
	free(all);
	return rv;
}

static void pad(CK_BYTE *field, size_t n, const char *s) {
	memset(field, ' ', n);
	memcpy(field, s, strlen(s) < n ? strlen(s) : n);
}

static CK_RV w_C_GetTokenInfo(CK_ULONG slot, token_info_head *info) {
	CK_RV rv = REAL(I_GetTokenInfo, CK_RV (*)(CK_ULONG, token_info_head *))(slot, info);
	if (rv != CKR_OK)
		return rv;
	switch (who) {
	case NSHIELD:
		pad(info->label, sizeof info->label, "loadshared accelerator");
		pad(info->manufacturerID, sizeof info->manufacturerID, "nCipher Corp. Ltd");
		pad(info->model, sizeof info->model, "emulated");
		info->flags &= ~(CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED);
		break;
	case CLOUDHSM:
		pad(info->manufacturerID, sizeof info->manufacturerID, "Marvell Semiconductors, Inc.");
		pad(info->model, sizeof info->model, "emulated");
		info->ulMaxSessionCount = max_sessions;
		info->ulMaxRwSessionCount = max_sessions;
		break;
	default:
		break;
	}
	return rv;
}

static CK_RV w_C_OpenSession(CK_ULONG slot, CK_ULONG flags, void *app, void *notify, CK_ULONG *session) {
	if (who == CLOUDHSM) {
		pthread_mutex_lock(&mu);
		int full = open_sessions >= max_sessions;
		if (!full)
			open_sessions++;
		pthread_mutex_unlock(&mu);
		if (full)
			return CKR_SESSION_COUNT;
	}
	CK_RV rv = REAL(I_OpenSession, CK_RV (*)(CK_ULONG, CK_ULONG, void *, void *, CK_ULONG *))(slot, flags, app, notify, session);
	if (rv != CKR_OK && who == CLOUDHSM) {
		pthread_mutex_lock(&mu);
		open_sessions--;
		pthread_mutex_unlock(&mu);
	}
	return rv;
}

static CK_RV w_C_CloseSession(CK_ULONG session) {
	CK_RV rv = REAL(I_CloseSession, CK_RV (*)(CK_ULONG))(session);
	drop_op(session);
	if (rv == CKR_OK && who == CLOUDHSM) {
		pthread_mutex_lock(&mu);
		if (open_sessions > 0)
			open_sessions--;
		pthread_mutex_unlock(&mu);
	}
	return rv;
}

static CK_RV w_C_CloseAllSessions(CK_ULONG slot) {
	CK_RV rv = REAL(I_CloseAllSessions, CK_RV (*)(CK_ULONG))(slot);
	if (rv == CKR_OK) {
		pthread_mutex_lock(&mu);
		memset(ops, 0, sizeof ops);
		open_sessions = 0; /* one token is shown, so its slot had them all */
		pthread_mutex_unlock(&mu);
	}
	return rv;
}

static CK_RV w_C_Login(CK_ULONG session, CK_ULONG user, CK_BYTE *pin, CK_ULONG pin_len) {
	if (who == NSHIELD)
		return fake_login ? CKR_OK : login_refusal;
	return REAL(I_Login, CK_RV (*)(CK_ULONG, CK_ULONG, CK_BYTE *, CK_ULONG))(session, user, pin, pin_len);
}

/* asks_private says whether a template sets CKA_PRIVATE to true. */
static int asks_private(const attribute *tmpl, CK_ULONG n) {
	for (CK_ULONG i = 0; tmpl && i < n; i++)
		if (tmpl[i].type == CKA_PRIVATE && tmpl[i].pValue && tmpl[i].ulValueLen >= 1 && *(CK_BYTE *)tmpl[i].pValue)
			return 1;
	return 0;
}

static CK_RV w_C_CreateObject(CK_ULONG session, attribute *tmpl, CK_ULONG n, CK_ULONG *object) {
	if (who == NSHIELD && asks_private(tmpl, n))
		return private_refusal;
	return REAL(I_CreateObject, CK_RV (*)(CK_ULONG, attribute *, CK_ULONG, CK_ULONG *))(session, tmpl, n, object);
}

static CK_RV w_C_CopyObject(CK_ULONG session, CK_ULONG from, attribute *tmpl, CK_ULONG n, CK_ULONG *object) {
	if (who == NSHIELD && asks_private(tmpl, n))
		return private_refusal;
	return REAL(I_CopyObject, CK_RV (*)(CK_ULONG, CK_ULONG, attribute *, CK_ULONG, CK_ULONG *))(session, from, tmpl, n, object);
}

static CK_RV w_C_GenerateKey(CK_ULONG session, mechanism *m, attribute *tmpl, CK_ULONG n, CK_ULONG *key) {
	if (who == NSHIELD && asks_private(tmpl, n))
		return private_refusal;
	return REAL(I_GenerateKey, CK_RV (*)(CK_ULONG, mechanism *, attribute *, CK_ULONG, CK_ULONG *))(session, m, tmpl, n, key);
}

/* gcm_of returns the mechanism's GCM parameters, or NULL for another
 * mechanism or a malformed parameter, which the real module judges. */
static gcm_params *gcm_of(mechanism *m) {
	if (!m || m->mechanism != CKM_AES_GCM || !m->pParameter || m->ulParameterLen != sizeof(gcm_params))
		return NULL;
	return m->pParameter;
}

static CK_RV w_C_EncryptInit(CK_ULONG session, mechanism *m, CK_ULONG key) {
	CK_RV (*init)(CK_ULONG, mechanism *, CK_ULONG) = REAL(I_EncryptInit, CK_RV (*)(CK_ULONG, mechanism *, CK_ULONG));
	gcm_params *p = gcm_of(m);
	drop_op(session);
	if (!p)
		return init(session, m, key);
	op o = {.session = session, .encrypt = 1, .how = IV_CALLERS};
	int has_iv = p->pIv && p->ulIvLen > 0;
	switch (who) {
	case NSHIELD:
	case CLOUDHSM:
		if (!has_iv || p->ulIvLen != 12 || !all_zero(p->pIv, p->ulIvLen))
			return CKR_MECHANISM_PARAM_INVALID;
		o.how = IV_WRITE_BACK;
		o.caller_iv = p->pIv;
		o.iv_len = 12;
		break;
	case LUNA_IGNORES_IV:
		if (has_iv && !all_zero(p->pIv, p->ulIvLen))
			return CKR_MECHANISM_PARAM_INVALID;
		o.how = IV_APPEND;
		o.iv_len = 16;
		break;
	case LUNA_REFUSES_IV:
		if (p->pIv || p->ulIvLen != 0)
			return CKR_MECHANISM_PARAM_INVALID;
		o.how = IV_APPEND;
		o.iv_len = 16;
		break;
	case STRICT_LENGTH:
		break;
	}
	CK_RV rv;
	if (o.how == IV_CALLERS) {
		rv = init(session, m, key);
	} else {
		if (random_iv(o.iv, o.iv_len) != CKR_OK)
			return CKR_GENERAL_ERROR;
		gcm_params sub = *p;
		sub.pIv = o.iv;
		sub.ulIvLen = o.iv_len;
		sub.ulIvBits = 8 * o.iv_len;
		mechanism subm = {CKM_AES_GCM, &sub, sizeof sub};
		rv = init(session, &subm, key);
	}
	if (rv == CKR_OK)
		put_op(&o);
	return rv;
}

static CK_RV w_C_Encrypt(CK_ULONG session, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out, CK_ULONG *out_len) {
	CK_RV (*enc)(CK_ULONG, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *) = REAL(I_Encrypt, CK_RV (*)(CK_ULONG, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *));
	op o;
	if (!peek_op(session, &o) || !o.encrypt) {
		if (out)
			pause_for_latency();
		return enc(session, in, in_len, out, out_len);
	}
	CK_ULONG extra = o.how == IV_APPEND ? o.iv_len : 0;
	if (!out) {
		if (who == STRICT_LENGTH) {
			*out_len = in_len;
			return CKR_OK;
		}
		CK_RV rv = enc(session, in, in_len, NULL, out_len);
		if (rv == CKR_OK)
			*out_len += extra;
		return rv;
	}
	CK_ULONG need = in_len + GCM_TAG + extra;
	if (*out_len < need) {
		*out_len = need;
		return CKR_BUFFER_TOO_SMALL;
	}
	pause_for_latency();
	CK_ULONG n = *out_len - extra;
	CK_RV rv = enc(session, in, in_len, out, &n);
	if (rv == CKR_BUFFER_TOO_SMALL) {
		*out_len = n + extra;
		return rv;
	}
	drop_op(session);
	if (rv != CKR_OK)
		return rv;
	if (o.how == IV_APPEND)
		memcpy(out + n, o.iv, o.iv_len);
	if (o.how == IV_WRITE_BACK)
		memcpy(o.caller_iv, o.iv, o.iv_len);
	*out_len = n + extra;
	return CKR_OK;
}

static CK_RV w_C_EncryptUpdate(CK_ULONG session, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out, CK_ULONG *out_len) {
	op o;
	if (peek_op(session, &o) && o.how != IV_CALLERS)
		return CKR_FUNCTION_NOT_SUPPORTED;
	return REAL(I_EncryptUpdate, CK_RV (*)(CK_ULONG, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *))(session, in, in_len, out, out_len);
}

static CK_RV w_C_EncryptFinal(CK_ULONG session, CK_BYTE *out, CK_ULONG *out_len) {
	op o;
	if (peek_op(session, &o) && o.how != IV_CALLERS)
		return CKR_FUNCTION_NOT_SUPPORTED;
	return REAL(I_EncryptFinal, CK_RV (*)(CK_ULONG, CK_BYTE *, CK_ULONG *))(session, out, out_len);
}

static CK_RV w_C_DecryptInit(CK_ULONG session, mechanism *m, CK_ULONG key) {
	gcm_params *p = gcm_of(m);
	drop_op(session);
	if (p && (who == LUNA_IGNORES_IV || who == LUNA_REFUSES_IV) && p->ulIvBits != 8 * p->ulIvLen)
		return CKR_MECHANISM_PARAM_INVALID;
	CK_RV rv = REAL(I_DecryptInit, CK_RV (*)(CK_ULONG, mechanism *, CK_ULONG))(session, m, key);
	if (rv == CKR_OK && p) {
		op o = {.session = session, .encrypt = 0, .how = IV_CALLERS};
		put_op(&o);
	}
	return rv;
}

static CK_RV w_C_Decrypt(CK_ULONG session, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out, CK_ULONG *out_len) {
	CK_RV (*dec)(CK_ULONG, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *) = REAL(I_Decrypt, CK_RV (*)(CK_ULONG, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *));
	op o;
	int gcm = peek_op(session, &o) && !o.encrypt;
	if (!out)
		return dec(session, in, in_len, out, out_len);
	pause_for_latency();
	if (gcm && who == CLOUDHSM && in_len < GCM_TAG) {
		drop_op(session);
		/* Ends the real module's operation too, as an error does. */
		CK_BYTE scratch[GCM_TAG];
		CK_ULONG n = sizeof scratch;
		dec(session, in, in_len, scratch, &n);
		return CKR_ENCRYPTED_DATA_LEN_RANGE;
	}
	CK_RV rv = dec(session, in, in_len, out, out_len);
	if (!gcm || rv == CKR_BUFFER_TOO_SMALL)
		return rv;
	drop_op(session);
	/* SoftHSM2 answers every GCM authentication failure with
	 * CKR_GENERAL_ERROR (pkcs11.md §2.4). */
	if (rv == CKR_GENERAL_ERROR && who == NSHIELD)
		return CKR_FUNCTION_FAILED;
	if (rv == CKR_GENERAL_ERROR && who == CLOUDHSM)
		return CKR_ENCRYPTED_DATA_INVALID;
	return rv;
}

CK_RV C_GetFunctionList(function_list **list) {
	pthread_mutex_lock(&mu);
	if (!real) {
		const char *target = getenv("VENDORSHIM_TARGET");
		const char *name = getenv("VENDORSHIM_PERSONALITY");
		int found = 0;
		for (size_t i = 0; name && i < sizeof personality_names / sizeof *personality_names; i++) {
			if (strcmp(name, personality_names[i]) == 0) {
				who = (enum personality)i;
				found = 1;
			}
		}
		void *h = found && target ? dlopen(target, RTLD_NOW | RTLD_LOCAL) : NULL;
		CK_RV (*get)(function_list **) = h ? (CK_RV(*)(function_list **))dlsym(h, "C_GetFunctionList") : NULL;
		if (!get || get(&real) != CKR_OK || !real) {
			real = NULL;
			pthread_mutex_unlock(&mu);
			fprintf(stderr, "vendorshim: need VENDORSHIM_TARGET (a PKCS#11 module) and VENDORSHIM_PERSONALITY "
					"(nshield, cloudhsm, luna-ignores-iv, luna-refuses-iv or strict-length)\n");
			return CKR_GENERAL_ERROR;
		}
		const char *tok = getenv("VENDORSHIM_TOKEN");
		snprintf(token_label, sizeof token_label, "%s", tok ? tok : "");
		const char *lat = getenv("VENDORSHIM_LATENCY_US");
		latency_us = lat ? strtol(lat, NULL, 10) : 0;
		const char *hist = getenv("VENDORSHIM_LATENCY_LOG");
		if (hist && *hist && !slept)
			map_latency_log(hist);
		const char *ms = getenv("VENDORSHIM_MAX_SESSIONS");
		max_sessions = ms ? strtol(ms, NULL, 10) : 16;
		const char *code = getenv("VENDORSHIM_NSHIELD_LOGIN_CKR");
		if (code && *code)
			login_refusal = strtoul(code, NULL, 0);
		code = getenv("VENDORSHIM_NSHIELD_PRIVATE_CKR");
		if (code && *code)
			private_refusal = strtoul(code, NULL, 0);
		memcpy(&shim, real, sizeof shim);
		shim.fn[I_Initialize] = (void *)w_C_Initialize;
		shim.fn[I_Finalize] = (void *)w_C_Finalize;
		shim.fn[I_GetSlotList] = (void *)w_C_GetSlotList;
		shim.fn[I_GetTokenInfo] = (void *)w_C_GetTokenInfo;
		shim.fn[I_OpenSession] = (void *)w_C_OpenSession;
		shim.fn[I_CloseSession] = (void *)w_C_CloseSession;
		shim.fn[I_CloseAllSessions] = (void *)w_C_CloseAllSessions;
		shim.fn[I_Login] = (void *)w_C_Login;
		shim.fn[I_CreateObject] = (void *)w_C_CreateObject;
		shim.fn[I_CopyObject] = (void *)w_C_CopyObject;
		shim.fn[I_EncryptInit] = (void *)w_C_EncryptInit;
		shim.fn[I_Encrypt] = (void *)w_C_Encrypt;
		shim.fn[I_EncryptUpdate] = (void *)w_C_EncryptUpdate;
		shim.fn[I_EncryptFinal] = (void *)w_C_EncryptFinal;
		shim.fn[I_DecryptInit] = (void *)w_C_DecryptInit;
		shim.fn[I_Decrypt] = (void *)w_C_Decrypt;
		shim.fn[I_GenerateKey] = (void *)w_C_GenerateKey;
	}
	pthread_mutex_unlock(&mu);
	*list = &shim;
	return CKR_OK;
}
#endif
