package xkshandler

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"slices"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// Key versions put several HSM keys behind one external key id. KMS cannot
// rotate the material of a key in an external key store, and AES-GCM with
// random IVs allows 2^32 encryptions per key (NIST SP 800-38D §8.3); a new
// version lets the operator move Encrypt to new material under the same KMS
// key, while every ciphertext keeps decrypting with the version that made
// it:
//
//   - Version 1 is the HSM key labelled as the external key id itself: every
//     key is version 1 until versions are configured, so ciphertexts written
//     before versioning are version 1 ciphertexts.
//   - Encrypt with version 1 returns the key store's static
//     ciphertext_metadata (or none), exactly as before versioning; Encrypt
//     with version 2 or later returns version metadata (below) instead.
//   - Decrypt reads the version from the ciphertextMetadata KMS sends back:
//     version metadata names it; anything else (none, or a static
//     ciphertext_metadata of any past setting) is version 1.
//
// Version metadata, format 1, is 8 bytes: 0x00 'x' 'k' (a prefix no
// printable static ciphertext_metadata starts with), the format number 1,
// and the version as a big-endian uint32. Like any ciphertextMetadata it is
// bound into the AAD the HSM authenticates, so a changed version fails the
// tag check. A later format takes another number after the prefix; a
// format this proxy does not know is refused, never guessed at.

// versionPrefix starts version metadata of every format.
var versionPrefix = []byte{0x00, 'x', 'k'}

const (
	versionFormat1    = 1
	versionFormat1Len = len("\x00xk") + 1 + 4
)

// versionMetadata is the ciphertextMetadata of an Encrypt with version v (2
// or later), format 1.
func versionMetadata(v uint32) []byte {
	md := make([]byte, 0, versionFormat1Len)
	md = append(md, versionPrefix...)
	md = append(md, versionFormat1)
	return binary.BigEndian.AppendUint32(md, v)
}

// metadataVersion reads the key version from a Decrypt's ciphertextMetadata:
// 1 for anything that is not version metadata, the version for format 1,
// and an error for version metadata of an unknown format or length.
func metadataVersion(md []byte) (uint32, error) {
	if !bytes.HasPrefix(md, versionPrefix) {
		return 1, nil
	}
	if len(md) < len(versionPrefix)+1 || md[len(versionPrefix)] != versionFormat1 {
		return 0, fmt.Errorf("the ciphertextMetadata is key version metadata of a format this proxy does not know")
	}
	if len(md) != versionFormat1Len {
		return 0, fmt.Errorf("the ciphertextMetadata is key version metadata of format 1 with %d bytes, not %d", len(md), versionFormat1Len)
	}
	v := binary.BigEndian.Uint32(md[len(versionPrefix)+1:])
	if v < 2 {
		return 0, fmt.Errorf("the ciphertextMetadata names key version %d, which version metadata never does", v)
	}
	return v, nil
}

// KeyVersions lists the versions of one external key id beyond version 1.
type KeyVersions struct {
	// Key is the external key id: one of the key store's keys, or any key
	// when keys is "*". Required.
	Key string `json:"key"`

	// Versions are the key's versions. Version 1 is the HSM key labelled
	// as the external key id and need not be listed; list it only to
	// disable it. Versions 2 and up name their HSM key labels (made with
	// `caddy xks keygen --label ...`). Required.
	Versions []KeyVersion `json:"versions"`

	// Current is the version Encrypt uses. Required: a version is added
	// with current unchanged, every instance of the fleet reloaded, and
	// only then promoted, so that no instance is asked to decrypt a
	// version it does not know yet. Past its encryption limit (in the
	// caller IV mode), the next higher version that is not disabled
	// becomes current by itself.
	Current uint32 `json:"current"`
}

// KeyVersion is one version of an external key.
type KeyVersion struct {
	// Version is the version's number, 1 to 4294967295.
	Version uint32 `json:"version"`

	// Label is the HSM key label of the version: required for version 2
	// and up (1 to 128 characters of a-z, A-Z, 0-9, ., - and _); for
	// version 1 it is the external key id and may be left out.
	Label string `json:"label,omitempty"`

	// Disabled refuses Decrypt of the version's ciphertexts
	// (InvalidStateException) and Encrypt with it. A version that is not
	// current but not disabled (retired) still decrypts. Each load logs
	// what the fleet has counted for every disabled version, so that a
	// version still in use is noticed. Default: false.
	Disabled bool `json:"disabled,omitempty"`
}

// validate checks one key's versions; keys is the key store's key list.
func (kv *KeyVersions) validate(keys []string) error {
	if !validKeyID(kv.Key) {
		return fmt.Errorf("key versions: %q is not a valid external key id", kv.Key)
	}
	if all := len(keys) == 1 && keys[0] == "*"; !all && !slices.Contains(keys, kv.Key) {
		return fmt.Errorf("key versions of %s: the key is not among the key store's keys", kv.Key)
	}
	if len(kv.Versions) == 0 {
		return fmt.Errorf("key versions of %s: no version is listed", kv.Key)
	}
	seen := map[uint32]bool{}
	labels := map[string]bool{}
	enabled := !slices.ContainsFunc(kv.Versions, func(v KeyVersion) bool { return v.Version == 1 && v.Disabled })
	for _, v := range kv.Versions {
		switch {
		case v.Version == 0:
			return fmt.Errorf("key versions of %s: versions are numbered from 1", kv.Key)
		case seen[v.Version]:
			return fmt.Errorf("key versions of %s: version %d is listed twice", kv.Key, v.Version)
		case v.Version == 1 && v.Label != "" && v.Label != kv.Key:
			return fmt.Errorf("key versions of %s: version 1 is the HSM key labelled %s, not %s", kv.Key, kv.Key, v.Label)
		case v.Version > 1 && !validKeyID(v.Label):
			return fmt.Errorf("key versions of %s: version %d needs the label of its HSM key (1 to 128 characters of a-z, A-Z, 0-9, ., - and _)", kv.Key, v.Version)
		case v.Version > 1 && (labels[v.Label] || v.Label == kv.Key):
			return fmt.Errorf("key versions of %s: label %s names two versions", kv.Key, v.Label)
		}
		seen[v.Version] = true
		labels[v.Label] = true
		enabled = enabled || !v.Disabled
	}
	if kv.Current == 0 {
		return fmt.Errorf("key versions of %s: say which version is current (current <n>): add a version with current unchanged, reload every instance, then promote it", kv.Key)
	}
	{
		i := slices.IndexFunc(kv.Versions, func(v KeyVersion) bool { return v.Version == kv.Current })
		switch {
		case kv.Current != 1 && i < 0:
			return fmt.Errorf("key versions of %s: current version %d is not listed", kv.Key, kv.Current)
		case i >= 0 && kv.Versions[i].Disabled:
			return fmt.Errorf("key versions of %s: current version %d is disabled", kv.Key, kv.Current)
		}
	}
	if !enabled {
		return fmt.Errorf("key versions of %s: every version is disabled; disable the key instead (disable %s)", kv.Key, kv.Key)
	}
	return nil
}

// keyVersion is one version of a key at run time, with its usage counter.
type keyVersion struct {
	n        uint32
	label    string
	disabled bool
	usage    *usageCounter
	// warned is how many of the key store's warning thresholds have been
	// logged for this version.
	warned atomic.Int32
}

// versionedKey is an external key id's versions at run time.
type versionedKey struct {
	key        string
	configured bool          // the key store configures its versions
	versions   []*keyVersion // by number
	// current is what Encrypt uses; it moves up by itself when a
	// version reaches its limit in the caller IV mode.
	current atomic.Pointer[keyVersion]
	mu      sync.Mutex // serializes moves of current
}

// newVersionedKey builds the run-time versions of kv (nil: version 1 only).
func newVersionedKey(key string, kv *KeyVersions) *versionedKey {
	vk := &versionedKey{key: key, configured: kv != nil}
	v1 := &keyVersion{n: 1, label: key}
	vk.versions = append(vk.versions, v1)
	if kv != nil {
		for _, v := range kv.Versions {
			if v.Version == 1 {
				v1.disabled = v.Disabled
				continue
			}
			vk.versions = append(vk.versions, &keyVersion{n: v.Version, label: v.Label, disabled: v.Disabled})
		}
	}
	slices.SortFunc(vk.versions, func(a, b *keyVersion) int { return cmp.Compare(a.n, b.n) })
	cur := v1
	if kv != nil {
		// Validated: the current version is configured and enabled.
		if c := vk.version(kv.Current); c != nil {
			cur = c
		}
	}
	vk.current.Store(cur)
	return vk
}

// version returns version n, or nil.
func (vk *versionedKey) version(n uint32) *keyVersion {
	for _, v := range vk.versions {
		if v.n == n {
			return v
		}
	}
	return nil
}

// next returns the lowest version above v that is not disabled, or nil.
func (vk *versionedKey) next(v *keyVersion) *keyVersion {
	for _, w := range vk.versions {
		if w.n > v.n && !w.disabled {
			return w
		}
	}
	return nil
}

// promote moves current from v to the next version that is under limit,
// if current is still v, and returns what current is then (v itself when
// there is none).
func (vk *versionedKey) promote(v *keyVersion, limit uint64, logger *zap.Logger, keyStore string) *keyVersion {
	vk.mu.Lock()
	defer vk.mu.Unlock()
	if cur := vk.current.Load(); cur != v {
		return cur
	}
	for w := vk.next(v); w != nil; w = vk.next(w) {
		if w.usage.total() < limit {
			vk.current.Store(w)
			logger.Warn("key version reached its encryption limit; the next version is now current",
				zap.String("key_store", keyStore), zap.String("key", vk.key),
				zap.Uint32("version", v.n), zap.String("label", v.label),
				zap.Uint64("encryptions", v.usage.total()), zap.Uint64("limit", limit),
				zap.Uint32("current", w.n), zap.String("current_label", w.label))
			return w
		}
	}
	return v
}

// labels returns the HSM labels of the versions that are not disabled.
func (vk *versionedKey) labels() []string {
	var out []string
	for _, v := range vk.versions {
		if !v.disabled {
			out = append(out, v.label)
		}
	}
	return out
}

// metadataFor is the ciphertextMetadata of an Encrypt with v.
func (ks *KeyStore) metadataFor(v *keyVersion) []byte {
	if v.n == 1 {
		return ks.ciphertextMetadata
	}
	return versionMetadata(v.n)
}

// provisionVersions builds the key store's versioned keys, with their usage
// counters: every configured key's (for "*", only those with versions; the
// others are met at run time), and logs what is known of each disabled
// version and each version past a warning threshold.
func (ks *KeyStore) provisionVersions(ctx context.Context) {
	ks.limit = ks.EncryptLimit
	if ks.limit == 0 {
		ks.limit = DefaultEncryptLimit
	}
	warnings := ks.UsageWarnings
	if len(warnings) == 0 {
		warnings = []float64{0.5, 0.9}
	}
	warnings = slices.Sorted(slices.Values(warnings))
	ks.warnAt = make([]uint64, len(warnings))
	for i, w := range warnings {
		ks.warnAt[i] = max(1, uint64(math.Ceil(w*float64(ks.limit))))
	}
	// Caddy validates after provisioning: what validate would refuse is
	// left out here, so that no id or label that is not a valid key id
	// (such as "../x") ever names a record in storage.
	byKey := make(map[string]*KeyVersions, len(ks.Versions))
	for i := range ks.Versions {
		if ks.Versions[i].validate(ks.Keys) == nil {
			byKey[ks.Versions[i].Key] = &ks.Versions[i]
		}
	}
	ks.versioned = make(map[string]*versionedKey)
	ks.lazy = make(map[string]*versionedKey)
	keys := ks.Keys
	if ks.keys == nil {
		keys = slices.Collect(maps.Keys(byKey))
	}
	for _, k := range keys {
		if !validKeyID(k) || ks.versioned[k] != nil {
			continue
		}
		vk := ks.newKey(ctx, k, byKey[k])
		ks.versioned[k] = vk
		for _, v := range vk.versions {
			if v.disabled {
				n, last := v.usage.decrypts()
				ks.logger.Warn("key version disabled: Decrypt of its ciphertexts is refused",
					zap.String("key_store", ks.URIPath), zap.String("key", k), zap.Uint32("version", v.n), zap.String("label", v.label),
					zap.Uint64("fleet_encryptions", v.usage.total()), zap.Uint64("fleet_decryptions", n), zap.Time("last_decryption", last))
			}
			ks.warnUsage(vk, v, v.usage.total())
		}
		if cur := vk.current.Load(); ks.callerIVs && cur.usage.total() >= ks.limit {
			vk.promote(cur, ks.limit, ks.logger, ks.URIPath)
		}
	}
}

// newKey builds one key's versions and acquires their counters.
func (ks *KeyStore) newKey(ctx context.Context, key string, kv *KeyVersions) *versionedKey {
	vk := newVersionedKey(key, kv)
	for _, v := range vk.versions {
		v.usage = acquireCounter(ctx, ks.usage, v.label, ks.logger)
	}
	return vk
}

// keyVersions returns the versions of an external key id the key store
// allows. A key of a "*" key store met for the first time is looked up
// first, so that only keys on the token get a counter (and a record in
// storage), whatever ids a caller sends.
func (ks *KeyStore) keyVersions(ctx context.Context, key string) (*versionedKey, error) {
	if vk := ks.versioned[key]; vk != nil {
		return vk, nil
	}
	ks.lazyMu.Lock()
	vk := ks.lazy[key]
	ks.lazyMu.Unlock()
	if vk != nil {
		return vk, nil
	}
	if err := ks.check.WithBackend(key, func(b *hsm.Backend) error {
		_, err := b.Metadata(ctx, key)
		return err
	}); err != nil {
		return nil, err
	}
	ks.lazyMu.Lock()
	defer ks.lazyMu.Unlock()
	if vk := ks.lazy[key]; vk != nil {
		return vk, nil
	}
	vk = ks.newKey(ctx, key, nil)
	if ks.released {
		// A request of a config already cleaned up: count, keep nothing.
		for _, v := range vk.versions {
			releaseCounter(v.usage)
		}
		return vk, nil
	}
	ks.lazy[key] = vk
	return vk, nil
}

// cleanup gives back the key store's usage counters.
// A request of the old config still running after a reload may count on
// them: the new config holds the same counters, so nothing is lost.
func (ks *KeyStore) cleanup() {
	ks.lazyMu.Lock()
	defer ks.lazyMu.Unlock()
	if ks.released {
		return
	}
	ks.released = true
	for _, m := range []map[string]*versionedKey{ks.versioned, ks.lazy} {
		for _, vk := range m {
			for _, v := range vk.versions {
				releaseCounter(v.usage)
			}
		}
	}
}

// warnUsage logs each warning threshold that total has passed for v and
// that was not logged yet.
func (ks *KeyStore) warnUsage(vk *versionedKey, v *keyVersion, total uint64) {
	for {
		i := v.warned.Load()
		if int(i) >= len(ks.warnAt) || total < ks.warnAt[i] {
			return
		}
		if v.warned.CompareAndSwap(i, i+1) && (int(i)+1 == len(ks.warnAt) || total < ks.warnAt[i+1]) {
			ks.logger.Warn("key version has used a large part of its encryption limit",
				zap.String("key_store", ks.URIPath), zap.String("key", vk.key), zap.Uint32("version", v.n), zap.String("label", v.label),
				zap.Uint64("fleet_encryptions", total), zap.Uint64("limit", ks.limit),
				zap.String("used", fmt.Sprintf("%.1f%%", 100*float64(total)/float64(ks.limit))),
				zap.Bool("refused_at_limit", ks.callerIVs),
				zap.String("action", "make a new version (caddy xks keygen) and add it to the key's versions; see docs/operations.md"))
		}
	}
}

// forEncrypt counts one Encrypt with the key's current version and returns
// it, or refuses: a version at its limit, in the caller IV mode, when no
// higher version can take over.
//
// In this process the limit is exact: a count is taken only below it. The
// other instances' counts arrive with their writes, so a fleet can go past
// the limit by what the others counted in one usage_flush_interval.
func (ks *KeyStore) forEncrypt(vk *versionedKey) (*keyVersion, error) {
	v := vk.current.Load()
	if !ks.callerIVs {
		ks.warnUsage(vk, v, addSat(v.usage.own.Add(1), v.usage.others.Load()))
		return v, nil
	}
	for {
		c := v.usage
		own := c.own.Load()
		if total := addSat(own, c.others.Load()); total < ks.limit {
			if c.own.CompareAndSwap(own, own+1) {
				ks.warnUsage(vk, v, total+1)
				return v, nil
			}
			continue
		}
		next := vk.promote(v, ks.limit, ks.logger, ks.URIPath)
		if next == v {
			return nil, &xksError{name: xksapi.InvalidStateException,
				message: "the external key's current version has reached its encryption limit; the key store needs a new key version",
				cause: fmt.Errorf("version %d of %s (label %s): %d encryptions counted, limit %d (encrypt_limit; NIST SP 800-38D §8.3)",
					v.n, vk.key, v.label, c.total(), ks.limit)}
		}
		v = next
	}
}

// forDecrypt returns the version a Decrypt's ciphertextMetadata names, and
// counts the Decrypt, or refuses a version that is not configured or is
// disabled.
func (ks *KeyStore) forDecrypt(vk *versionedKey, md []byte) (*keyVersion, error) {
	n, err := metadataVersion(md)
	if err != nil {
		return nil, &xksError{name: xksapi.InvalidCiphertextException, message: "the ciphertextMetadata is not one this proxy writes", cause: err}
	}
	v := vk.version(n)
	switch {
	case v == nil:
		return nil, &xksError{name: xksapi.KeyNotFoundException, message: "the ciphertext was made with a version of the external key that this key store does not configure",
			cause: fmt.Errorf("version %d of %s is not in the key store's versions", n, vk.key)}
	case v.disabled:
		return nil, &xksError{name: xksapi.InvalidStateException, message: "the ciphertext was made with a version of the external key that is disabled",
			cause: fmt.Errorf("version %d of %s (label %s) is disabled", n, vk.key, v.label)}
	}
	v.usage.countDecrypt()
	return v, nil
}

// versionedKeys returns the key store's versioned keys, configured and met
// at run time.
func (ks *KeyStore) versionedKeys() []*versionedKey {
	ks.lazyMu.Lock()
	defer ks.lazyMu.Unlock()
	out := make([]*versionedKey, 0, len(ks.versioned)+len(ks.lazy))
	for _, m := range []map[string]*versionedKey{ks.versioned, ks.lazy} {
		for _, k := range slices.Sorted(maps.Keys(m)) {
			out = append(out, m[k])
		}
	}
	return out
}

// VersionInfo is one configured version of an external key.
type VersionInfo struct {
	Version uint32
	Label   string
	// State is current, retired (decrypts only) or disabled.
	State string
}

// ConfiguredVersions lists the versions of key as the key store configures
// them, lowest first. At run time a current version at its limit may give
// way to the next; this is the configuration only.
func (ks *KeyStore) ConfiguredVersions(key string) []VersionInfo {
	var kv *KeyVersions
	for i := range ks.Versions {
		if ks.Versions[i].Key == key {
			kv = &ks.Versions[i]
		}
	}
	vk := newVersionedKey(key, kv)
	cur := vk.current.Load()
	out := make([]VersionInfo, 0, len(vk.versions))
	for _, v := range vk.versions {
		state := "retired"
		switch {
		case v.disabled:
			state = "disabled"
		case v == cur:
			state = "current"
		}
		out = append(out, VersionInfo{Version: v.n, Label: v.label, State: state})
	}
	return out
}

// Limit is the key store's encrypt_limit, or its default.
func (ks *KeyStore) Limit() uint64 {
	if ks.EncryptLimit == 0 {
		return DefaultEncryptLimit
	}
	return ks.EncryptLimit
}
