package hsm

import (
	"errors"
	"sync"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// ivWindow is how many of the most recent IVs per token the repeat check
// remembers.
//
// Why a window and not every IV: at 1,800 encryptions a second a set of all
// IVs grows by ~150 million entries a day. The check exists to catch an HSM
// (or an IV mode) that does not really generate IVs: one that returns a
// constant, zeros, or restarts a counter. Those repeat within seconds, which
// the window of 131,072 IVs (~73 s at 1,800/s) sees. Random 96-bit IVs from a
// working generator collide with negligible probability long before the
// 2^32-messages-per-key limit of GCM. Memory is fixed per token: ~2.2 MiB
// for the ring, allocated up front, plus ~3 MiB for the set once full.
const ivWindow = 1 << 17

const ivShards = 16

var (
	errZeroIV     = errors.New("the iv is all zero bytes: the hsm did not generate one (wrong iv mode?)")
	errRepeatedIV = errors.New("the hsm produced an iv it produced before: refusing to reuse a gcm nonce")
	errIVLength   = errors.New("the iv is neither 12 nor 16 bytes long")
)

type ivKey struct {
	n uint8
	b [xksapi.LongIVLen]byte
}

// ivShard is an exact set of the last len(ring) IVs: the ring says which IV
// leaves the set when a new one arrives.
type ivShard struct {
	mu   sync.Mutex
	set  map[ivKey]struct{}
	ring []ivKey
	next int
	full bool
}

// ivRegistry remembers recent IVs, sharded so concurrent encryptions rarely
// contend for one lock.
type ivRegistry struct {
	shards [ivShards]ivShard
}

func newIVRegistry(window int) *ivRegistry {
	r := new(ivRegistry)
	per := max(window/ivShards, 1)
	for i := range r.shards {
		r.shards[i].set = make(map[ivKey]struct{})
		r.shards[i].ring = make([]ivKey, per)
	}
	return r
}

// observe records iv, refusing an all-zero IV and one seen before.
func (r *ivRegistry) observe(iv []byte) error {
	if !xksapi.ValidIVLen(len(iv)) {
		return errIVLength
	}
	var k ivKey
	k.n = uint8(len(iv)) //nolint:gosec // 12 or 16, checked above
	zero := true
	for i, c := range iv {
		k.b[i] = c
		zero = zero && c == 0
	}
	if zero {
		return errZeroIV
	}
	s := &r.shards[iv[len(iv)-1]%ivShards]
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.set[k]; dup {
		return errRepeatedIV
	}
	if s.full {
		delete(s.set, s.ring[s.next])
	}
	s.ring[s.next] = k
	s.set[k] = struct{}{}
	s.next++
	if s.next == len(s.ring) {
		s.next, s.full = 0, true
	}
	return nil
}
