package sigv4auth

import (
	"strings"
	"testing"
)

func TestValidateCredential(t *testing.T) {
	const validID = "ABCDEFGHIJKLMNOPQRST2345" // 24 characters
	validSecret := strings.Repeat("aZ09/+=x", 6)[:45]
	tests := []struct {
		name    string
		cred    Credential
		wantErr string // empty: valid
	}{
		{"access key id of 19 characters", Credential{strings.Repeat("A", 19), validSecret}, "must be 20 to 30 characters long, got 19"},
		{"access key id of 20 characters", Credential{strings.Repeat("A", 20), validSecret}, ""},
		{"access key id of 30 characters", Credential{strings.Repeat("7", 30), validSecret}, ""},
		{"access key id of 31 characters", Credential{strings.Repeat("A", 31), validSecret}, "must be 20 to 30 characters long, got 31"},
		{"access key id with lower case", Credential{"abcdefghijklmnopqrst", validSecret}, "only A-Z and 2-7"},
		{"access key id with digit 0", Credential{"ABCDE12345670EXAMPLE", validSecret}, "only A-Z and 2-7"},
		{"access key id with digit 8", Credential{"ABCDEFGHIJKLMNOPQRS8", validSecret}, "only A-Z and 2-7"},
		{"access key id with dash", Credential{"ABCDEFGHIJ-LMNOPQRST", validSecret}, "only A-Z and 2-7"},
		{"empty access key id", Credential{"", validSecret}, "got 0"},
		{"secret of 42 characters", Credential{validID, validSecret[:42]}, "secret access key must be 43 to 64 characters long, got 42"},
		{"secret of 43 characters", Credential{validID, validSecret[:43]}, ""},
		{"secret of 64 characters", Credential{validID, strings.Repeat("Ab1/+=", 11)[:64]}, ""},
		{"secret of 65 characters", Credential{validID, strings.Repeat("Ab1/+=", 11)[:65]}, "got 65"},
		{"secret with dash", Credential{validID, validSecret[:44] + "-"}, "only A-Z, a-z, 0-9"},
		{"secret with space", Credential{validID, validSecret[:44] + " "}, "only A-Z, a-z, 0-9"},
		{"secret with non-ASCII", Credential{validID, validSecret[:43] + "é"}, "only A-Z, a-z, 0-9"},
		{"example from the XKS test client", Credential{"BETWEEN2TENAND3TENCHARACTERS", "PleaseReplaceThisWithSomeSecretOfLength43To64"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateCredential(tt.cred)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), `"`+tt.cred.AccessKeyID+`"`) {
				t.Errorf("error %q does not name the access key id", err)
			}
			if strings.Contains(err.Error(), tt.cred.SecretAccessKey) {
				t.Errorf("error %q reveals the secret", err)
			}
		})
	}
}

func TestValidateCredentialDoesNotEchoSecretInAccessKeyIDField(t *testing.T) {
	// A secret pasted into the access key id field must not reach the log.
	secret := "PleaseReplaceThisWithSomeSecretOfLength43To64"
	err := ValidateCredential(Credential{AccessKeyID: secret, SecretAccessKey: secret})
	if err == nil || strings.Contains(err.Error(), secret) {
		t.Fatalf("err = %v, want an error without the value", err)
	}
}
