package authz

import (
	"strings"
	"testing"
)

// TestEKMVocabulary: rules over Azure EKM requests see that API's fields,
// and only those: a rule naming an XKS variable does not compile.
func TestEKMVocabulary(t *testing.T) {
	in := EKMInput{Operation: "wrapkey", KeyStore: "/contoso", KeyName: "kek-1", Alg: "RSA-OAEP",
		Client: "contoso.managedhsmclient.azure.net", RequestID: "r-1", CorrelationID: "c-1", PoolName: "contoso"}
	tests := []struct {
		name    string
		rule    Rule
		allowed bool
	}{
		{"operation and alg", Rule{"sha256-only", EffectDeny, `operation != "metadata" && alg != "RSA-OAEP-256"`}, false},
		{"pool and client", Rule{"own-pool", EffectAllow, `pool_name == "contoso" && client.endsWith(".managedhsmclient.azure.net")`}, true},
		{"key store and key", Rule{"prefix", EffectAllow, `key_store == "/contoso" && key_id.glob("kek-*")`}, true},
		{"request_context ids", Rule{"ids", EffectAllow, `request_id == "r-1" && correlation_id == "c-1"`}, true},
		{"another pool", Rule{"other-pool", EffectAllow, `pool_name == "fabrikam"`}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := CompileEKM([]Rule{tt.rule})
			if err != nil {
				t.Fatal(err)
			}
			if d := p.Evaluate(&in); d.Allowed != tt.allowed {
				t.Fatalf("%+v, want allowed %v", d, tt.allowed)
			}
		})
	}
	for _, xksOnly := range []string{`principal == ""`, `has(metadata.kmsRequestId)`, `access_key_id == ""`} {
		if _, err := CompileEKM([]Rule{{"x", EffectAllow, xksOnly}}); err == nil || !strings.Contains(err.Error(), "undeclared reference") {
			t.Errorf("an EKM rule %s: %v, want it refused", xksOnly, err)
		}
	}
	if _, err := Compile([]Rule{{"x", EffectAllow, `pool_name == ""`}}); err == nil {
		t.Error("an XKS rule naming pool_name compiled")
	}
}
