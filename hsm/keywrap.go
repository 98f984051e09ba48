package hsm

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/miekg/pkcs11"
	"go.uber.org/zap"
)

// Key wrap: a data-encryption key (DEK) encrypted under a key-encryption key
// (KEK) that never leaves the HSM, with AES key wrap (RFC 3394), AES key wrap
// with padding (RFC 5649) or RSA-OAEP. This file holds the AES part and what
// the backend proved of it at start-up; rsa.go the RSA part.
//
// A token does AES key wrap either as C_Encrypt/C_Decrypt with the DEK as
// data (the crypt path; NSS softokn) or only as C_WrapKey/C_UnwrapKey with
// the DEK as a key object (the object path; SoftHSM2, nShield). Which, the
// token's C_GetMechanismInfo flags say; nothing is assumed. On the object
// path the DEK lives in a session object for the length of one call, and is
// destroyed on every path out of it, errors included.
//
// The mechanism number of RFC 5649 differs by token: PKCS#11 3.x and NSS
// softokn name it CKM_AES_KEY_WRAP_KWP (0x210B), while SoftHSM2 does RFC 5649
// under 0x210A, which PKCS#11 3.x names CKM_AES_KEY_WRAP_PAD and NSS
// implements as PKCS#7 padding then RFC 3394, another algorithm with the same
// name. So the number is a backend setting (kwp_mechanism), probed when
// unset, and every path and number is proven at start-up by a known-answer
// test on the RFCs' own vectors: a mechanism that gives other bytes is never
// used, and a configured one that does fails the backend, with the number
// that passes named in the error.

// WrapAlgorithm is a key wrap algorithm.
type WrapAlgorithm int

// The key wrap algorithms.
const (
	// AESKeyWrap is AES key wrap (RFC 3394) with an AES-256 KEK: A256KW.
	AESKeyWrap WrapAlgorithm = iota + 1
	// AESKeyWrapPad is AES key wrap with padding (RFC 5649) with an AES-256
	// KEK: A256KWP.
	AESKeyWrapPad
	// RSAOAEP is RSAES-OAEP with SHA-1 and MGF1-SHA-1 and an empty label.
	RSAOAEP
	// RSAOAEP256 is RSAES-OAEP with SHA-256 and MGF1-SHA-256 and an empty
	// label.
	RSAOAEP256
)

var wrapAlgorithmNames = [...]string{AESKeyWrap: "AES key wrap (RFC 3394)", AESKeyWrapPad: "AES key wrap with padding (RFC 5649)",
	RSAOAEP: "RSA-OAEP with SHA-1", RSAOAEP256: "RSA-OAEP with SHA-256"}

func (a WrapAlgorithm) String() string {
	if a < AESKeyWrap || a > RSAOAEP256 {
		return "WrapAlgorithm(" + strconv.Itoa(int(a)) + ")"
	}
	return wrapAlgorithmNames[a]
}

// rsa reports whether a is an RSA algorithm.
func (a WrapAlgorithm) rsa() bool { return a == RSAOAEP || a == RSAOAEP256 }

// The mechanism numbers of AES key wrap.
const (
	// ckmAESKeyWrap is CKM_AES_KEY_WRAP, RFC 3394, on every token.
	ckmAESKeyWrap = pkcs11.CKM_AES_KEY_WRAP
	// CKMAESKeyWrapPad is 0x210A: RFC 5649 on SoftHSM2 (2.6.1 and 2.7.0),
	// PKCS#7 padding then RFC 3394 on NSS softokn and in PKCS#11 3.x.
	CKMAESKeyWrapPad = pkcs11.CKM_AES_KEY_WRAP_PAD
	// CKMAESKeyWrapKWP is CKM_AES_KEY_WRAP_KWP of PKCS#11 3.x, RFC 5649,
	// which miekg/pkcs11 v1.1.2 does not define.
	CKMAESKeyWrapKWP = 0x210B
)

// kwpCandidates are the numbers probed for RFC 5649 when kwp_mechanism is
// unset, the standard's first.
var kwpCandidates = []uint{CKMAESKeyWrapKWP, CKMAESKeyWrapPad}

// ParseMechanism reads a mechanism number in hex (0x210B) or decimal.
func ParseMechanism(s string) (uint, error) {
	n, err := strconv.ParseUint(s, 0, 32)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("mechanism %q is not a number such as 0x210B", s)
	}
	return uint(n), nil
}

// mechanismName names a key wrap mechanism number for logs, errors and
// the keygen command.
func mechanismName(m uint) string {
	switch m {
	case ckmAESKeyWrap:
		return "0x2109 (CKM_AES_KEY_WRAP)"
	case CKMAESKeyWrapPad:
		return "0x210A (CKM_AES_KEY_WRAP_PAD)"
	case CKMAESKeyWrapKWP:
		return "0x210B (CKM_AES_KEY_WRAP_KWP)"
	case pkcs11.CKM_RSA_PKCS_OAEP:
		return "0x9 (CKM_RSA_PKCS_OAEP)"
	}
	return fmt.Sprintf("0x%X", m)
}

// wrapPath is how a token takes a DEK for a mechanism.
type wrapPath int

const (
	// cryptPath: C_Encrypt and C_Decrypt, the DEK as data.
	cryptPath wrapPath = iota
	// objectPath: C_WrapKey and C_UnwrapKey, the DEK as a session key object.
	objectPath
	numPaths
)

func (p wrapPath) String() string {
	if p == cryptPath {
		return "C_Encrypt/C_Decrypt"
	}
	return "C_WrapKey/C_UnwrapKey"
}

// pathsOf are the paths a mechanism's C_GetMechanismInfo flags offer: each
// needs both of its directions.
func pathsOf(flags uint) [numPaths]bool {
	return [numPaths]bool{
		cryptPath:  flags&pkcs11.CKF_ENCRYPT != 0 && flags&pkcs11.CKF_DECRYPT != 0,
		objectPath: flags&pkcs11.CKF_WRAP != 0 && flags&pkcs11.CKF_UNWRAP != 0,
	}
}

// kwVector is a known answer: plaintext wrapped under kek gives wrapped.
type kwVector struct {
	source                  string
	kek, plaintext, wrapped []byte
}

func hexBytes(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

var (
	kek256 = hexBytes("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
	kek192 = hexBytes("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")
	kwData = hexBytes("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
)

// kwVectors are RFC 3394's own vectors with a 256-bit KEK.
var kwVectors = []kwVector{
	{"RFC 3394 4.3", kek256, kwData[:16], hexBytes("64E8C3F9CE0F5BA2 63E9777905818A2A 93C8191E7D6E8AE7")},
	{"RFC 3394 4.6", kek256, kwData, hexBytes("28C9F404C4B810F4 CBCCB35CFB87F826 3F5786E2D80ED326 CBC7F0E71A99F43B FB988B9B7A02DD21")},
}

// kwpWholeVectors wrap plaintexts of whole 8-byte blocks, and
// kwpPartVectors plaintexts of other lengths, which SoftHSM2 2.6.1 pads with
// zeros before it wraps them and so gets wrong. RFC 5649's own vectors (§6)
// have a 192-bit KEK; the others, with A256KWP's 256-bit KEK, are checked
// against an implementation of RFC 5649 written from the RFC in the tests.
var (
	kwpWholeVectors = []kwVector{
		{"RFC 5649 with a 256-bit KEK, 8 bytes", kek256, kwData[:8], hexBytes("2bf5af5b28f4cb67cd3e1b1f9ac4049a")},
		{"RFC 5649 with a 256-bit KEK, 32 bytes", kek256, kwData, hexBytes("4a8029243027353b0694cf1bd8fc745bb0ce8a739b19b1960b12426d4c39cfeda926d103ab34e9f6")},
	}
	kwpPartVectors = []kwVector{
		{"RFC 5649 §6, 20 bytes", kek192, hexBytes("c37b7e6492584340bed12207808941155068f738"), hexBytes("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")},
		{"RFC 5649 §6, 7 bytes", kek192, hexBytes("466f7250617369"), hexBytes("afbeb0f07dfbf5419200f2ccb50bb24f")},
		{"RFC 5649 with a 256-bit KEK, 20 bytes", kek256, kwData[:20], hexBytes("2ec848c1a77981da003e3ce3b028c5e46ba5bebc032dce29eb892a57092d5c09")},
		{"RFC 5649 with a 256-bit KEK, 1 byte", kek256, kwData[:1], hexBytes("10ad3d61a7fb0fa563ab52e039e5a83d")},
	}
)

// pathResult is what the known-answer test found of one mechanism on one
// path.
type pathResult struct {
	// offered is whether the token's mechanism flags offer the path.
	offered bool
	// err is nil when the path passed the test (for RFC 5649, the whole-block
	// vectors); else why it did not.
	err error
	// anyLength is, for RFC 5649, whether plaintexts that are not whole
	// 8-byte blocks came out right too; for RFC 3394, which takes whole
	// blocks only, it is true.
	anyLength bool
}

func (r pathResult) passed() bool { return r.offered && r.err == nil }

// mechanismResult is the known-answer test of one mechanism on both paths.
type mechanismResult struct {
	mech  uint
	paths [numPaths]pathResult
}

func (m mechanismResult) passed() bool {
	return m.paths[cryptPath].passed() || m.paths[objectPath].passed()
}

// anyLength reports whether a path that passed takes every length.
func (m mechanismResult) anyLength() bool {
	return (m.paths[cryptPath].passed() && m.paths[cryptPath].anyLength) ||
		(m.paths[objectPath].passed() && m.paths[objectPath].anyLength)
}

// describe says what the test found, for logs and errors.
func (m mechanismResult) describe() string {
	var parts []string
	c, o := m.paths[cryptPath], m.paths[objectPath]
	if c.offered && o.offered && c.err != nil && o.err != nil && selfTestFailure(c.err) == selfTestFailure(o.err) {
		return fmt.Sprintf("%s: %s and %s fail: %s", mechanismName(m.mech), cryptPath, objectPath, selfTestFailure(c.err))
	}
	for p, r := range m.paths {
		switch {
		case !r.offered:
		case r.err != nil:
			parts = append(parts, fmt.Sprintf("%s fails: %s", wrapPath(p), selfTestFailure(r.err)))
		case r.anyLength:
			parts = append(parts, fmt.Sprintf("%s passes", wrapPath(p)))
		default:
			parts = append(parts, fmt.Sprintf("%s passes for whole 8-byte blocks only", wrapPath(p)))
		}
	}
	if len(parts) == 0 {
		return mechanismName(m.mech) + ": not offered by the token"
	}
	return mechanismName(m.mech) + ": " + strings.Join(parts, "; ")
}

// selfTestFailure says why a path failed the known-answer test: the
// token's error, or the wrong answer.
func selfTestFailure(err error) string {
	if e, ok := errors.AsType[*Error](err); ok {
		if e.CKR != "" {
			return "the token answers " + e.CKR
		}
		if e.Err != nil {
			return e.Err.Error()
		}
	}
	return err.Error()
}

// keyWrapSupport is what Open proved about key wrap on the backend's token.
type keyWrapSupport struct {
	kw  mechanismResult
	kwp mechanismResult
	// oaep is the C_GetMechanismInfo flags of CKM_RSA_PKCS_OAEP (0 when the
	// token does not offer it).
	oaep uint
}

// path chooses the path of alg for a key with usage, in the direction dir
// ("wrap" or "unwrap"), and says whether the path takes every plaintext
// length.
func (s *keyWrapSupport) path(alg WrapAlgorithm, u keyUsage, dir string) (mechanismResult, wrapPath, bool, error) {
	m := s.kw
	if alg == AESKeyWrapPad {
		m = s.kwp
	}
	if !m.passed() {
		return m, 0, false, &Error{Kind: ErrUnsupportedAlgorithm, Err: fmt.Errorf("the token does not offer %s, or its mechanism failed the known-answer test at start-up (%s)", alg, m.describe())}
	}
	for p := range numPaths {
		if m.paths[p].passed() && u.permits(p, dir) {
			return m, p, m.paths[p].anyLength, nil
		}
	}
	var needs []string
	for p := range numPaths {
		if m.paths[p].passed() {
			needs = append(needs, "CKA_"+strings.ToUpper(usageFor(p, dir)))
		}
	}
	return m, 0, false, &Error{Kind: ErrKeyUsage, Err: fmt.Errorf("the token does %s through %s, which the key does not permit (%s false)",
		alg, m.describe(), strings.Join(needs, " and "))}
}

// serves reports why key w can do no algorithm of its kind both ways on
// this token, or nil when it can do one.
func (s *keyWrapSupport) serves(w *wrapKey) error {
	if w.unfit != nil {
		return &Error{Kind: ErrKeyUsage, Err: w.unfit}
	}
	if w.typ == WrapKeyRSA {
		byDecrypt := s.oaep&pkcs11.CKF_DECRYPT != 0 && w.usage.decrypt
		byUnwrap := s.oaep&pkcs11.CKF_UNWRAP != 0 && w.usage.unwrap
		switch {
		case s.oaep&(pkcs11.CKF_DECRYPT|pkcs11.CKF_UNWRAP) == 0:
			return &Error{Kind: ErrUnsupportedAlgorithm, Err: errors.New("the token does not offer CKM_RSA_PKCS_OAEP for decryption or unwrapping")}
		case !byDecrypt && !byUnwrap:
			return &Error{Kind: ErrKeyUsage, Err: errors.New("the private key permits neither of the ways the token does OAEP: set CKA_DECRYPT or CKA_UNWRAP")}
		}
		return nil
	}
	var first error
	for _, alg := range []WrapAlgorithm{AESKeyWrap, AESKeyWrapPad} {
		_, _, _, err := s.path(alg, w.usage, "wrap")
		if err == nil {
			_, _, _, err = s.path(alg, w.usage, "unwrap")
		}
		if err == nil {
			return nil
		}
		if first == nil || errors.Is(first, ErrUnsupportedAlgorithm) {
			first = err
		}
	}
	return first
}

// keyUsage is what a key-encryption key permits.
type keyUsage struct {
	encrypt, decrypt, wrap, unwrap bool
}

func usageFor(p wrapPath, dir string) string {
	switch {
	case p == cryptPath && dir == "wrap":
		return "encrypt"
	case p == cryptPath:
		return "decrypt"
	case dir == "wrap":
		return "wrap"
	}
	return "unwrap"
}

func (u keyUsage) permits(p wrapPath, dir string) bool {
	switch usageFor(p, dir) {
	case "encrypt":
		return u.encrypt
	case "decrypt":
		return u.decrypt
	case "wrap":
		return u.wrap
	}
	return u.unwrap
}

// errSelfTest marks a known-answer test whose answer was wrong.
var errSelfTest = errors.New("wrong answer to the known-answer test")

// proveKeyWrap runs the known-answer tests of AES key wrap on the token and
// reads the RSA-OAEP mechanism's flags. kwpMech is the configured RFC 5649
// mechanism, or 0 to probe kwpCandidates. A configured mechanism that fails
// the test is an error naming the candidate that passes, if one does; a
// probed one that fails only leaves A256KWP unsupported. The test could not
// run at all (the token is unavailable, busy, slow) is an error too.
func (b *Backend) proveKeyWrap(ctx context.Context, kwpMech uint) (*keyWrapSupport, error) {
	s := new(keyWrapSupport)
	var err error
	if s.kw, err = b.proveMechanism(ctx, ckmAESKeyWrap, kwVectors, nil); err != nil {
		return nil, err
	}
	candidates := kwpCandidates
	if kwpMech != 0 {
		candidates = []uint{kwpMech}
	}
	results := make([]mechanismResult, 0, len(kwpCandidates)+1)
	for _, m := range candidates {
		r, err := b.proveMechanism(ctx, m, kwpWholeVectors, kwpPartVectors)
		if err != nil {
			return nil, err
		}
		results = append(results, r)
	}
	s.kwp = bestKWP(results)
	if kwpMech != 0 {
		if err := b.checkConfiguredKWP(ctx, s.kwp); err != nil {
			return nil, err
		}
	}
	flags, err := b.mechanismFlags(ctx, pkcs11.CKM_RSA_PKCS_OAEP)
	if err != nil {
		return nil, err
	}
	s.oaep = flags
	return s, nil
}

// bestKWP picks the first result that takes every length, else the first
// that passed, else the first.
func bestKWP(results []mechanismResult) mechanismResult {
	if i := slices.IndexFunc(results, mechanismResult.anyLength); i >= 0 {
		return results[i]
	}
	if i := slices.IndexFunc(results, mechanismResult.passed); i >= 0 {
		return results[i]
	}
	return results[0]
}

// checkConfiguredKWP refuses a configured kwp_mechanism that failed its
// known-answer test, naming the number that passes; one that passes for
// whole blocks only while another takes every length is logged.
func (b *Backend) checkConfiguredKWP(ctx context.Context, got mechanismResult) error {
	if got.anyLength() {
		return nil
	}
	var better *mechanismResult
	for _, m := range kwpCandidates {
		if m == got.mech {
			continue
		}
		r, err := b.proveMechanism(ctx, m, kwpWholeVectors, kwpPartVectors)
		if err != nil {
			return err
		}
		if r.passed() && (!got.passed() || r.anyLength()) {
			better = &r
			break
		}
	}
	if got.passed() {
		if better != nil {
			b.logger.Warn("kwp_mechanism wraps only whole 8-byte blocks right on this token, and another mechanism wraps every length",
				zap.String("backend", b.name), zap.String("configured", got.describe()), zap.String("use", better.describe()))
		}
		return nil
	}
	msg := fmt.Sprintf("kwp_mechanism %s fails the RFC 5649 known-answer test on this token (%s)", mechanismName(got.mech), got.describe())
	if better != nil {
		return fmt.Errorf("%s; set kwp_mechanism 0x%X, which passes it (%s), or leave kwp_mechanism unset to probe", msg, better.mech, better.describe())
	}
	return fmt.Errorf("%s, and so does every other number tried (%s); this token cannot serve A256KWP: remove kwp_mechanism", msg, strings.Join(mechanismNames(kwpCandidates), ", "))
}

func mechanismNames(ms []uint) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = mechanismName(m)
	}
	return out
}

// mechanismFlags returns the token's C_GetMechanismInfo flags for mech, 0
// when it does not offer the mechanism.
func (b *Backend) mechanismFlags(ctx context.Context, mech uint) (uint, error) {
	var flags uint
	err := b.run(ctx, "mechanism info", "", b.adminTimeout, func(cs *callSession) error {
		mi, err := cs.ctx.GetMechanismInfo(cs.st.slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)})
		switch {
		case err == nil:
			flags = mi.Flags
		case isCKR(err, pkcs11.CKR_MECHANISM_INVALID):
		default:
			return err
		}
		return nil
	})
	return flags, err
}

// proveMechanism runs the known-answer test of mech on each path its flags
// offer: whole, the vectors every implementation must pass, then part, the
// vectors of lengths that are not whole blocks (RFC 5649 only). Each group
// runs in a call of its own, so that a token refusing one leaves no active
// operation behind. Only a token failure is an error; a wrong answer or a
// refused vector is the result.
func (b *Backend) proveMechanism(ctx context.Context, mech uint, whole, part []kwVector) (mechanismResult, error) {
	r := mechanismResult{mech: mech}
	flags, err := b.mechanismFlags(ctx, mech)
	if err != nil {
		return r, err
	}
	offered := pathsOf(flags)
	for p := range numPaths {
		pr := &r.paths[p]
		if pr.offered = offered[p]; !pr.offered {
			continue
		}
		pr.err = b.runVectors(ctx, mech, p, whole)
		if pr.err != nil && tokenFailure(pr.err) {
			return r, pr.err
		}
		if part == nil {
			// RFC 3394 takes whole blocks only: the whole vectors are all.
			pr.anyLength = true
		}
		if pr.err != nil || part == nil {
			continue
		}
		perr := b.runVectors(ctx, mech, p, part)
		if perr != nil && tokenFailure(perr) {
			return r, perr
		}
		pr.anyLength = perr == nil
		if perr != nil {
			b.logger.Debug("key wrap known-answer test: lengths that are not whole blocks fail",
				zap.String("backend", b.name), zap.String("mechanism", mechanismName(mech)), zap.Stringer("path", p), zap.Error(perr))
		}
	}
	return r, nil
}

// runVectors wraps and unwraps each vector on one path with session KEKs of
// the vectors' values, and compares the answers with the vectors'.
func (b *Backend) runVectors(ctx context.Context, mech uint, path wrapPath, vectors []kwVector) error {
	return b.run(ctx, "key wrap self-test", "", b.adminTimeout, func(cs *callSession) error {
		for _, v := range vectors {
			if err := cs.runVector(mech, path, v); err != nil {
				return err
			}
		}
		return nil
	})
}

func (cs *callSession) runVector(mech uint, path wrapPath, v kwVector) error {
	kek, err := cs.ctx.CreateObject(cs.h, sessionKEKTemplate(v.kek, cs.b.privateKeys))
	if err != nil {
		return err
	}
	defer func() { _ = cs.ctx.DestroyObject(cs.h, kek) }()
	got, err := cs.aesWrap(mech, path, kek, v.plaintext)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, v.wrapped) {
		return &Error{Kind: ErrInternal, Op: "key wrap self-test",
			Err: fmt.Errorf("%w: %s: wrapping %d bytes gave %d bytes (%x), not the %d of the vector (%x)", errSelfTest, v.source, len(v.plaintext), len(got), got, len(v.wrapped), v.wrapped)}
	}
	back, err := cs.aesUnwrap(mech, path, kek, v.wrapped)
	if err != nil {
		return err
	}
	if !bytes.Equal(back, v.plaintext) {
		return &Error{Kind: ErrInternal, Op: "key wrap self-test",
			Err: fmt.Errorf("%w: %s: unwrapping gave %d bytes, want %d", errSelfTest, v.source, len(back), len(v.plaintext))}
	}
	return nil
}

// sessionKEKTemplate is an AES session key of a known value, for the
// known-answer test: it vanishes with its session, and permits both paths.
func sessionKEKTemplate(value []byte, private bool) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, private),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, value),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
	}
}

// dekTemplate is the session object a DEK becomes on the object path:
// never a token object, and readable, since its value is what the caller
// sent or asked for. value is nil for C_UnwrapKey's template.
func dekTemplate(value []byte, private bool) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, private),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
	}
	if value != nil {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_VALUE, value))
	}
	return t
}

// aesWrap wraps pt under kek with mech on path. C_Encrypt gets a buffer
// sized for the longest answer: NSS softokn answers miekg/pkcs11's length
// query for RFC 5649 with the plaintext's length.
func (cs *callSession) aesWrap(mech uint, path wrapPath, kek pkcs11.ObjectHandle, pt []byte) ([]byte, error) {
	m := []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}
	if path == cryptPath {
		if err := cs.ctx.EncryptInit(cs.h, m, kek); err != nil {
			return nil, err
		}
		return cs.t.lib.fns.encrypt(cs.h, pt, len(pt)+16)
	}
	dek, err := cs.ctx.CreateObject(cs.h, dekTemplate(pt, cs.b.privateKeys))
	if err != nil {
		return nil, err
	}
	defer cs.destroy(dek)
	return cs.ctx.WrapKey(cs.h, m, kek, dek)
}

// aesUnwrap unwraps wrapped under kek with mech on path.
func (cs *callSession) aesUnwrap(mech uint, path wrapPath, kek pkcs11.ObjectHandle, wrapped []byte) ([]byte, error) {
	m := []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}
	if path == cryptPath {
		if err := cs.ctx.DecryptInit(cs.h, m, kek); err != nil {
			return nil, err
		}
		return cs.t.lib.fns.decrypt(cs.h, wrapped, len(wrapped))
	}
	return cs.unwrapToValue(m, kek, wrapped)
}

// unwrapToValue runs C_UnwrapKey into a session object, reads its value and
// destroys it.
func (cs *callSession) unwrapToValue(m []*pkcs11.Mechanism, kek pkcs11.ObjectHandle, wrapped []byte) ([]byte, error) {
	dek, err := cs.ctx.UnwrapKey(cs.h, m, kek, wrapped, dekTemplate(nil, cs.b.privateKeys))
	if err != nil {
		return nil, err
	}
	defer cs.destroy(dek)
	attrs, err := cs.ctx.GetAttributeValue(cs.h, dek, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if err != nil {
		return nil, err
	}
	if len(attrs) != 1 {
		return nil, &Error{Kind: ErrInternal, Op: "unwrap key", Err: errors.New("the token did not return the unwrapped value")}
	}
	return attrs[0].Value, nil
}

// destroy destroys a session object the call made. A failure is logged:
// the object still vanishes with its session, which is closed instead of
// going back to the pool.
func (cs *callSession) destroy(h pkcs11.ObjectHandle) {
	if err := cs.ctx.DestroyObject(cs.h, h); err != nil {
		cs.discard = true
		cs.t.logger.Warn("destroying a session object failed; closing its session", zap.String("ckr", ckrNameOf(err)))
	}
}
