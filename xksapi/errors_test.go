package xksapi

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestErrorStatusesAreTheSpecs: each error name is spelt, and has the
// status, of the spec's error table (xks-spec.md, "Error Codes"), written
// out here as the table gives them, and there is no other name.
func TestErrorStatusesAreTheSpecs(t *testing.T) {
	spec := []struct {
		constant, name string
		status         int
	}{
		{ValidationException, "ValidationException", 400},
		{InvalidStateException, "InvalidStateException", 400},
		{InvalidCiphertextException, "InvalidCiphertextException", 400},
		{InvalidKeyUsageException, "InvalidKeyUsageException", 400},
		{AuthenticationFailedException, "AuthenticationFailedException", 401},
		{AccessDeniedException, "AccessDeniedException", 403},
		{KeyNotFoundException, "KeyNotFoundException", 404},
		{InvalidURIPathException, "InvalidUriPathException", 404},
		{ThrottlingException, "ThrottlingException", 429},
		{UnsupportedOperationException, "UnsupportedOperationException", 501},
		{DependencyTimeoutException, "DependencyTimeoutException", 503},
		{InternalException, "InternalException", 500},
	}
	for _, row := range spec {
		if row.constant != row.name {
			t.Errorf("the constant for %s is spelt %q", row.name, row.constant)
		}
		if got := Status(row.name); got != row.status {
			t.Errorf("%s: status %d, the spec's is %d", row.name, got, row.status)
		}
	}
	if len(statuses) != len(spec) {
		t.Errorf("%d error names, the spec has %d", len(statuses), len(spec))
	}
	if Status("NoSuchException") != 0 || StatusWrongMethod != 405 {
		t.Errorf("Status of an unknown name %d, of a wrong method %d", Status("NoSuchException"), StatusWrongMethod)
	}
}

// TestErrorBodiesAreSpecShaped: whatever message a failure carries, every
// error's body is one line of JSON with an errorMessage of fewer than 512
// printable ASCII characters.
func TestErrorBodiesAreSpecShaped(t *testing.T) {
	for name := range statuses {
		msg := ErrorMessage(strings.Repeat("\x00é", 400))
		if len(msg) >= 512 || !ValidErrorMessage(msg) {
			t.Errorf("%s: message of %d characters", name, len(msg))
		}
		for _, c := range []byte(msg) {
			if c < 0x20 || c > 0x7e {
				t.Fatalf("%s: non-printable byte %#x in message", name, c)
			}
		}
		out, _ := json.Marshal(ErrorBody{ErrorName: name, ErrorMessage: msg})
		if strings.Contains(string(out), "\n") {
			t.Errorf("%s: multi-line body", name)
		}
	}
}
