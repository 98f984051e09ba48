package hsm

import (
	"testing"

	"github.com/caddy-xks/caddy-xks/hsm/hsmtest"
)

// BenchmarkKeyWrap measures one call of each key wrap algorithm through a
// Backend, on one goroutine, per token: what a call of Azure's EKM costs
// in the HSM against its 250 ms. A 32-byte data key, as Azure services
// wrap.
func BenchmarkKeyWrap(b *testing.B) {
	soft := hsmtest.NewToken(b)
	nssCfg, nss := nssConfig(b)
	pair := hsmtest.RSAKey(b, 2048)
	softAES, nssAES, softRSA, nssRSA := unique("bench-aes"), unique("bench-aes"), unique("bench-rsa"), unique("bench-rsa")
	soft.ImportKey(b, softAES, randomBytes(32), hsmtest.KeyWrapping())
	soft.ImportRSAKey(b, softRSA, pair, true)
	nss.ImportKey(b, nssAES, randomBytes(32), hsmtest.KeyWrapping())
	nss.ImportRSAKey(b, nssRSA, pair, true)
	for _, tok := range []struct {
		name     string
		cfg      Config
		aes, rsa string
		algs     []WrapAlgorithm
	}{
		{"SoftHSM2", configFor(soft), softAES, softRSA, []WrapAlgorithm{AESKeyWrap, AESKeyWrapPad, RSAOAEP}},
		{"NSS", nssCfg, nssAES, nssRSA, []WrapAlgorithm{AESKeyWrap, AESKeyWrapPad, RSAOAEP, RSAOAEP256}},
	} {
		be, err := Open("bench-"+tok.name, tok.cfg, nil)
		if err != nil {
			b.Fatal(err)
		}
		for _, alg := range tok.algs {
			label := tok.aes
			if alg.rsa() {
				label = tok.rsa
			}
			dek := randomBytes(32)
			wrapped, err := be.WrapKey(bg, label, alg, dek)
			if err != nil {
				b.Fatal(err)
			}
			b.Run(tok.name+"/"+alg.String()+"/wrap", func(b *testing.B) {
				for b.Loop() {
					if _, err := be.WrapKey(bg, label, alg, dek); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run(tok.name+"/"+alg.String()+"/unwrap", func(b *testing.B) {
				for b.Loop() {
					if _, err := be.UnwrapKey(bg, label, alg, wrapped); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
		_ = be.Close()
	}
}
