package hsm

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
	"go.uber.org/zap"
)

// Key status and spec values, as the XKS API names them.
const (
	KeyStatusEnabled = "ENABLED"
	KeySpecAES256    = "AES_256"
)

// KeyMetadata describes a key in the terms of the XKS GetKeyMetadata call.
type KeyMetadata struct {
	// KeySpec is "AES_256" for a 32-byte AES key, otherwise an honest
	// description such as "AES_128", "GENERIC_SECRET_256", "DES3" or
	// "CKK_0x..".
	KeySpec string
	// KeyUsage lists ENCRYPT, DECRYPT, WRAP, UNWRAP, SIGN, VERIFY and DERIVE,
	// those the key permits, in that order.
	KeyUsage []string
	// KeyStatus is "DISABLED" when the key permits neither encryption nor
	// decryption, else "ENABLED".
	KeyStatus string
}

// KeyInfo is one secret key on the token, as ListKeys reports it.
type KeyInfo struct {
	// Label is the key's CKA_LABEL, the external key id.
	Label string
	// ID is the key's CKA_ID in hex.
	ID string
	KeyMetadata
	// Protection is what the key's attributes say about who can obtain its
	// value.
	Protection KeyProtection
}

// notFoundTTL rate-limits searches for a label that is not on the token.
// Keys created by another process become usable after at most this long
// (nShield additionally hides keys created after C_Initialize unless told
// otherwise, see the package documentation).
var notFoundTTL = time.Second

// keyRecheck is how long a cached handle is used before its label is
// searched again. Another process (a key ceremony tool, pkcs11-tool) can
// add a second key with the label, or delete or replace the key, and a
// handle cached forever would hide that until a restart, after which the
// restarted proxy answers differently from the rest of the fleet. One call
// per label and interval pays for the search; the others keep using the
// cached handle meanwhile.
var keyRecheck = 10 * time.Second

// maxNotFound bounds the remembered missing labels, which may come from
// requests.
const maxNotFound = 1024

// keyEntry is a cached key handle with its metadata, valid in one library
// generation.
type keyEntry struct {
	gen    uint64
	handle pkcs11.ObjectHandle
	meta   KeyMetadata
	// protection is the key's protection attributes, and exportable why its
	// value can leave the HSM ("" when it cannot).
	protection KeyProtection
	exportable string
	// unfitToEncrypt and unfitToDecrypt are nil when the key is an AES-256
	// key permitted to do that; else the error the operation reports.
	unfitToEncrypt, unfitToDecrypt *Error
	// wrap describes a key-encryption key (the wrapKeys cache); nil for an
	// AES-GCM key.
	wrap *wrapKey
	// missingUntil is set on an entry recording that the label was not found.
	missingUntil time.Time
	// checkedAt is when the label was last searched; rechecking is set
	// while one call searches it again.
	checkedAt  time.Time
	rechecking atomic.Bool
	// logged records what was logged about the key's protection, so that
	// it is logged once rather than on every call: backends sharing the
	// token may refuse the key and allow it.
	logged struct{ everExposed, refused, allowed atomic.Bool }
}

// keyCache maps labels to handles. Handles are valid in every session of the
// application on the token, so one cache serves the whole pool. A token has
// one cache per kind of key, each with its own search: the AES-GCM keys of
// Encrypt and Decrypt, and the key-encryption keys of WrapKey and UnwrapKey
// (keywrap.go), which may be RSA key pairs.
type keyCache struct {
	m        sync.Map // label -> *keyEntry
	notFound atomic.Int32
	// load finds the one key labelled label and reads what the entry
	// keeps of it.
	load func(cs *callSession, op, label string) (*keyEntry, error)
}

func (c *keyCache) clear() {
	c.m.Clear()
	c.notFound.Store(0)
}

func (c *keyCache) store(label string, e *keyEntry) { c.m.Store(label, e) }

// key returns the cached entry of the AES-GCM key labelled label.
func (cs *callSession) key(op, label string) (*keyEntry, error) {
	return cs.cachedKey(&cs.t.keys, op, label)
}

// cachedKey returns the entry for label in c, searching the token if
// needed, and refuses a key this backend may not use. A cached handle older
// than keyRecheck is searched again first, by one call at a time.
func (cs *callSession) cachedKey(c *keyCache, op, label string) (*keyEntry, error) {
	var prev *keyEntry
	if v, ok := c.m.Load(label); ok {
		e := v.(*keyEntry)
		if e.gen == cs.gen {
			switch {
			case !e.missingUntil.IsZero():
				if time.Now().Before(e.missingUntil) {
					return nil, &Error{Kind: ErrKeyNotFound, Op: op, Key: label}
				}
			case time.Since(e.checkedAt) < keyRecheck || !e.rechecking.CompareAndSwap(false, true):
				return cs.admit(op, label, e)
			default:
				// This call searches again; a failed search leaves the
				// entry for the next interval's call.
				defer e.rechecking.Store(false)
				prev = e
			}
		}
	}
	e, err := cs.lookup(c, op, label, prev)
	if err != nil {
		return nil, err
	}
	return cs.admit(op, label, e)
}

// lookup searches the token for label and caches what it finds in c,
// replacing prev (the cached entry, if any): a handle, or a record that the
// label is missing. A duplicate label is not cached, so every call fails
// until one of the keys is removed, as it would after a restart. What
// changed since prev is logged.
func (cs *callSession) lookup(c *keyCache, op, label string, prev *keyEntry) (*keyEntry, error) {
	e, err := c.load(cs, op, label)
	if err != nil {
		switch {
		case errors.Is(err, ErrDuplicateKey):
			if prev != nil {
				c.m.CompareAndDelete(label, prev)
				cs.t.logger.Error("a second key now has the label of a key in use: every call with it fails until one of them is removed",
					zap.String("token", cs.t.ident.String()), zap.String("key", label))
			}
		case errors.Is(err, ErrKeyNotFound):
			if prev != nil {
				cs.t.logger.Warn("a key in use is no longer on the token", zap.String("token", cs.t.ident.String()), zap.String("key", label))
			}
			if c.notFound.Add(1) <= maxNotFound {
				c.store(label, &keyEntry{gen: cs.gen, missingUntil: time.Now().Add(notFoundTTL)})
			} else if prev != nil {
				c.m.CompareAndDelete(label, prev)
			}
		}
		return nil, err
	}
	if prev != nil && !prev.sameKey(e) {
		cs.t.logger.Warn("the label of a key in use now names another key (deleted and created again?); the new one is used",
			zap.String("token", cs.t.ident.String()), zap.String("key", label))
	}
	if prev != nil && prev.sameKey(e) {
		e.inherit(prev)
	}
	c.store(label, e)
	return e, nil
}

// sameKey reports whether e is the key prev was: the same objects.
func (prev *keyEntry) sameKey(e *keyEntry) bool {
	return prev.handle == e.handle && (prev.wrap == nil) == (e.wrap == nil) &&
		(e.wrap == nil || prev.wrap.public == e.wrap.public)
}

// inherit carries over what prev, an entry of the same key, found out: what
// was logged about the key (unless its protection changed) and what was
// proven of it.
func (e *keyEntry) inherit(prev *keyEntry) {
	if prev.exportable == e.exportable {
		e.logged.everExposed.Store(prev.logged.everExposed.Load())
		e.logged.refused.Store(prev.logged.refused.Load())
		e.logged.allowed.Store(prev.logged.allowed.Load())
	}
	if e.wrap != nil {
		e.wrap.inherit(prev.wrap)
	}
}

// admit returns e unless this backend may not use the key: a key whose
// value can leave the HSM is refused without allow_exportable_keys. Either
// way the first call after a lookup logs why, never the key's value.
func (cs *callSession) admit(op, label string, e *keyEntry) (*keyEntry, error) {
	if e.exportable == "" {
		if e.protection.EverExposed() && e.logged.everExposed.CompareAndSwap(false, true) {
			cs.t.logger.Warn("the key's value may have existed outside the HSM (it was imported, or made sensitive or unextractable after it was created): copies of it may exist",
				zap.String("token", cs.t.ident.String()), zap.String("key", label),
				zap.Bool("always_sensitive", e.protection.AlwaysSensitive), zap.Bool("never_extractable", e.protection.NeverExtractable))
		}
		return e, nil
	}
	if cs.b.allowExportable {
		if e.logged.allowed.CompareAndSwap(false, true) {
			cs.b.logger.Warn("using a key whose value can leave the HSM, because allow_exportable_keys is set: whoever obtains its value can decrypt every ciphertext made with it",
				zap.String("backend", cs.b.name), zap.String("key", label), zap.String("why", e.exportable))
		}
		return e, nil
	}
	if e.logged.refused.CompareAndSwap(false, true) {
		cs.b.logger.Error("refusing a key whose value can leave the HSM; calls with it are answered KeyNotFoundException",
			zap.String("backend", cs.b.name), zap.String("key", label), zap.String("why", e.exportable),
			zap.String("fix", "make a new key with `caddy xks keygen` and rotate to it (docs/operations.md); allow_exportable_keys on the backend is for tests only"))
	}
	refusal := exportableError(label, e.exportable)
	refusal.Op = op
	return nil, refusal
}

// loadSecretKey finds the AES-GCM key labelled label and reads it.
func (cs *callSession) loadSecretKey(op, label string) (*keyEntry, error) {
	h, err := cs.findKey(op, label)
	if err != nil {
		return nil, err
	}
	return cs.loadKey(label, h)
}

// loadKey reads the metadata and protection of handle h, the AES-GCM key
// labelled label.
func (cs *callSession) loadKey(label string, h pkcs11.ObjectHandle) (*keyEntry, error) {
	meta, err := cs.readMetadata(h)
	if err != nil {
		return nil, err
	}
	prot, err := cs.readProtection(h)
	if err != nil {
		return nil, err
	}
	e := &keyEntry{gen: cs.gen, handle: h, meta: meta, protection: prot, exportable: prot.Exportable(), checkedAt: time.Now(),
		unfitToEncrypt: unfitness(label, meta, "ENCRYPT"), unfitToDecrypt: unfitness(label, meta, "DECRYPT")}
	return e, nil
}

// findKey finds the one token secret key labelled label. Two keys with one
// label is an error, never "the first one wins".
func (cs *callSession) findKey(op, label string) (pkcs11.ObjectHandle, error) {
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	handles, err := cs.find(tmpl, 2)
	if err != nil {
		return 0, err
	}
	switch len(handles) {
	case 0:
		return 0, &Error{Kind: ErrKeyNotFound, Op: op, Key: label}
	case 1:
		return handles[0], nil
	}
	return 0, &Error{Kind: ErrDuplicateKey, Op: op, Key: label,
		Err: fmt.Errorf("more than one secret key is labelled %s", quote(label))}
}

// find returns up to max objects matching tmpl (all of them if max <= 0).
// C_FindObjectsFinal is always called: a search left open makes the next
// one fail with CKR_OPERATION_ACTIVE.
func (cs *callSession) find(tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	if err := cs.ctx.FindObjectsInit(cs.h, tmpl); err != nil {
		return nil, err
	}
	var all []pkcs11.ObjectHandle
	for {
		n := 64
		if max > 0 {
			n = max - len(all)
		}
		hs, _, err := cs.ctx.FindObjects(cs.h, n)
		if err != nil {
			_ = cs.ctx.FindObjectsFinal(cs.h)
			return nil, err
		}
		all = append(all, hs...)
		if len(hs) == 0 || (max > 0 && len(all) >= max) {
			break
		}
	}
	if err := cs.ctx.FindObjectsFinal(cs.h); err != nil {
		return nil, err
	}
	return all, nil
}

// usageAttrs are read in one batch; every secret key has them. A batch
// with one undefined or sensitive attribute fails whole under miekg/pkcs11,
// so CKA_VALUE_LEN (undefined for DES3) is read on its own.
var usageAttrs = []struct {
	typ  uint
	name string
}{
	{pkcs11.CKA_ENCRYPT, "ENCRYPT"},
	{pkcs11.CKA_DECRYPT, "DECRYPT"},
	{pkcs11.CKA_WRAP, "WRAP"},
	{pkcs11.CKA_UNWRAP, "UNWRAP"},
	{pkcs11.CKA_SIGN, "SIGN"},
	{pkcs11.CKA_VERIFY, "VERIFY"},
	{pkcs11.CKA_DERIVE, "DERIVE"},
}

func (cs *callSession) readMetadata(h pkcs11.ObjectHandle) (KeyMetadata, error) {
	tmpl := make([]*pkcs11.Attribute, 0, len(usageAttrs)+1)
	tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil))
	for _, a := range usageAttrs {
		tmpl = append(tmpl, pkcs11.NewAttribute(a.typ, nil))
	}
	attrs, err := cs.ctx.GetAttributeValue(cs.h, h, tmpl)
	if err != nil {
		return KeyMetadata{}, err
	}
	var meta KeyMetadata
	keyType := ^uint(0)
	for _, a := range attrs {
		if a.Type == pkcs11.CKA_KEY_TYPE {
			keyType = attrUint(a.Value)
			continue
		}
		if !attrBool(a.Value) {
			continue
		}
		for _, u := range usageAttrs {
			if u.typ == a.Type {
				meta.KeyUsage = append(meta.KeyUsage, u.name)
			}
		}
	}
	valueLen := -1
	lattrs, err := cs.ctx.GetAttributeValue(cs.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil)})
	switch {
	case err == nil && len(lattrs) == 1:
		valueLen = int(attrUint(lattrs[0].Value))
	case err != nil && !isCKR(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) && !isCKR(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE):
		return KeyMetadata{}, err
	}
	meta.KeySpec = keySpec(keyType, valueLen)
	// PKCS#11 has no "disabled" flag: a key the proxy can find is enabled,
	// as the spec requires when the key manager cannot disable keys. Key
	// stores disable keys in the proxy's configuration instead.
	meta.KeyStatus = KeyStatusEnabled
	if meta.KeyUsage == nil {
		meta.KeyUsage = []string{}
	}
	return meta, nil
}

func keySpec(keyType uint, valueLen int) string {
	bits := func(prefix string) string {
		if valueLen < 0 {
			return prefix
		}
		return fmt.Sprintf("%s_%d", prefix, valueLen*8)
	}
	switch keyType {
	case pkcs11.CKK_AES:
		return bits("AES")
	case pkcs11.CKK_GENERIC_SECRET:
		return bits("GENERIC_SECRET")
	case pkcs11.CKK_DES3:
		return "DES3"
	case pkcs11.CKK_DES2:
		return "DES2"
	case pkcs11.CKK_DES:
		return "DES"
	}
	return fmt.Sprintf("CKK_0x%X", keyType)
}

// unfitness is the check Encrypt and Decrypt make before touching the HSM,
// which would happily run AES-GCM with an AES-128 key: the key must be an
// AES-256 key whose usage includes the operation's (ENCRYPT or DECRYPT).
func unfitness(label string, m KeyMetadata, usage string) *Error {
	if m.KeySpec != KeySpecAES256 {
		return &Error{Kind: ErrKeyUsage, Key: label, Err: fmt.Errorf("key spec is %s, not %s", m.KeySpec, KeySpecAES256)}
	}
	if !slices.Contains(m.KeyUsage, usage) {
		return &Error{Kind: ErrKeyUsage, Key: label, Err: fmt.Errorf("key does not permit %s (CKA_%s is false)", strings.ToLower(usage), usage)}
	}
	return nil
}

// check reports whether the key may serve op ("encrypt" or "decrypt").
func (e *keyEntry) check(op string) error {
	unfit := e.unfitToDecrypt
	if op == "encrypt" {
		unfit = e.unfitToEncrypt
	}
	if unfit == nil {
		return nil
	}
	c := *unfit
	c.Op = op
	return &c
}

func attrUint(b []byte) uint {
	switch len(b) {
	case 8:
		return uint(binary.NativeEndian.Uint64(b))
	case 4:
		return uint(binary.NativeEndian.Uint32(b))
	case 1:
		return uint(b[0])
	}
	return ^uint(0)
}

func attrBool(b []byte) bool { return len(b) > 0 && b[0] != 0 }

// Metadata searches the token for the key afresh (it may have been
// replaced, or a second key given its label), reads its attributes (its
// usage may have changed) and returns its XKS metadata. A key this backend
// may not use is an error, as for Encrypt and Decrypt.
//
// A label found missing less than notFoundTTL ago is not searched for again:
// that bounds the searches a caller can cause by asking for labels that do
// not exist. CheckKey searches regardless.
func (b *Backend) Metadata(ctx context.Context, keyLabel string) (KeyMetadata, error) {
	return b.metadata(ctx, keyLabel, false)
}

// CheckKey is Metadata that searches even for a label found missing a
// moment ago: for checks that must see a key made just before (a reload
// after `caddy xks keygen`).
func (b *Backend) CheckKey(ctx context.Context, keyLabel string) (KeyMetadata, error) {
	return b.metadata(ctx, keyLabel, true)
}

func (b *Backend) metadata(ctx context.Context, keyLabel string, fresh bool) (KeyMetadata, error) {
	var meta KeyMetadata
	err := b.run(ctx, "metadata", keyLabel, b.callTimeout, func(cs *callSession) error {
		e, err := cs.freshKey(&cs.t.keys, "metadata", keyLabel, fresh)
		if err != nil {
			return err
		}
		meta = e.meta
		return nil
	})
	if err != nil {
		return KeyMetadata{}, err
	}
	return meta, nil
}

// freshKey searches c's token for label afresh, for calls that report a
// key's metadata, unless the label was found missing less than notFoundTTL
// ago and fresh is false; then it refuses a key this backend may not use.
func (cs *callSession) freshKey(c *keyCache, op, label string, fresh bool) (*keyEntry, error) {
	var prev *keyEntry
	if v, ok := c.m.Load(label); ok {
		switch e := v.(*keyEntry); {
		case e.gen != cs.gen:
		case e.missingUntil.IsZero():
			prev = e
		case !fresh && time.Now().Before(e.missingUntil):
			return nil, &Error{Kind: ErrKeyNotFound, Op: op, Key: label}
		}
	}
	e, err := cs.lookup(c, op, label, prev)
	if err != nil {
		return nil, err
	}
	return cs.admit(op, label, e)
}

// ListKeys returns the label, id, metadata and protection of every secret
// key on the token, sorted by label. Keys sharing a label are all listed,
// and so are keys the backend refuses to use.
func (b *Backend) ListKeys(ctx context.Context) ([]KeyInfo, error) {
	var keys []KeyInfo
	err := b.run(ctx, "list keys", "", b.adminTimeout, func(cs *callSession) error {
		keys = keys[:0]
		hs, err := cs.find([]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		}, 0)
		if err != nil {
			return err
		}
		for _, h := range hs {
			attrs, err := cs.ctx.GetAttributeValue(cs.h, h, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
				pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
			})
			if err != nil {
				return err
			}
			meta, err := cs.readMetadata(h)
			if err != nil {
				return err
			}
			prot, err := cs.readProtection(h)
			if err != nil {
				return err
			}
			ki := KeyInfo{KeyMetadata: meta, Protection: prot}
			for _, a := range attrs {
				switch a.Type {
				case pkcs11.CKA_LABEL:
					ki.Label = string(a.Value)
				case pkcs11.CKA_ID:
					ki.ID = hex.EncodeToString(a.Value)
				}
			}
			keys = append(keys, ki)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].Label < keys[j].Label })
	return keys, nil
}

// Usage is what a generated key may do.
type Usage struct {
	Encrypt, Decrypt bool
}

// GenerateKey creates an AES-256 token key labelled label: sensitive, not
// extractable, not modifiable, permitted to encrypt and decrypt only. The
// label is also its CKA_ID. It refuses a label already in use.
func (b *Backend) GenerateKey(ctx context.Context, label string) (KeyMetadata, error) {
	return b.GenerateKeyWithUsage(ctx, label, Usage{Encrypt: true, Decrypt: true})
}

// GenerateKeyWithUsage is GenerateKey with a narrower usage: a key that may
// only encrypt, only decrypt, or neither. Such keys exist to test how a
// proxy refuses them; production keys come from GenerateKey.
func (b *Backend) GenerateKeyWithUsage(ctx context.Context, label string, usage Usage) (KeyMetadata, error) {
	if label == "" {
		return KeyMetadata{}, &Error{Kind: ErrKeyUsage, Op: "generate key", Err: errors.New("empty label")}
	}
	var meta KeyMetadata
	err := b.run(ctx, "generate key", label, b.adminTimeout, func(cs *callSession) error {
		if !cs.t.generating.TryLock() {
			return &Error{Kind: ErrBusy, Op: "generate key", Key: label, Err: errors.New("another key generation is running")}
		}
		defer cs.t.generating.Unlock()
		_, err := cs.findKey("generate key", label)
		switch {
		case err == nil || errors.Is(err, ErrDuplicateKey):
			return &Error{Kind: ErrKeyExists, Op: "generate key", Key: label}
		case !errors.Is(err, ErrKeyNotFound):
			return err
		}
		h, err := cs.ctx.GenerateKey(cs.h,
			[]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)},
			keyTemplate(label, b.privateKeys, true, usage))
		if err != nil {
			return err
		}
		e, err := cs.loadKey(label, h)
		if err != nil {
			return err
		}
		cs.t.keys.store(label, e)
		meta = e.meta
		return nil
	})
	if err != nil {
		return KeyMetadata{}, err
	}
	return meta, nil
}

// keyTemplate is the template of every key the backend generates: token keys
// for GenerateKey, session keys (token false, no label) for self-tests and
// health checks, which leave nothing behind on the token.
func keyTemplate(label string, private, onToken bool, usage Usage) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, onToken),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, private),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, usage.Encrypt),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, usage.Decrypt),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	if label != "" {
		t = append(t,
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)))
	}
	return t
}
