package hsm

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1" //nolint:gosec // RSA-OAEP with SHA-1 is an algorithm Azure sends (Azure Storage); OAEP does not rely on SHA-1's collision resistance
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"

	"github.com/miekg/pkcs11"
)

// RSA-OAEP. Unwrap runs in the HSM, on the private key, with
// CKM_RSA_PKCS_OAEP and the algorithm's hash and MGF: never a raw RSA
// decryption whose padding the host would check, which would put the
// padding oracle on the host. Wrap needs only the public key, so it is done
// in software (crypto/rsa) with the modulus and exponent read from the
// token; before a key pair's first wrap with a hash, the backend proves
// that the HSM unwraps what it wraps (proveOAEP), so that it never hands
// out a wrapped key that cannot be unwrapped: a public key that is not the
// private key's, or a token that cannot do OAEP with that hash (SoftHSM2
// does SHA-1 only, and refuses SHA-256 with CKR_ARGUMENTS_BAD).

// oaepHash is the hash of an RSA-OAEP algorithm: its index in
// wrapKey.proofs, its PKCS#11 parameters and its Go implementation.
type oaepHash struct {
	index   int
	hashAlg uint
	mgf     uint
	new     func() hash.Hash
	size    int
}

var (
	oaepSHA1   = oaepHash{0, pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, sha1.New, sha1.Size}
	oaepSHA256 = oaepHash{1, pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, sha256.New, sha256.Size}
)

func oaepOf(alg WrapAlgorithm) oaepHash {
	if alg == RSAOAEP256 {
		return oaepSHA256
	}
	return oaepSHA1
}

// mechanism is CKM_RSA_PKCS_OAEP with h's hash and MGF and an empty label.
func (h oaepHash) mechanism() []*pkcs11.Mechanism {
	return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
		pkcs11.NewOAEPParams(h.hashAlg, h.mgf, pkcs11.CKZ_DATA_SPECIFIED, nil))}
}

// oaepProof is what proveOAEP found: err is nil when the HSM unwrapped what
// crypto/rsa wrapped with the token's public key.
type oaepProof struct{ err error }

// modulusLen is the length of the key's modulus, and of every ciphertext.
func (w *wrapKey) modulusLen() int { return (w.bits + 7) / 8 }

// rsaWrap wraps pt with the key pair's public key, in software, once the
// pair is proven for the algorithm's hash.
func (cs *callSession) rsaWrap(op, label string, k *keyEntry, alg WrapAlgorithm, pt []byte) ([]byte, error) {
	h := oaepOf(alg)
	w := k.wrap
	if most := w.modulusLen() - 2*h.size - 2; len(pt) > most {
		return nil, &Error{Kind: ErrInvalidInput, Op: op, Key: label, Err: fmt.Errorf("%s with an RSA-%d key takes at most %d bytes; got %d", alg, w.bits, most, len(pt))}
	}
	if err := cs.proveOAEP(op, label, k, alg); err != nil {
		return nil, err
	}
	ct, err := rsa.EncryptOAEP(h.new(), rand.Reader, w.pub, pt, nil)
	if err != nil {
		return nil, &Error{Kind: ErrInternal, Op: op, Key: label, Err: err}
	}
	if len(ct) != w.modulusLen() {
		return nil, &Error{Kind: ErrInternal, Op: op, Key: label, Err: &outputLenError{got: len(ct), want: w.modulusLen()}}
	}
	return ct, nil
}

// rsaUnwrap unwraps ct, which must be exactly as long as the modulus, in
// the HSM.
func (cs *callSession) rsaUnwrap(op, label string, k *keyEntry, alg WrapAlgorithm, ct []byte) ([]byte, error) {
	w := k.wrap
	if len(ct) != w.modulusLen() {
		return nil, &Error{Kind: ErrInvalidCiphertext, Op: op, Key: label,
			Err: fmt.Errorf("an RSA-%d ciphertext is %d bytes; got %d", w.bits, w.modulusLen(), len(ct))}
	}
	pt, err := cs.oaepDecrypt(op, label, k, alg, ct)
	if err != nil {
		return nil, err
	}
	if most := w.modulusLen() - 2*oaepOf(alg).size - 2; len(pt) > most {
		return nil, &Error{Kind: ErrInternal, Op: op, Key: label, Err: fmt.Errorf("the hsm unwrapped %d bytes with %s; at most %d fit", len(pt), alg, most)}
	}
	return pt, nil
}

// oaepDecrypt runs OAEP decryption on the private key: C_Decrypt where the
// token's mechanism flags and the key permit it, else C_UnwrapKey into a
// session object. A token that refuses the hash's parameters cannot do the
// algorithm (ErrUnsupportedAlgorithm).
func (cs *callSession) oaepDecrypt(op, label string, k *keyEntry, alg WrapAlgorithm, ct []byte) ([]byte, error) {
	flags := cs.b.keyWrap.oaep
	m := oaepOf(alg).mechanism()
	var pt []byte
	var err error
	switch {
	case flags&pkcs11.CKF_DECRYPT != 0 && k.wrap.usage.decrypt:
		if err := cs.ctx.DecryptInit(cs.h, m, k.handle); err != nil {
			if refusesParameters(err) {
				return nil, unsupportedOAEP(err, op, label, alg)
			}
			return nil, err
		}
		pt, err = cs.t.lib.fns.decrypt(cs.h, ct, len(ct))
	case flags&pkcs11.CKF_UNWRAP != 0 && k.wrap.usage.unwrap:
		pt, err = cs.unwrapToValue(m, k.handle, ct)
		if err != nil && refusesParameters(err) {
			return nil, unsupportedOAEP(err, op, label, alg)
		}
	case flags&(pkcs11.CKF_DECRYPT|pkcs11.CKF_UNWRAP) == 0:
		return nil, &Error{Kind: ErrUnsupportedAlgorithm, Op: op, Key: label, Err: errors.New("the token does not offer CKM_RSA_PKCS_OAEP for decryption or unwrapping")}
	default:
		return nil, &Error{Kind: ErrKeyUsage, Op: op, Key: label, Err: fmt.Errorf("the private key permits neither of the ways the token does OAEP (C_Decrypt: %t, C_UnwrapKey: %t): set CKA_DECRYPT or CKA_UNWRAP",
			flags&pkcs11.CKF_DECRYPT != 0, flags&pkcs11.CKF_UNWRAP != 0)}
	}
	if err != nil {
		return nil, cs.decryptFailure(err, op, label)
	}
	return pt, nil
}

// refusesParameters reports whether err is a token's refusal of a
// mechanism's parameters, which SoftHSM2 answers OAEP with SHA-256 with.
func refusesParameters(err error) bool {
	switch code, _ := ckrOf(err); code {
	case pkcs11.CKR_ARGUMENTS_BAD, pkcs11.CKR_MECHANISM_PARAM_INVALID, pkcs11.CKR_MECHANISM_INVALID:
		return true
	}
	return false
}

func unsupportedOAEP(err error, op, label string, alg WrapAlgorithm) *Error {
	return &Error{Kind: ErrUnsupportedAlgorithm, Op: op, Key: label, CKR: ckrNameOf(err),
		Err: fmt.Errorf("the token refuses %s's parameters", alg)}
}

// proveOAEP proves, once per key pair and hash, that the HSM unwraps what
// crypto/rsa wraps with the pair's public key as the token shows it: a
// random message, wrapped in software and unwrapped in the HSM, comes back.
// A failure that says something of the pair or the token (another private
// key, a hash the token refuses) is kept; one that says something of the
// moment (a busy or failing token) is returned and proven again next time.
func (cs *callSession) proveOAEP(op, label string, k *keyEntry, alg WrapAlgorithm) error {
	h := oaepOf(alg)
	if p := k.wrap.proofs[h.index].Load(); p != nil {
		if p.err == nil {
			return nil
		}
		return withOp(p.err, op, label)
	}
	msg := make([]byte, 32)
	_, _ = rand.Read(msg) // never fails
	ct, err := rsa.EncryptOAEP(h.new(), rand.Reader, k.wrap.pub, msg, nil)
	if err != nil {
		return &Error{Kind: ErrInternal, Op: op, Key: label, Err: err}
	}
	pt, err := cs.oaepDecrypt(op, label, k, alg, ct)
	var proof oaepProof
	switch {
	case err == nil && bytes.Equal(pt, msg):
	case err == nil, errors.Is(err, ErrInvalidCiphertext):
		proof.err = &Error{Kind: ErrKeyUsage, Op: op, Key: label, Err: fmt.Errorf(
			"a message wrapped with %s under the public key labelled %s does not unwrap with the private key: the two are not one key pair", alg, quote(label))}
	case errors.Is(err, ErrUnsupportedAlgorithm), errors.Is(err, ErrKeyUsage):
		proof.err = withOp(err, op, label)
	default:
		return err
	}
	k.wrap.proofs[h.index].Store(&proof)
	return proof.err
}
