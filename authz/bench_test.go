package authz

import "testing"

// BenchmarkEvaluate measures what authorization adds to each request, for a
// policy of two deny and three allow rules and requests that stop at
// different rules.
func BenchmarkEvaluate(b *testing.B) {
	p, err := Compile(realisticPolicy)
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name string
		in   Input
	}{
		{"allowed-by-first-allow", encryptByApp},
		{"allowed-by-last-allow", with(decryptByApp, func(in *Input) { in.AWSPrincipalARN = "arn:aws:iam::111122223333:user/batch" })},
		{"denied-by-first-deny", encryptViaEBS},
		{"no-allow-matched", byOtherAcct},
	} {
		b.Run(bc.name, func(b *testing.B) {
			in := bc.in
			b.ReportAllocs()
			for b.Loop() {
				p.Evaluate(&in)
			}
		})
	}
}
