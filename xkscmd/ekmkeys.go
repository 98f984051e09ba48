package xkscmd

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/hsm"
)

// ekmAlgorithms are the algorithms of each kind of key-encryption key, by
// the names the EKM API gives them.
var ekmAlgorithms = map[string][]struct {
	name string
	alg  hsm.WrapAlgorithm
}{
	hsm.WrapKeyAES: {{ekmapi.AlgA256KW, hsm.AESKeyWrap}, {ekmapi.AlgA256KWP, hsm.AESKeyWrapPad}},
	hsm.WrapKeyRSA: {{ekmapi.AlgRSAOAEP, hsm.RSAOAEP}, {ekmapi.AlgRSAOAEP256, hsm.RSAOAEP256}},
}

// parseWrapKeySpec reads --type and --bits: aes (256 bits, the default) or
// rsa (2048, 3072 or 4096; 3072 when --bits is not given).
func parseWrapKeySpec(typ string, bits int) (hsm.WrapKeySpec, error) {
	switch strings.ToLower(typ) {
	case "aes":
		if bits != 0 && bits != 256 {
			return hsm.WrapKeySpec{}, fmt.Errorf("--bits %d: an AES key-encryption key has 256 bits", bits)
		}
		return hsm.WrapKeySpec{Type: hsm.WrapKeyAES, Bits: 256}, nil
	case "rsa":
		switch bits {
		case 0:
			bits = 3072
		case 2048, 3072, 4096:
		default:
			return hsm.WrapKeySpec{}, fmt.Errorf("--bits %d: an RSA key-encryption key has 2048, 3072 or 4096 bits", bits)
		}
		return hsm.WrapKeySpec{Type: hsm.WrapKeyRSA, Bits: bits}, nil
	}
	return hsm.WrapKeySpec{}, fmt.Errorf("--type %q: want aes or rsa", typ)
}

func cmdEKMKeygen(fl caddycmd.Flags, out io.Writer) (int, error) {
	name := fl.String("name")
	if !ekmapi.ValidKeyName(name) {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("--name %q: the key name is Azure's external key id, 1 to %d characters of a-z, A-Z, 0-9 and -", name, ekmapi.MaxKeyNameLen)
	}
	spec, err := parseWrapKeySpec(fl.String("type"), fl.Int("bits"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	b, ctx, done, err := openForKeygen(fl, 2*time.Minute)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer done()
	key, err := b.GenerateWrapKey(ctx, name, spec)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	proven, refused, err := proveWrapKey(ctx, b, name, spec.Type)
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("key %q was created but failed its check: %w", name, err)
	}
	what := "AES-256 key"
	if spec.Type == hsm.WrapKeyRSA {
		what = "RSA-" + strconv.Itoa(key.Bits) + " key pair"
	}
	fmt.Fprintf(out, "created %s %q in backend %s: sensitive, never extractable, not modifiable", what, name, b.Name())
	if len(key.AllowedMechanisms) > 0 {
		fmt.Fprintf(out, ", restricted to %s", strings.Join(key.AllowedMechanisms, " and "))
	} else {
		fmt.Fprint(out, " (the token does not take CKA_ALLOWED_MECHANISMS)")
	}
	fmt.Fprintf(out, "\nproven on this backend: %s wrap and unwrap\n", strings.Join(proven, ", "))
	for _, r := range refused {
		fmt.Fprintf(out, "not served by this backend: %s\n", r)
	}
	if spec.Type == hsm.WrapKeyRSA {
		fmt.Fprintf(out, "n: %s\ne: %s\n", ekmapi.EncodeValue(key.Modulus), ekmapi.EncodeValue(key.PublicExponent))
	}
	if !b.PrivateKeys() {
		fmt.Fprintf(out, "warning: the key is not CKA_PRIVATE (private_keys false): %s\n", b.NonPrivateKeyMeaning())
	}
	fmt.Fprintf(out, "\nMake it an external key of your Managed HSM (it calls this proxy's /metadata for the key):\n"+
		"  az keyvault key create --hsm-name %s --name <name of the key in Azure> --external-key-id %s\n", fl.String("hsm-name"), name)
	return caddy.ExitCodeSuccess, nil
}

// proveWrapKey wraps and unwraps a random data key with every algorithm of
// the key's kind, and says which work and which the backend refuses (its
// HSM cannot do them: SoftHSM2 has no OAEP with SHA-256). An algorithm that
// fails any other way, or none working, is an error.
func proveWrapKey(ctx context.Context, b *hsm.Backend, name, typ string) (proven, refused []string, err error) {
	dek := make([]byte, 32)
	if _, err := rand.Read(dek); err != nil {
		return nil, nil, err
	}
	for _, a := range ekmAlgorithms[typ] {
		wrapped, err := b.WrapKey(ctx, name, a.alg, dek)
		if errors.Is(err, hsm.ErrUnsupportedAlgorithm) {
			refused = append(refused, a.name+" ("+err.Error()+")")
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", a.name, err)
		}
		back, err := b.UnwrapKey(ctx, name, a.alg, wrapped)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", a.name, err)
		}
		if !bytes.Equal(back, dek) {
			return nil, nil, fmt.Errorf("%s: unwrapping did not return the data key", a.name)
		}
		proven = append(proven, a.name)
	}
	if len(proven) == 0 {
		return nil, nil, fmt.Errorf("no algorithm of the key's kind works on this backend: %s", strings.Join(refused, "; "))
	}
	return proven, refused, nil
}
