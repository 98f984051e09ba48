package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// ivMode is how an AES-GCM IV comes to be, which depends on the HSM vendor.
type ivMode int

const (
	// ivAuto detects the mode at start-up.
	ivAuto ivMode = iota
	// ivCaller: the backend draws 12 random bytes (SoftHSM2, which never
	// generates an IV, and Luna outside FIPS mode).
	ivCaller
	// ivHSM: the backend passes 12 zero bytes and the HSM writes the IV it
	// used into them (nShield, CloudHSM, Utimaco, Marvell).
	ivHSM
	// ivHSMAppended: the HSM appends a 16-byte IV to ciphertext‖tag (Luna
	// in FIPS mode).
	ivHSMAppended
)

var ivModeNames = [...]string{ivAuto: "auto", ivCaller: "caller", ivHSM: "hsm", ivHSMAppended: "hsm_appended"}

func (m ivMode) String() string { return ivModeNames[m] }

func parseIVMode(s string) (ivMode, error) {
	if s == "" {
		return ivAuto, nil
	}
	for m, name := range ivModeNames {
		if s == name {
			return ivMode(m), nil
		}
	}
	return 0, fmt.Errorf("unknown iv mode %q (want auto, caller, hsm or hsm_appended)", s)
}

// gcmTagBits is the tag length asked of the HSM: the spec's 16 bytes.
const gcmTagBits = 8 * xksapi.TagLen

// EncryptResult is the output of Encrypt.
type EncryptResult struct {
	// IV is the 12-byte (16 for hsm_appended) initialization vector.
	IV []byte
	// Ciphertext is as long as the plaintext.
	Ciphertext []byte
	// Tag is the 16-byte authentication tag.
	Tag []byte
}

// outputLenError reports an HSM output of unexpected length.
type outputLenError struct{ got, want int }

func (e *outputLenError) Error() string {
	return fmt.Sprintf("hsm returned %d bytes of ciphertext, expected %d", e.got, e.want)
}

// encryptGCM runs one single-part AES-GCM encryption with a fresh
// CK_GCM_PARAMS: an HSM writes its IV into the parameters' buffer, so one may
// never be reused, and the buffer must be read before it is freed.
func encryptGCM(cs *callSession, key pkcs11.ObjectHandle, mode ivMode, pt, aad []byte) (iv, ct, tag []byte, err error) {
	var ivIn []byte
	switch mode {
	case ivCaller:
		ivIn = make([]byte, xksapi.IVLen)
		_, _ = rand.Read(ivIn) // never fails (crypto/rand crashes the program instead)
	case ivHSM:
		ivIn = make([]byte, xksapi.IVLen)
	case ivHSMAppended, ivAuto:
		// No IV goes in: the HSM appends its own, and the probes that
		// resolve ivAuto pass one of the other modes.
	}
	params := pkcs11.NewGCMParams(ivIn, aad, gcmTagBits)
	defer params.Free()
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
	if err := cs.ctx.EncryptInit(cs.h, mech, key); err != nil {
		return nil, nil, nil, err
	}
	n := len(pt)
	want := n + xksapi.TagLen
	if mode == ivHSMAppended {
		want += xksapi.LongIVLen
	}
	// Room for an appended IV in every mode: a module that appends one
	// where none was expected must be seen doing it, not fail for lack of
	// space.
	out, err := cs.t.lib.fns.encrypt(cs.h, pt, n+xksapi.TagLen+xksapi.LongIVLen)
	if err != nil {
		return nil, nil, nil, err
	}
	if len(out) != want {
		return nil, nil, nil, &outputLenError{got: len(out), want: want}
	}
	if mode == ivHSMAppended {
		iv = out[n+xksapi.TagLen:]
	} else {
		// The IV the HSM actually used, whatever was passed in.
		iv = params.IV()
	}
	return iv, out[:n:n], out[n : n+xksapi.TagLen : n+xksapi.TagLen], nil
}

// decryptGCM decrypts ct‖tag. Failures of C_Decrypt itself mean the
// ciphertext did not authenticate: SoftHSM2 answers CKR_GENERAL_ERROR and
// nShield CKR_FUNCTION_FAILED rather than CKR_ENCRYPTED_DATA_INVALID. Those
// two codes are also what a failing device can answer, so before they are
// called invalid ciphertext (a 400 that KMS never retries) the token is
// checked (tokenAnswers); if the check fails too, its error is returned and
// handled like any other: a device error reconnects, a dead session is
// retried on a new one.
func decryptGCM(cs *callSession, key pkcs11.ObjectHandle, op, label string, iv, ct, tag, aad []byte) ([]byte, error) {
	in := make([]byte, 0, len(ct)+len(tag))
	in = append(append(in, ct...), tag...)
	params := pkcs11.NewGCMParams(iv, aad, gcmTagBits)
	defer params.Free()
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
	if err := cs.ctx.DecryptInit(cs.h, mech, key); err != nil {
		return nil, err
	}
	pt, err := cs.t.lib.fns.decrypt(cs.h, in, len(in))
	if err != nil {
		return nil, cs.decryptFailure(err, op, label)
	}
	if len(pt) != len(ct) {
		return nil, &Error{Kind: ErrInternal, Op: op, Key: label, Err: &outputLenError{got: len(pt), want: len(ct)}}
	}
	return pt, nil
}

// decryptFailure says what a failed C_Decrypt or C_UnwrapKey means. The
// codes PKCS#11 gives a ciphertext or wrapped key that does not
// authenticate mean just that (ErrInvalidCiphertext); so do
// CKR_GENERAL_ERROR (SoftHSM2) and CKR_FUNCTION_FAILED (nShield) if the
// token answers a cheap check right after (tokenAnswers). Anything else,
// and the check's own error, is returned as it is, for the pool to handle.
func (cs *callSession) decryptFailure(err error, op, label string) error {
	switch code, _ := ckrOf(err); code {
	case pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE,
		pkcs11.CKR_WRAPPED_KEY_INVALID, pkcs11.CKR_WRAPPED_KEY_LEN_RANGE:
		return &Error{Kind: ErrInvalidCiphertext, Op: op, Key: label, CKR: ckrName(code), Err: err}
	case pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_FUNCTION_FAILED:
		if cerr := cs.tokenAnswers(); cerr != nil {
			cs.t.logger.Warn("decryption failed and the token failed a check right after: an hsm fault, not invalid ciphertext",
				zap.String("key", label), zap.String("decrypt_ckr", ckrName(code)), zap.String("check_ckr", ckrNameOf(cerr)))
			return cerr
		}
		return &Error{Kind: ErrInvalidCiphertext, Op: op, Key: label, CKR: ckrName(code), Err: err}
	}
	return err
}

// tokenAnswers tells a bad ciphertext from a failing token after C_Decrypt
// answered CKR_GENERAL_ERROR or CKR_FUNCTION_FAILED. It asks for the
// session's state (C_GetSessionInfo), then the token's (C_GetTokenInfo: a
// network HSM's client library may keep session state to itself, but has to
// ask the device about the token). Neither call sees the ciphertext, so a
// bad one cannot make them fail, and C_GetSessionInfo is allowed while an
// operation is still active, as a vendor may leave it after a failed
// C_Decrypt. They are cheap and need no second session: on SoftHSM2 they
// cost about 0.3 and 16 µs (C_GetTokenInfo re-reads the token's files)
// beside 33 µs for the decryption. A health-style round trip would be surer
// but costs a key generation, two AES operations and a second pool slot for
// every bad tag, slots that requests may be waiting for.
func (cs *callSession) tokenAnswers() error {
	if _, err := cs.ctx.GetSessionInfo(cs.h); err != nil {
		return err
	}
	if _, err := cs.ctx.GetTokenInfo(cs.st.slot); err != nil {
		return err
	}
	return nil
}

// Encrypt encrypts plaintext under the AES-256 key labelled keyLabel with
// AES-GCM, authenticating aad, and returns the IV, the ciphertext (as long as
// the plaintext) and the 16-byte tag. An IV that is all zeros or that the
// backend returned before is an error, never a silent nonce reuse.
func (b *Backend) Encrypt(ctx context.Context, keyLabel string, plaintext, aad []byte) (EncryptResult, error) {
	var res EncryptResult
	err := b.run(ctx, "encrypt", keyLabel, b.callTimeout, func(cs *callSession) error {
		k, err := cs.key("encrypt", keyLabel)
		if err != nil {
			return err
		}
		if err := k.check("encrypt"); err != nil {
			return err
		}
		iv, ct, tag, err := encryptGCM(cs, k.handle, b.ivMode, plaintext, aad)
		if err != nil {
			if _, ok := errors.AsType[*outputLenError](err); ok {
				return &Error{Kind: ErrInternal, Op: "encrypt", Key: keyLabel, Err: err}
			}
			return err
		}
		if err := cs.t.ivs.observe(iv); err != nil {
			b.logger.Error("refusing hsm output", zap.String("key", keyLabel),
				zap.Stringer("iv_mode", b.ivMode), zap.Error(err))
			return &Error{Kind: ErrInternal, Op: "encrypt", Key: keyLabel, Err: err}
		}
		res = EncryptResult{IV: iv, Ciphertext: ct, Tag: tag}
		return nil
	})
	if err != nil {
		return EncryptResult{}, err
	}
	return res, nil
}

// Decrypt authenticates and decrypts ciphertext with the key labelled
// keyLabel. A ciphertext, tag, IV or AAD that does not authenticate is
// ErrInvalidCiphertext.
func (b *Backend) Decrypt(ctx context.Context, keyLabel string, iv, ciphertext, tag, aad []byte) ([]byte, error) {
	if len(tag) != xksapi.TagLen {
		return nil, &Error{Kind: ErrInvalidCiphertext, Op: "decrypt", Key: keyLabel, Err: fmt.Errorf("tag is %d bytes, not %d", len(tag), xksapi.TagLen)}
	}
	if !xksapi.ValidIVLen(len(iv)) {
		return nil, &Error{Kind: ErrInvalidCiphertext, Op: "decrypt", Key: keyLabel, Err: errIVLength}
	}
	var pt []byte
	err := b.run(ctx, "decrypt", keyLabel, b.callTimeout, func(cs *callSession) error {
		k, err := cs.key("decrypt", keyLabel)
		if err != nil {
			return err
		}
		if err := k.check("decrypt"); err != nil {
			return err
		}
		pt, err = decryptGCM(cs, k.handle, "decrypt", keyLabel, iv, ciphertext, tag, aad)
		return err
	})
	if err != nil {
		return nil, err
	}
	return pt, nil
}

// selfTestPlaintext and selfTestAAD are what the start-up and health checks
// encrypt, under a throw-away session key.
var (
	selfTestPlaintext = []byte("caddy-xks iv self-test plaintext")
	selfTestAAD       = []byte("caddy-xks self-test aad")
)

// sessionKey generates an AES-256 session key (CKA_TOKEN false, no label):
// it is invisible to key searches and vanishes with its session.
func (cs *callSession) sessionKey(private bool) (pkcs11.ObjectHandle, error) {
	return cs.ctx.GenerateKey(cs.h,
		[]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)},
		keyTemplate("", private, false, Usage{Encrypt: true, Decrypt: true}))
}

// verifyMode proves that mode works with key: two encryptions of one
// plaintext give different, non-zero IVs and ciphertexts, and both decrypt.
func verifyMode(cs *callSession, key pkcs11.ObjectHandle, mode ivMode) error {
	var ivs, outs [2][]byte
	for i := range ivs {
		iv, ct, tag, err := encryptGCM(cs, key, mode, selfTestPlaintext, selfTestAAD)
		if err != nil {
			return err
		}
		if err := newIVRegistry(ivShards).observe(iv); err != nil {
			return err
		}
		pt, err := decryptGCM(cs, key, "self-test", "", iv, ct, tag, selfTestAAD)
		if err != nil {
			return fmt.Errorf("decrypting own ciphertext: %w", err)
		}
		if !bytes.Equal(pt, selfTestPlaintext) {
			return errors.New("decrypting own ciphertext gave another plaintext")
		}
		ivs[i], outs[i] = iv, append(ct, tag...)
	}
	if bytes.Equal(ivs[0], ivs[1]) {
		return errRepeatedIV
	}
	if bytes.Equal(outs[0], outs[1]) {
		return errors.New("two encryptions gave the same ciphertext")
	}
	return nil
}

// errPrivateObjectsRefused: the token would not make the self-test's
// private session key, but made the same key without CKA_PRIVATE.
var errPrivateObjectsRefused = errors.New("the token refused a private session key and made one that is not private: " +
	"a token that cannot hold private objects, such as the nShield accelerator slot, needs private_keys false")

// privateKeyRefusal is the self-test's error when the token did not make
// its session key (err): with private_keys true on a token that cannot hold
// private objects, one that says which setting that token needs.
func (b *Backend) privateKeyRefusal(cs *callSession, err error) error {
	if !b.privateKeys || !cs.refusesPrivateKeys(err) {
		return err
	}
	return &Error{Kind: ErrInternal, Op: "iv self-test", CKR: ckrNameOf(err), Err: errPrivateObjectsRefused}
}

// probeMode runs verifyMode on a fresh session key in its own call, so a
// mode the HSM rejects leaves no active operation on a pooled session.
func (b *Backend) probeMode(ctx context.Context, mode ivMode) error {
	return b.run(ctx, "iv self-test", "", b.adminTimeout, func(cs *callSession) error {
		key, err := cs.sessionKey(b.privateKeys)
		if err != nil {
			return b.privateKeyRefusal(cs, err)
		}
		defer func() { _ = cs.ctx.DestroyObject(cs.h, key) }()
		err = verifyMode(cs, key, mode)
		if err != nil {
			if _, isCKR := ckrOf(err); isCKR {
				// Final (no retry), and the session is not reused.
				return &Error{Kind: ErrInternal, Op: "iv self-test", CKR: ckrNameOf(err), Err: err}
			}
			if _, ok := errors.AsType[*Error](err); !ok {
				return &Error{Kind: ErrInternal, Op: "iv self-test", Err: err}
			}
		}
		return err
	})
}

// resolveIVMode checks the configured IV mode on this token, or detects one
// for "auto". A configured mode that fails its self-test is refused, and the
// error names the mode that works, if one does.
func (b *Backend) resolveIVMode(ctx context.Context, mode ivMode) (ivMode, error) {
	probed := make(map[ivMode]error)
	if mode == ivAuto {
		return b.detectIVMode(ctx, probed)
	}
	err := b.probeMode(ctx, mode)
	if err == nil {
		return mode, nil
	}
	if !tokenFailure(err) {
		probed[mode] = err
		if works, derr := b.detectIVMode(ctx, probed); derr == nil {
			return 0, fmt.Errorf("iv mode %s does not work on this token: %w; the self-test passes with iv %s: set that (or iv auto)", mode, err, works)
		}
	}
	return 0, fmt.Errorf("iv mode %s does not work on this token: %w", mode, err)
}

// detectIVMode returns the first IV mode whose self-test passes, in the
// order docs/nshield.md gives: hsm, then hsm_appended, then caller. probed
// holds the results of self-tests already run, which are not run again.
//
// The write-back test goes first: an HSM that generates IVs fills the 12
// zero bytes with a fresh IV, and one that does not (SoftHSM2) encrypts with
// the zero IV, which the test refuses; the throw-away key makes that
// harmless. The appended test gives the HSM no IV at all, which is the only
// form some Luna firmware accepts (it refuses any caller IV buffer, so the
// write-back test fails with CKR_MECHANISM_PARAM_INVALID), while a module
// that encrypted under the zero IV it was given has shown that it takes the
// caller's IV as it is, and may not handle an empty one any better: builds of
// SoftHSM2 with C++ assertions abort the process on an empty IV
// (pkcs11.md §1). So that module skips the appended test and goes on to
// caller-supplied IVs. A test that failed because of the token rather than
// the mode (it is unavailable, refused the PIN, timed out) ends the search:
// every other mode would fail the same way.
func (b *Backend) detectIVMode(ctx context.Context, probed map[ivMode]error) (ivMode, error) {
	order := []ivMode{ivHSM, ivHSMAppended, ivCaller}
	for _, m := range order {
		if m == ivHSMAppended && usesCallerIV(probed[ivHSM]) {
			b.logger.Debug("the hsm encrypted under the zero iv it was given; not asking it to append one",
				zap.String("backend", b.name))
			continue
		}
		err, ok := probed[m]
		if !ok {
			err = b.probeMode(ctx, m)
			probed[m] = err
		}
		if err == nil {
			return m, nil
		}
		if tokenFailure(err) {
			return 0, fmt.Errorf("the iv self-test could not run: %w", err)
		}
	}
	var msgs []string
	for _, m := range order[:2] {
		if err, ok := probed[m]; ok {
			msgs = append(msgs, fmt.Sprintf("%s: %v; ", m, err))
		}
	}
	return 0, fmt.Errorf("no iv mode works on this token: %scaller: %w", strings.Join(msgs, ""), probed[ivCaller])
}

// usesCallerIV reports whether a write-back self-test failed because the
// HSM encrypted under the IV it was given instead of generating one.
func usesCallerIV(err error) bool {
	return errors.Is(err, errZeroIV) || errors.Is(err, errRepeatedIV)
}

// tokenFailure reports whether a self-test failed because of the token
// (unavailable, busy, too slow, refusing private objects) rather than the
// IV mode.
func tokenFailure(err error) bool {
	return errors.Is(err, ErrUnavailable) || errors.Is(err, ErrBusy) || errors.Is(err, ErrTimeout) ||
		errors.Is(err, errPrivateObjectsRefused)
}
