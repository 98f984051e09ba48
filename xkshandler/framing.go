package xkshandler

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// aadFraming says how the AAD given to the HSM is built from the request's
// AAD and the ciphertextMetadata. KMS never sees it, but a ciphertext can only
// be decrypted by a proxy that frames exactly as the one that encrypted it.
type aadFraming uint8

const (
	// framingSpec is the spec's construction:
	// u16be(len(AAD)) ‖ AAD ‖ u8(len(metadata)) ‖ metadata.
	framingSpec aadFraming = iota
	// framingAWSSample is the construction of AWS's sample proxy
	// (aws-samples/aws-kms-xks-proxy, build_full_aad), which puts the
	// SHA-256 digest of the AAD, only when an AAD is present, where the spec
	// puts the AAD itself: u16be(len(AAD)) ‖ [SHA-256(AAD)] ‖ u8(len(metadata)) ‖ metadata.
	// Key stores migrated from that proxy need it to decrypt what it wrote.
	framingAWSSample
)

// Names of the framings in the configuration.
const (
	FramingSpec      = "spec"
	FramingAWSSample = "aws_sample"
)

func parseFraming(name string) (aadFraming, error) {
	switch name {
	case "", FramingSpec:
		return framingSpec, nil
	case FramingAWSSample:
		return framingAWSSample, nil
	}
	return 0, fmt.Errorf("unknown aad_framing %q: want %q or %q", name, FramingSpec, FramingAWSSample)
}

// hsmAAD frames aad and metadata for the HSM. Callers have checked
// len(aad) ≤ xksapi.MaxAADLen and len(metadata) ≤
// xksapi.MaxCiphertextMetadataLen; the explicit lengths stop an AAD from
// being passed off as metadata or the other way round.
func (f aadFraming) hsmAAD(aad, metadata []byte) []byte {
	body := aad
	if f == framingAWSSample && len(aad) > 0 {
		sum := sha256.Sum256(aad)
		body = sum[:]
	}
	out := make([]byte, 0, 2+len(body)+1+len(metadata))
	out = binary.BigEndian.AppendUint16(out, uint16(len(aad))) //nolint:gosec // callers bound len(aad), see above
	out = append(out, body...)
	out = append(out, byte(len(metadata))) //nolint:gosec // callers bound len(metadata), see above
	return append(out, metadata...)
}

// cdiv is the Ciphertext Data Integrity Value of an Encrypt response:
// SHA-256(AAD ‖ metadata ‖ IV ‖ ciphertext ‖ tag) over the raw request AAD
// and the response fields, without lengths, as the spec's Appendix C defines.
func cdiv(aad, metadata, iv, ciphertext, tag []byte) []byte {
	h := sha256.New()
	for _, part := range [][]byte{aad, metadata, iv, ciphertext, tag} {
		h.Write(part)
	}
	return h.Sum(nil)
}
