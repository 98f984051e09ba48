package tlscheck

import (
	"crypto/x509"
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
)

const kmsUSEast1 = "cks.kms.us-east-1.amazonaws.com"

// verifiedChains does what crypto/tls does before it calls a verifier with
// RequireAndVerifyClientCert: verify the client's chain against the pool.
func verifiedChains(t *testing.T, leaf *x509.Certificate, roots ...*testCA) [][]*x509.Certificate {
	t.Helper()
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r.cert)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		t.Fatalf("test setup: verifying the client chain: %v", err)
	}
	return chains
}

func TestSubjectVerifier(t *testing.T) {
	ca := newRootCA(t, "Amazon Root CA test")
	client := func(spec leafSpec) *x509.Certificate {
		spec.usage = x509.ExtKeyUsageClientAuth
		c, _ := ca.leaf(t, spec)
		return c
	}
	v := &SubjectVerifier{CommonNames: []string{kmsUSEast1, "cks.kms.eu-west-1.amazonaws.com"}}
	other := client(leafSpec{cn: kmsUSEast1})

	tests := []struct {
		name    string
		leaf    *x509.Certificate
		chains  bool   // give the verifier the chains crypto/tls would have verified
		raw     []byte // presented leaf, if not leaf
		wantErr string
	}{
		{name: "configured CN is accepted", leaf: client(leafSpec{cn: kmsUSEast1}), chains: true},
		{name: "any configured CN is accepted", leaf: client(leafSpec{cn: "cks.kms.eu-west-1.amazonaws.com"}), chains: true},
		{name: "CN compares without case", leaf: client(leafSpec{cn: "CKS.KMS.us-east-1.amazonaws.com"}), chains: true},
		{name: "another region's CN is refused", leaf: client(leafSpec{cn: "cks.kms.us-west-2.amazonaws.com"}), chains: true, wantErr: `"cks.kms.us-west-2.amazonaws.com" is not accepted`},
		{name: "a CN that only ends with the name is refused", leaf: client(leafSpec{cn: "x." + kmsUSEast1}), chains: true, wantErr: "is not accepted"},
		{name: "the name in a SAN only is refused", leaf: client(leafSpec{cn: "client.example.com", dnsNames: []string{kmsUSEast1}}), chains: true, wantErr: "is not accepted"},
		{name: "no CN is refused", leaf: client(leafSpec{dnsNames: []string{kmsUSEast1}}), chains: true, wantErr: "no subject common name"},
		{name: "an unverified chain is refused", leaf: client(leafSpec{cn: kmsUSEast1}), wantErr: "was not verified"},
		{name: "a chain for another certificate is refused", leaf: client(leafSpec{cn: kmsUSEast1}), chains: true, raw: other.Raw, wantErr: "does not start with the presented"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			raw := tt.leaf.Raw
			if tt.raw != nil {
				raw = tt.raw
			}
			var chains [][]*x509.Certificate
			if tt.chains {
				chains = verifiedChains(t, tt.leaf, ca)
			}
			err := v.VerifyClientCertificate([][]byte{raw}, chains)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tt.wantErr != "" && err == nil:
				t.Fatal("accepted")
			case tt.wantErr != "" && !strings.Contains(err.Error(), tt.wantErr):
				t.Fatalf("error %q, want it to contain %q", err, tt.wantErr)
			}
		})
	}

	t.Run("no certificate at all is refused", func(t *testing.T) {
		if err := v.VerifyClientCertificate(nil, nil); err == nil {
			t.Fatal("accepted")
		}
	})
}

func TestSubjectVerifierValidate(t *testing.T) {
	tests := []struct {
		name    string
		names   []string
		wantErr string
	}{
		{name: "one name", names: []string{kmsUSEast1}},
		{name: "no names", wantErr: "at least one common name"},
		{name: "an empty name", names: []string{""}, wantErr: "matched exactly"},
		{name: "a wildcard", names: []string{"cks.kms.*.amazonaws.com"}, wantErr: "wildcards"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := (&SubjectVerifier{CommonNames: tt.names}).Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

// TestSubjectVerifierCaddyfile parses client_auth blocks with Caddy's own
// client_auth parser, so that the verifier's syntax is tested where users
// write it.
func TestSubjectVerifierCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    string // the verifiers JSON
		wantErr string
	}{
		{
			name: "names on the verifier line",
			input: `client_auth {
				mode require_and_verify
				verifier xks_subject cks.kms.us-east-1.amazonaws.com cks.kms.eu-west-1.amazonaws.com
			}`,
			want: `[{"common_names":["cks.kms.us-east-1.amazonaws.com","cks.kms.eu-west-1.amazonaws.com"],"verifier":"xks_subject"}]`,
		},
		{
			name: "names in a block",
			input: `client_auth {
				verifier xks_subject {
					common_name cks.kms.us-east-1.amazonaws.com
				}
			}`,
			want: `[{"common_names":["cks.kms.us-east-1.amazonaws.com"],"verifier":"xks_subject"}]`,
		},
		{
			name: "no name",
			input: `client_auth {
				verifier xks_subject
			}`,
			wantErr: "at least one common name",
		},
		{
			name: "empty common_name",
			input: `client_auth {
				verifier xks_subject {
					common_name
				}
			}`,
			wantErr: "wrong argument count",
		},
		{
			name: "unknown option",
			input: `client_auth {
				verifier xks_subject {
					region us-east-1
				}
			}`,
			wantErr: `unknown xks_subject option "region"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ca caddytls.ClientAuthentication
			err := ca.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := json.Marshal(ca.VerifiersRaw)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Fatalf("verifiers\n got %s\nwant %s", got, tt.want)
			}
		})
	}
}
