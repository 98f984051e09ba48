package hsm

import (
	"bytes"
	"context"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// The key-encryption keys of key wrap: an AES-256 secret key, or an RSA key
// pair of 2048, 3072 or 4096 bits (the sizes Azure Managed HSM accepts),
// found by label like the AES-GCM keys but in a cache of their own. A label
// names one key: one secret key or one private key, and with a private key
// at most one public key, which is how the wrap half of RSA is done (in
// software, with the public key read from the token).

// Key-encryption key types, as WrapKeyMetadata reports them.
const (
	WrapKeyAES = "AES"
	WrapKeyRSA = "RSA"
)

// rsaBits are the RSA modulus sizes a key-encryption key may have.
var rsaBits = []int{2048, 3072, 4096}

// WrapKeyMetadata describes a key-encryption key.
type WrapKeyMetadata struct {
	// Type is "AES" or "RSA".
	Type string
	// Bits is the AES key's length, or the RSA modulus's, in bits.
	Bits int
	// Modulus and PublicExponent are an RSA key's public key, unsigned
	// big-endian without leading zero bytes (65537 is 01 00 01).
	Modulus, PublicExponent []byte
}

// wrapKey is what a key-encryption key's cache entry holds besides its
// handle (the secret key's, or the private key's).
type wrapKey struct {
	// typ is WrapKeyAES or WrapKeyRSA, or for a key of any other kind what
	// it is (its XKS key spec, or the private key's key type).
	typ   string
	bits  int
	usage keyUsage
	// public is the RSA public key object, 0 when the token holds none
	// under the label (the private key's own public attributes then
	// serve).
	public            pkcs11.ObjectHandle
	pub               *rsa.PublicKey
	modulus, exponent []byte
	// unfit says why the key serves no key wrap algorithm, nil when it is an
	// AES-256 key or an RSA key of a size in rsaBits whose public key is
	// its own.
	unfit error
	// proofs holds, by hash, what proveOAEP found of the key pair: nil
	// until proven.
	proofs [2]atomic.Pointer[oaepProof]
}

// metadata is the key's WrapKeyMetadata.
func (w *wrapKey) metadata() WrapKeyMetadata {
	return WrapKeyMetadata{Type: w.typ, Bits: w.bits, Modulus: w.modulus, PublicExponent: w.exponent}
}

// inherit carries over what prev, an entry of the same key pair, proved:
// only its successes, since a failure may have been the key's usage, which
// may have changed since.
func (w *wrapKey) inherit(prev *wrapKey) {
	if prev == nil || !bytes.Equal(prev.modulus, w.modulus) {
		return
	}
	for i := range w.proofs {
		if p := prev.proofs[i].Load(); p != nil && p.err == nil {
			w.proofs[i].Store(p)
		}
	}
}

// fits refuses an algorithm the key cannot serve: any, for a key of the
// wrong kind or size; an RSA algorithm with an AES key and the reverse.
func (w *wrapKey) fits(op, label string, alg WrapAlgorithm) error {
	if w.unfit != nil {
		return &Error{Kind: ErrKeyUsage, Op: op, Key: label, Err: w.unfit}
	}
	if alg.rsa() != (w.typ == WrapKeyRSA) {
		return &Error{Kind: ErrAlgorithmMismatch, Op: op, Key: label, Err: fmt.Errorf("%s needs an %s key, and this is an %s key",
			alg, map[bool]string{true: "RSA", false: "AES-256"}[alg.rsa()], w.typ)}
	}
	return nil
}

// loadWrapKey finds the key-encryption key labelled label and reads it.
func (cs *callSession) loadWrapKey(op, label string) (*keyEntry, error) {
	hs, err := cs.find([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}, 16)
	if err != nil {
		return nil, err
	}
	var secret, private, public []pkcs11.ObjectHandle
	for _, h := range hs {
		attrs, err := cs.ctx.GetAttributeValue(cs.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil)})
		if err != nil {
			return nil, err
		}
		switch attrUint(attrs[0].Value) {
		case pkcs11.CKO_SECRET_KEY:
			secret = append(secret, h)
		case pkcs11.CKO_PRIVATE_KEY:
			private = append(private, h)
		case pkcs11.CKO_PUBLIC_KEY:
			public = append(public, h)
		}
	}
	switch {
	case len(secret)+len(private) == 0:
		return nil, &Error{Kind: ErrKeyNotFound, Op: op, Key: label}
	case len(secret)+len(private) > 1 || len(public) > 1:
		return nil, &Error{Kind: ErrDuplicateKey, Op: op, Key: label, Err: fmt.Errorf("%d secret, %d private and %d public keys are labelled %s",
			len(secret), len(private), len(public), quote(label))}
	}
	w := new(wrapKey)
	var h pkcs11.ObjectHandle
	if len(secret) == 1 {
		h = secret[0]
		err = cs.readSecretWrapKey(h, w)
	} else {
		h = private[0]
		if len(public) == 1 {
			w.public = public[0]
		}
		err = cs.readRSAKey(label, h, w)
	}
	if err != nil {
		return nil, err
	}
	prot, err := cs.readProtection(h)
	if err != nil {
		return nil, err
	}
	return &keyEntry{gen: cs.gen, handle: h, protection: prot, exportable: prot.Exportable(), checkedAt: time.Now(), wrap: w}, nil
}

// readSecretWrapKey reads a secret key's type, length and usage.
func (cs *callSession) readSecretWrapKey(h pkcs11.ObjectHandle, w *wrapKey) error {
	md, err := cs.readMetadata(h)
	if err != nil {
		return err
	}
	w.usage = keyUsage{
		encrypt: slices.Contains(md.KeyUsage, "ENCRYPT"), decrypt: slices.Contains(md.KeyUsage, "DECRYPT"),
		wrap: slices.Contains(md.KeyUsage, "WRAP"), unwrap: slices.Contains(md.KeyUsage, "UNWRAP"),
	}
	if md.KeySpec != KeySpecAES256 {
		w.typ = md.KeySpec
		w.unfit = fmt.Errorf("the key is %s; key wrap takes an AES-256 key or an RSA key of %v bits", md.KeySpec, rsaBits)
		return nil
	}
	w.typ, w.bits = WrapKeyAES, 256
	return nil
}

// readRSAKey reads a private key's type and usage, and the public key of
// the pair: from the public key object when there is one (checked against
// the private key's own public attributes, where it has them), else from
// the private key.
func (cs *callSession) readRSAKey(label string, h pkcs11.ObjectHandle, w *wrapKey) error {
	attrs, err := cs.ctx.GetAttributeValue(cs.h, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, nil),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, nil),
	})
	if err != nil {
		return err
	}
	keyType := attrUint(attrs[0].Value)
	w.usage = keyUsage{decrypt: attrBool(attrs[1].Value), unwrap: attrBool(attrs[2].Value)}
	if keyType != pkcs11.CKK_RSA {
		w.typ = fmt.Sprintf("CKK_0x%X", keyType)
		w.unfit = fmt.Errorf("the private key is of key type 0x%X, not RSA", keyType)
		return nil
	}
	w.typ = WrapKeyRSA
	privN, privE, perr := cs.publicParts(h)
	if perr != nil && !isCKR(perr, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) && !isCKR(perr, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
		return perr
	}
	n, e := privN, privE
	if w.public != 0 {
		if n, e, err = cs.publicParts(w.public); err != nil {
			return err
		}
		if perr == nil && (!bytes.Equal(n, privN) || !bytes.Equal(e, privE)) {
			w.unfit = fmt.Errorf("the public key labelled %s is not the private key's: their moduli or exponents differ", quote(label))
			return nil
		}
	}
	if perr != nil && w.public == 0 {
		w.unfit = fmt.Errorf("the token shows no public key labelled %s, and the private key does not reveal its modulus and exponent", quote(label))
		return nil
	}
	w.modulus, w.exponent = n, e
	nn, ee := new(big.Int).SetBytes(n), new(big.Int).SetBytes(e)
	w.bits = nn.BitLen()
	if !slices.Contains(rsaBits, w.bits) {
		w.unfit = fmt.Errorf("the RSA key has %d bits; key wrap takes %v", w.bits, rsaBits)
		return nil
	}
	if !ee.IsInt64() || ee.Int64() < 3 || ee.Int64() > 1<<31-1 || ee.Bit(0) == 0 {
		w.unfit = fmt.Errorf("the RSA public exponent %x is not one crypto/rsa takes", e)
		return nil
	}
	w.pub = &rsa.PublicKey{N: nn, E: int(ee.Int64())}
	return nil
}

// publicParts reads CKA_MODULUS and CKA_PUBLIC_EXPONENT of h, without
// leading zero bytes: tokens may pad the exponent (00 01 00 01).
func (cs *callSession) publicParts(h pkcs11.ObjectHandle) (n, e []byte, err error) {
	attrs, err := cs.ctx.GetAttributeValue(cs.h, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil),
	})
	if err != nil {
		return nil, nil, err
	}
	n, e = bytes.TrimLeft(attrs[0].Value, "\x00"), bytes.TrimLeft(attrs[1].Value, "\x00")
	if len(n) == 0 || len(e) == 0 {
		return nil, nil, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
	}
	return n, e, nil
}

// WrapKeyMetadata searches the token afresh for the key-encryption key
// labelled label and describes it. A key of the wrong kind or size, or
// that may not do one algorithm of its kind both ways on this token, is
// ErrKeyUsage (ErrUnsupportedAlgorithm when the token does none of them); a
// key whose value can leave the HSM is ErrKeyExportable (unless the
// backend allows such keys). A label found missing less than a second ago
// is not searched for again, which bounds the searches a caller can cause
// with labels that do not exist; CheckWrapKey searches regardless.
func (b *Backend) WrapKeyMetadata(ctx context.Context, label string) (WrapKeyMetadata, error) {
	return b.wrapKeyMetadata(ctx, label, false)
}

// CheckWrapKey is WrapKeyMetadata that searches even for a label found
// missing a moment ago: for checks that must see a key made just before (a
// reload after `caddy xks ekm-keygen`).
func (b *Backend) CheckWrapKey(ctx context.Context, label string) (WrapKeyMetadata, error) {
	return b.wrapKeyMetadata(ctx, label, true)
}

func (b *Backend) wrapKeyMetadata(ctx context.Context, label string, fresh bool) (WrapKeyMetadata, error) {
	const op = "wrap key metadata"
	var md WrapKeyMetadata
	err := b.run(ctx, op, label, b.callTimeout, func(cs *callSession) error {
		e, err := cs.freshKey(&cs.t.wrapKeys, op, label, fresh)
		if err != nil {
			return err
		}
		if err := cs.b.keyWrap.serves(e.wrap); err != nil {
			return withOp(err, op, label)
		}
		md = e.wrap.metadata()
		return nil
	})
	if err != nil {
		return WrapKeyMetadata{}, err
	}
	return md, nil
}

// ListWrapKeys returns the label of every key on the token that may be a
// key-encryption key, sorted: every secret key and every private key (the
// public key of a pair is not listed apart). Keys sharing a label are all
// listed, and so are keys of kinds key wrap refuses.
func (b *Backend) ListWrapKeys(ctx context.Context) ([]string, error) {
	var labels []string
	err := b.run(ctx, "list keys", "", b.adminTimeout, func(cs *callSession) error {
		labels = labels[:0]
		for _, class := range []uint{pkcs11.CKO_SECRET_KEY, pkcs11.CKO_PRIVATE_KEY} {
			hs, err := cs.find([]*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			}, 0)
			if err != nil {
				return err
			}
			for _, h := range hs {
				attrs, err := cs.ctx.GetAttributeValue(cs.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
				if err != nil {
					return err
				}
				labels = append(labels, string(attrs[0].Value))
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	slices.Sort(labels)
	return labels, nil
}

// WrapKey wraps plaintext, a data-encryption key, under the key-encryption
// key labelled label with alg. The lengths an algorithm does not take are
// refused before the token sees the plaintext (ErrInvalidInput): RFC 3394
// takes whole 8-byte blocks, two at least (SoftHSM2 pads other lengths with
// zeros, silently); RFC 5649 one byte at least, and only whole blocks on a
// token whose mechanism got other lengths wrong in the known-answer test;
// RSA-OAEP up to the modulus's length less twice the hash's, less 2.
func (b *Backend) WrapKey(ctx context.Context, label string, alg WrapAlgorithm, plaintext []byte) ([]byte, error) {
	if err := checkPlaintext(alg, len(plaintext)); err != nil {
		return nil, &Error{Kind: ErrInvalidInput, Op: "wrap key", Key: label, Err: err}
	}
	return b.keyWrapCall(ctx, "wrap key", label, alg, plaintext, (*callSession).rsaWrap, (*callSession).kekWrap)
}

// UnwrapKey unwraps wrapped with the key-encryption key labelled label and
// alg, and returns the data-encryption key. A wrapped key that does not
// authenticate (AES key wrap's integrity check, OAEP's padding) is
// ErrInvalidCiphertext, as is one of a length the algorithm never gives,
// which the token does not see.
func (b *Backend) UnwrapKey(ctx context.Context, label string, alg WrapAlgorithm, wrapped []byte) ([]byte, error) {
	if err := checkWrapped(alg, len(wrapped)); err != nil {
		return nil, &Error{Kind: ErrInvalidCiphertext, Op: "unwrap key", Key: label, Err: err}
	}
	return b.keyWrapCall(ctx, "unwrap key", label, alg, wrapped, (*callSession).rsaUnwrap, (*callSession).kekUnwrap)
}

// keyWrapStep is one direction of key wrap with one kind of key.
type keyWrapStep func(cs *callSession, op, label string, k *keyEntry, alg WrapAlgorithm, in []byte) ([]byte, error)

// keyWrapCall runs a key wrap operation on a pooled session: it finds the
// key, checks that alg fits it, and runs the RSA or the AES step.
func (b *Backend) keyWrapCall(ctx context.Context, op, label string, alg WrapAlgorithm, in []byte, rsaStep, aesStep keyWrapStep) ([]byte, error) {
	var out []byte
	err := b.run(ctx, op, label, b.callTimeout, func(cs *callSession) error {
		k, err := cs.cachedKey(&cs.t.wrapKeys, op, label)
		if err != nil {
			return err
		}
		if err := k.wrap.fits(op, label, alg); err != nil {
			return err
		}
		step := aesStep
		if alg.rsa() {
			step = rsaStep
		}
		out, err = step(cs, op, label, k, alg, in)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// checkPlaintext applies the length rules of alg that hold whatever the
// key: RFC 3394 takes whole 8-byte blocks, at least two; everything else
// at least one byte. RSA-OAEP's upper bound depends on the key (rsaWrap).
func checkPlaintext(alg WrapAlgorithm, n int) error {
	switch {
	case alg == AESKeyWrap && (n < 16 || n%8 != 0):
		return fmt.Errorf("%s takes whole 8-byte blocks, at least 16 bytes; got %d bytes", alg, n)
	case n < 1:
		return fmt.Errorf("%s takes at least one byte", alg)
	}
	return nil
}

// checkWrapped applies the length rules of a wrapped key that hold
// whatever the key: RFC 3394 gives whole blocks, at least three; RFC 5649
// whole blocks, at least two. An RSA ciphertext's length is the modulus's
// (rsaUnwrap).
func checkWrapped(alg WrapAlgorithm, n int) error {
	switch {
	case alg == AESKeyWrap && (n < 24 || n%8 != 0):
		return fmt.Errorf("an %s ciphertext is whole 8-byte blocks, at least 24 bytes; got %d bytes", alg, n)
	case alg == AESKeyWrapPad && (n < 16 || n%8 != 0):
		return fmt.Errorf("an %s ciphertext is whole 8-byte blocks, at least 16 bytes; got %d bytes", alg, n)
	case n < 1:
		return errors.New("the wrapped key is empty")
	}
	return nil
}

// wrappedLen is the length of an AES key wrap of n bytes.
func wrappedLen(alg WrapAlgorithm, n int) int {
	if alg == AESKeyWrap {
		return n + 8
	}
	return (n+7)/8*8 + 8
}

// kekWrap wraps pt under an AES key-encryption key on the path the known-
// answer test proved and the key permits.
func (cs *callSession) kekWrap(op, label string, k *keyEntry, alg WrapAlgorithm, pt []byte) ([]byte, error) {
	m, path, anyLength, err := cs.b.keyWrap.path(alg, k.wrap.usage, "wrap")
	if err != nil {
		return nil, withOp(err, op, label)
	}
	if alg == AESKeyWrapPad && !anyLength && len(pt)%8 != 0 {
		return nil, &Error{Kind: ErrInvalidInput, Op: op, Key: label, Err: fmt.Errorf(
			"this token wraps %s right only for whole 8-byte blocks (mechanism %s pads the rest with zeros), and the key is %d bytes",
			alg, mechanismName(m.mech), len(pt))}
	}
	out, err := cs.aesWrap(m.mech, path, k.handle, pt)
	if err != nil {
		return nil, err
	}
	if want := wrappedLen(alg, len(pt)); len(out) != want {
		return nil, &Error{Kind: ErrInternal, Op: op, Key: label, Err: &outputLenError{got: len(out), want: want}}
	}
	return out, nil
}

// kekUnwrap unwraps with an AES key-encryption key.
func (cs *callSession) kekUnwrap(op, label string, k *keyEntry, alg WrapAlgorithm, wrapped []byte) ([]byte, error) {
	m, path, anyLength, err := cs.b.keyWrap.path(alg, k.wrap.usage, "unwrap")
	if err != nil {
		return nil, withOp(err, op, label)
	}
	pt, err := cs.aesUnwrap(m.mech, path, k.handle, wrapped)
	if err != nil {
		return nil, cs.decryptFailure(err, op, label)
	}
	n := len(pt)
	ok := n == len(wrapped)-8
	if alg == AESKeyWrapPad {
		ok = n >= 1 && n > len(wrapped)-16 && n <= len(wrapped)-8
	}
	if !ok {
		return nil, &Error{Kind: ErrInternal, Op: op, Key: label, Err: fmt.Errorf("the hsm unwrapped %d bytes of %s from %d", n, alg, len(wrapped))}
	}
	if alg == AESKeyWrapPad && !anyLength && n%8 != 0 {
		return nil, &Error{Kind: ErrInvalidInput, Op: op, Key: label, Err: fmt.Errorf(
			"this token unwraps %s right only for whole 8-byte blocks (mechanism %s), and this key is %d bytes", alg, mechanismName(m.mech), n)}
	}
	return pt, nil
}

// WrapKeySpec is a key-encryption key for GenerateWrapKey to make.
type WrapKeySpec struct {
	// Type is "AES" or "RSA".
	Type string
	// Bits is 256 for AES; 2048, 3072 or 4096 for RSA.
	Bits int
}

// GeneratedWrapKey is what GenerateWrapKey made.
type GeneratedWrapKey struct {
	WrapKeyMetadata
	// AllowedMechanisms names the mechanisms the key is restricted to by
	// CKA_ALLOWED_MECHANISMS, none when the token does not take that
	// attribute.
	AllowedMechanisms []string
}

// GenerateWrapKey creates a key-encryption key labelled label in the HSM,
// which never leaves it: an AES-256 secret key, or an RSA key pair (public
// exponent 65537) whose private key is sensitive and unextractable; neither
// modifiable, both labelled label with label as CKA_ID. It may do only what
// key wrap does on this token, by the path the known-answer test proved
// (CKA_ENCRYPT and CKA_DECRYPT, or CKA_WRAP and CKA_UNWRAP; for RSA,
// CKA_DECRYPT or CKA_UNWRAP), and where the token takes it,
// CKA_ALLOWED_MECHANISMS restricts it to the key wrap mechanisms. It
// refuses a label any key already has, and a key the token could not use.
func (b *Backend) GenerateWrapKey(ctx context.Context, label string, spec WrapKeySpec) (GeneratedWrapKey, error) {
	const op = "generate key"
	if label == "" {
		return GeneratedWrapKey{}, &Error{Kind: ErrKeyUsage, Op: op, Err: errors.New("empty label")}
	}
	mechs, err := b.wrapKeyMechanisms(spec)
	if err != nil {
		return GeneratedWrapKey{}, withOp(err, op, label)
	}
	var out GeneratedWrapKey
	err = b.run(ctx, op, label, b.adminTimeout, func(cs *callSession) error {
		if !cs.t.generating.TryLock() {
			return &Error{Kind: ErrBusy, Op: op, Key: label, Err: errors.New("another key generation is running")}
		}
		defer cs.t.generating.Unlock()
		taken, err := cs.find([]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)}, 1)
		if err != nil {
			return err
		}
		if len(taken) > 0 {
			return &Error{Kind: ErrKeyExists, Op: op, Key: label}
		}
		restricted := true
		err = cs.generateWrapKey(label, spec, mechs, true)
		if err != nil && refusesAttribute(err) {
			restricted = false
			err = cs.generateWrapKey(label, spec, mechs, false)
		}
		if err != nil {
			return err
		}
		e, err := cs.loadWrapKey(op, label)
		if err != nil {
			return err
		}
		if e.wrap.unfit != nil {
			return &Error{Kind: ErrInternal, Op: op, Key: label, Err: fmt.Errorf("the new key is not usable: %w", e.wrap.unfit)}
		}
		cs.t.wrapKeys.store(label, e)
		out.WrapKeyMetadata = e.wrap.metadata()
		if restricted {
			out.AllowedMechanisms = mechanismNames(mechs)
		}
		return nil
	})
	if err != nil {
		return GeneratedWrapKey{}, err
	}
	return out, nil
}

// wrapKeyMechanisms are the mechanisms a new key of spec will do on this
// token: those that passed the known-answer test, or for RSA, OAEP if the
// token offers it.
func (b *Backend) wrapKeyMechanisms(spec WrapKeySpec) ([]uint, error) {
	switch {
	case spec.Type == WrapKeyAES && spec.Bits == 256:
		var mechs []uint
		for _, m := range []mechanismResult{b.keyWrap.kw, b.keyWrap.kwp} {
			if m.passed() {
				mechs = append(mechs, m.mech)
			}
		}
		if len(mechs) == 0 {
			return nil, &Error{Kind: ErrUnsupportedAlgorithm, Err: errors.New("the token passes the known-answer test of neither AES key wrap nor AES key wrap with padding: a key made now could wrap nothing")}
		}
		return mechs, nil
	case spec.Type == WrapKeyRSA && slices.Contains(rsaBits, spec.Bits):
		if b.keyWrap.oaep&(pkcs11.CKF_DECRYPT|pkcs11.CKF_UNWRAP) == 0 {
			return nil, &Error{Kind: ErrUnsupportedAlgorithm, Err: errors.New("the token does not offer CKM_RSA_PKCS_OAEP for decryption or unwrapping")}
		}
		return []uint{pkcs11.CKM_RSA_PKCS_OAEP}, nil
	}
	return nil, &Error{Kind: ErrKeyUsage, Err: fmt.Errorf("a key-encryption key is AES 256 or RSA %v, not %s %d", rsaBits, spec.Type, spec.Bits)}
}

// refusesAttribute reports whether the token refused a template with
// CKA_ALLOWED_MECHANISMS for an attribute it does not take: the codes
// PKCS#11 gives for that, and CKR_GENERAL_ERROR, NSS softokn 3.87's answer.
func refusesAttribute(err error) bool {
	switch code, _ := ckrOf(err); code {
	case pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, pkcs11.CKR_TEMPLATE_INCONSISTENT,
		pkcs11.CKR_GENERAL_ERROR:
		return true
	}
	return false
}

// generateWrapKey makes the key of spec, restricted to mechs by
// CKA_ALLOWED_MECHANISMS when restrict is set.
func (cs *callSession) generateWrapKey(label string, spec WrapKeySpec, mechs []uint, restrict bool) error {
	private := cs.b.privateKeys
	common := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)),
	}
	secret := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, private),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	if restrict {
		secret = append(secret, pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, mechanismList(mechs)))
	}
	if spec.Type == WrapKeyAES {
		var u keyUsage
		for _, m := range []mechanismResult{cs.b.keyWrap.kw, cs.b.keyWrap.kwp} {
			u.encrypt = u.encrypt || m.paths[cryptPath].passed()
			u.wrap = u.wrap || m.paths[objectPath].passed()
		}
		tmpl := slices.Concat(common, secret, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, spec.Bits/8),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, u.encrypt),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, u.encrypt),
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, u.wrap),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, u.wrap),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		})
		_, err := cs.ctx.GenerateKey(cs.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl)
		return err
	}
	decrypt := cs.b.keyWrap.oaep&pkcs11.CKF_DECRYPT != 0
	public := slices.Concat(common, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, spec.Bits),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
	})
	privateKey := slices.Concat(common, secret, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, decrypt),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, !decrypt),
	})
	_, _, err := cs.ctx.GenerateKeyPair(cs.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}, public, privateKey)
	return err
}

// mechanismList is a CK_MECHANISM_TYPE array, as CKA_ALLOWED_MECHANISMS
// holds it: CK_ULONGs in the host's byte order.
func mechanismList(mechs []uint) []byte {
	out := make([]byte, 0, len(mechs)*strconv.IntSize/8)
	for _, m := range mechs {
		if strconv.IntSize == 64 {
			out = binary.NativeEndian.AppendUint64(out, uint64(m))
		} else {
			out = binary.NativeEndian.AppendUint32(out, uint32(m)) //nolint:gosec // a mechanism number fits a 32-bit CK_ULONG
		}
	}
	return out
}
