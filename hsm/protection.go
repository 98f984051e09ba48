package hsm

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/miekg/pkcs11"
)

// KeyProtection is what a key's attributes say about who can obtain its
// value. Every field is the attribute's value as the token reported it; an
// attribute the token would not report is false and named in Unread.
type KeyProtection struct {
	// Sensitive is CKA_SENSITIVE: the value cannot be read in the clear.
	Sensitive bool
	// Extractable is CKA_EXTRACTABLE: the value can be wrapped, and so
	// taken out of the HSM under a key its holder may know.
	Extractable bool
	// AlwaysSensitive is CKA_ALWAYS_SENSITIVE: the key has been sensitive
	// since it was made. It is false for an imported key, whose value
	// existed outside the HSM before.
	AlwaysSensitive bool
	// NeverExtractable is CKA_NEVER_EXTRACTABLE: the key has never been
	// extractable. It is false for an imported key too.
	NeverExtractable bool
	// Private is CKA_PRIVATE: only a logged-in user can see and use the
	// key. What a key that is not private means depends on the token (see
	// Backend.NonPrivateKeyMeaning).
	Private bool
	// Unread names the attributes the token did not report.
	Unread []string
}

// protectionAttrs are the attributes of KeyProtection, in its order.
var protectionAttrs = []struct {
	typ  uint
	name string
}{
	{pkcs11.CKA_SENSITIVE, "CKA_SENSITIVE"},
	{pkcs11.CKA_EXTRACTABLE, "CKA_EXTRACTABLE"},
	{pkcs11.CKA_ALWAYS_SENSITIVE, "CKA_ALWAYS_SENSITIVE"},
	{pkcs11.CKA_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE"},
	{pkcs11.CKA_PRIVATE, "CKA_PRIVATE"},
}

func (p *KeyProtection) field(typ uint) *bool {
	switch typ {
	case pkcs11.CKA_SENSITIVE:
		return &p.Sensitive
	case pkcs11.CKA_EXTRACTABLE:
		return &p.Extractable
	case pkcs11.CKA_ALWAYS_SENSITIVE:
		return &p.AlwaysSensitive
	case pkcs11.CKA_NEVER_EXTRACTABLE:
		return &p.NeverExtractable
	case pkcs11.CKA_PRIVATE:
		return &p.Private
	}
	return nil
}

// Exportable says why the key's value can leave the HSM, or "" if it
// cannot: it is not kept secret (CKA_SENSITIVE false), it can be wrapped
// (CKA_EXTRACTABLE true), or the token would not say. An attribute the token does not report
// counts against the key, since nothing then shows it is protected.
func (p KeyProtection) Exportable() string {
	var why []string
	switch {
	case slices.Contains(p.Unread, "CKA_SENSITIVE"):
		why = append(why, "the token does not report CKA_SENSITIVE")
	case !p.Sensitive:
		// PKCS#11 reveals CKA_VALUE only of a key that is also extractable,
		// but not every token keeps to that, and nothing else is secret.
		why = append(why, "CKA_SENSITIVE is false, so the token does not treat its value as secret")
	}
	switch {
	case slices.Contains(p.Unread, "CKA_EXTRACTABLE"):
		why = append(why, "the token does not report CKA_EXTRACTABLE")
	case p.Extractable:
		why = append(why, "CKA_EXTRACTABLE is true, so its value can be wrapped out of the HSM")
	}
	return strings.Join(why, "; ")
}

// EverExposed says whether the key's value may have existed outside the HSM
// before: it was imported, or made sensitive or unextractable only after it
// was created. Such a key is served (imports are how one key gets into two
// HSMs), but copies of its value may exist.
func (p KeyProtection) EverExposed() bool {
	return !p.AlwaysSensitive || !p.NeverExtractable
}

// readProtection reads the protection attributes of h in one call, or one by
// one if the token refuses the batch (a batch with one undefined attribute
// fails whole under miekg/pkcs11).
func (cs *callSession) readProtection(h pkcs11.ObjectHandle) (KeyProtection, error) {
	var p KeyProtection
	tmpl := make([]*pkcs11.Attribute, 0, len(protectionAttrs))
	for _, a := range protectionAttrs {
		tmpl = append(tmpl, pkcs11.NewAttribute(a.typ, nil))
	}
	attrs, err := cs.ctx.GetAttributeValue(cs.h, h, tmpl)
	if err == nil {
		for _, a := range attrs {
			if f := p.field(a.Type); f != nil {
				*f = attrBool(a.Value)
			}
		}
		return p, nil
	}
	if !isCKR(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) && !isCKR(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
		return KeyProtection{}, err
	}
	for _, a := range protectionAttrs {
		one, err := cs.ctx.GetAttributeValue(cs.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(a.typ, nil)})
		switch {
		case err == nil && len(one) == 1:
			*p.field(a.typ) = attrBool(one[0].Value)
		case err == nil || isCKR(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) || isCKR(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE):
			p.Unread = append(p.Unread, a.name)
		default:
			return KeyProtection{}, err
		}
	}
	return p, nil
}

// exportableError is the refusal of a key whose value can leave the HSM, on
// a backend without allow_exportable_keys.
func exportableError(label, why string) *Error {
	return &Error{Kind: ErrKeyExportable, Key: label,
		Err: fmt.Errorf("%s; make a new key with `caddy xks keygen` (or set allow_exportable_keys on the backend, for tests only)", why)}
}

// softHSMManufacturer is SoftHSM2's CK_TOKEN_INFO manufacturerID.
const softHSMManufacturer = "SoftHSM project"

// PrivateKeys reports whether keys the backend generates are CKA_PRIVATE
// (private_keys).
func (b *Backend) PrivateKeys() bool { return b.privateKeys }

// CanHoldPrivateKeys reports whether the backend's token takes a key with
// CKA_PRIVATE true, by generating a session key with it, which leaves
// nothing on the token. Only a token that refuses one, such as nShield's
// accelerator slot, needs keys that are not private; on any other such a
// key is visible and usable without a login, and SoftHSM2 writes it to its
// token directory unencrypted.
func (b *Backend) CanHoldPrivateKeys(ctx context.Context) (bool, error) {
	can := false
	err := b.run(ctx, "private key probe", "", b.adminTimeout, func(cs *callSession) error {
		key, err := cs.sessionKey(true)
		if cs.refusesPrivateKeys(err) {
			return nil
		}
		if err != nil {
			return err
		}
		can = true
		_ = cs.ctx.DestroyObject(cs.h, key)
		return nil
	})
	return can, err
}

// refusesPrivateKeys reports whether err, the token's answer to a session
// key with CKA_PRIVATE true, is a refusal of private objects, as nShield's
// accelerator slot refuses them: the token then makes the same key without
// CKA_PRIVATE, and refuses the private one again with the same code.
// Entrust documents the refusal but not the CKR it answers with, so those
// keys are the sign, not a code; the repeat keeps a passing fault from
// passing for a token that cannot hold private keys, which would let
// keygen make keys that need no login where a login protects them.
func (cs *callSession) refusesPrivateKeys(err error) bool {
	code, isCKR := ckrOf(err)
	if !isCKR || classify(code) == classModule {
		return false
	}
	public, perr := cs.sessionKey(false)
	if perr != nil {
		return false
	}
	_ = cs.ctx.DestroyObject(cs.h, public)
	again, err := cs.sessionKey(true)
	if err == nil {
		_ = cs.ctx.DestroyObject(cs.h, again)
		return false
	}
	againCode, _ := ckrOf(err)
	return againCode == code
}

// NonPrivateKeyMeaning says what a key with CKA_PRIVATE false means on this
// backend's token, in a sentence for the operator.
func (b *Backend) NonPrivateKeyMeaning() string {
	return nonPrivateKeyMeaning(b.describe().Manufacturer)
}

func nonPrivateKeyMeaning(manufacturer string) string {
	m := strings.ToLower(manufacturer)
	switch {
	case manufacturer == softHSMManufacturer:
		return "SoftHSM2 encrypts only private objects with the token's PIN-derived key: a key that is not CKA_PRIVATE " +
			"is written unencrypted to the token directory, so anyone who can read that directory has its value. " +
			"Set private_keys true for SoftHSM2"
	case strings.Contains(m, "ncipher"), strings.Contains(m, "entrust"):
		return "on nShield a key that is not CKA_PRIVATE is module-protected: its blob stays encrypted under the " +
			"Security World's module key, and any process on an enrolled host that can use the Security World " +
			"(the nfast group) can use it without a passphrase. That is what the accelerator slot requires; " +
			"on a softcard or card set token use private_keys true"
	}
	return "the token shows a key that is not CKA_PRIVATE to any application that opens it, without a login, " +
		"and lets it use the key; whether it also stores the key less protected depends on the HSM (see its documentation). " +
		"Use private_keys true unless the token cannot hold private objects"
}

// AllowsExportableKeys reports whether the backend uses keys whose value can
// leave the HSM (allow_exportable_keys).
func (b *Backend) AllowsExportableKeys() bool { return b.allowExportable }
