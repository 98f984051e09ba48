package authz

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// Requests as KMS sends them, trimmed to what the rules below look at.
var (
	encryptByApp = Input{
		Operation:     "Encrypt",
		KeyStore:      "/kms/xks/v1",
		ExternalKeyID: "hsm-key-1",
		AccessKeyID:   "EXAMPLEAPPKEYID23456",
		RequestMetadata: xksapi.RequestMetadata{
			AWSPrincipalARN: "arn:aws:iam::111122223333:role/app",
			KMSOperation:    "GenerateDataKey",
			KMSKeyARN:       "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
			KMSRequestID:    "4112f4d6-db54-4af4-ae30-c55a22a8dfae",
		},
	}
	encryptViaEBS = with(encryptByApp, func(in *Input) { in.KMSViaService = "ebs" })
	decryptByApp  = with(encryptByApp, func(in *Input) { in.Operation, in.KMSOperation = "Decrypt", "Decrypt" })
	decryptViaEBS = with(decryptByApp, func(in *Input) { in.KMSViaService = "ebs" })
	encryptByEC2  = with(encryptByApp, func(in *Input) { in.AWSPrincipalARN = "ec2.amazonaws.com" })
	encryptByKMS  = with(encryptByApp, func(in *Input) { in.AWSPrincipalARN = "AWS Internal" })
	byOtherAcct   = with(encryptByApp, func(in *Input) { in.AWSPrincipalARN = "arn:aws:iam::444455556666:role/app" })
	byAdmin       = with(encryptByApp, func(in *Input) {
		in.AWSPrincipalARN = "arn:aws:sts::111122223333:assumed-role/Admin/alice"
	})
	futureKMSOp = with(encryptByApp, func(in *Input) { in.KMSOperation = "GenerateDataKeyPairWithoutPlaintext" })
	createKey   = with(encryptByApp, func(in *Input) {
		in.Operation, in.KMSOperation, in.KMSKeyARN = "GetKeyMetadata", "CreateKey", ""
	})
)

func with(in Input, change func(*Input)) Input {
	change(&in)
	return in
}

func allow(name, expr string) Rule { return Rule{Name: name, Effect: EffectAllow, Expression: expr} }
func deny(name, expr string) Rule  { return Rule{Name: name, Effect: EffectDeny, Expression: expr} }

func TestEvaluate(t *testing.T) {
	tests := []struct {
		name  string
		rules []Rule
		in    Input
		want  Decision
	}{
		{
			name:  "principal allowed",
			rules: []Rule{allow("app", `principal == "arn:aws:iam::111122223333:role/app"`)},
			in:    encryptByApp,
			want:  Decision{Allowed: true, Rule: "app", Reason: `allowed by rule "app"`},
		},
		{
			name:  "principal denied",
			rules: []Rule{deny("no-ec2", `principal == "ec2.amazonaws.com"`), allow("any", `true`)},
			in:    encryptByEC2,
			want:  Decision{Rule: "no-ec2", Reason: `denied by rule "no-ec2"`},
		},
		{
			name:  "principal not allowed",
			rules: []Rule{allow("app", `principal == "arn:aws:iam::111122223333:role/app"`)},
			in:    byAdmin,
			want:  Decision{Reason: "no allow rule matched"},
		},
		{
			name:  "kmsViaService condition denies",
			rules: []Rule{deny("no-ebs-encrypt", `operation == "Encrypt" && via_service == "ebs"`)},
			in:    encryptViaEBS,
			want:  Decision{Rule: "no-ebs-encrypt", Reason: `denied by rule "no-ebs-encrypt"`},
		},
		{
			name:  "kmsViaService condition passes other operations",
			rules: []Rule{deny("no-ebs-encrypt", `operation == "Encrypt" && via_service == "ebs"`)},
			in:    decryptViaEBS,
			want:  Decision{Allowed: true, Reason: "no deny rule matched"},
		},
		{
			name:  "kmsViaService condition passes direct calls",
			rules: []Rule{deny("no-ebs-encrypt", `operation == "Encrypt" && via_service == "ebs"`)},
			in:    encryptByApp,
			want:  Decision{Allowed: true, Reason: "no deny rule matched"},
		},
		{
			name:  "wildcard account by glob",
			rules: []Rule{allow("our-account", `glob(principal, "arn:aws:iam::111122223333:*")`)},
			in:    encryptByApp,
			want:  Decision{Allowed: true, Rule: "our-account", Reason: `allowed by rule "our-account"`},
		},
		{
			name:  "wildcard account by glob rejects other accounts",
			rules: []Rule{allow("our-account", `glob(principal, "arn:aws:iam::111122223333:*")`)},
			in:    byOtherAcct,
			want:  Decision{Reason: "no allow rule matched"},
		},
		{
			name:  "wildcard account by account_in",
			rules: []Rule{allow("our-accounts", `account_in(principal, ["111122223333", "777788889999"])`)},
			in:    byAdmin,
			want:  Decision{Allowed: true, Rule: "our-accounts", Reason: `allowed by rule "our-accounts"`},
		},
		{
			name:  "account_in is false for service principals",
			rules: []Rule{allow("our-accounts", `account_in(principal, ["111122223333"])`)},
			in:    encryptByKMS,
			want:  Decision{Reason: "no allow rule matched"},
		},
		{
			name: "deny overrides allow",
			rules: []Rule{
				allow("our-account", `arn_account(principal) == "111122223333"`),
				deny("no-admin-data", `principal.glob("arn:aws:sts::*:assumed-role/Admin/*") && operation == "Encrypt"`),
			},
			in:   byAdmin,
			want: Decision{Rule: "no-admin-data", Reason: `denied by rule "no-admin-data"`},
		},
		{
			name: "first matching deny rule is named",
			rules: []Rule{
				deny("first", `operation == "Encrypt"`),
				deny("second", `operation == "Encrypt"`),
			},
			in:   encryptByApp,
			want: Decision{Rule: "first", Reason: `denied by rule "first"`},
		},
		{
			name: "first matching allow rule is named",
			rules: []Rule{
				allow("no", `operation == "Decrypt"`),
				allow("yes", `operation == "Encrypt"`),
				allow("also", `true`),
			},
			in:   encryptByApp,
			want: Decision{Allowed: true, Rule: "yes", Reason: `allowed by rule "yes"`},
		},
		{
			name: "no allow rule matched",
			rules: []Rule{
				allow("decrypt-only", `operation == "Decrypt"`),
				allow("other-store", `key_store == "/other"`),
			},
			in:   encryptByApp,
			want: Decision{Reason: "no allow rule matched"},
		},
		{
			name: "no rules",
			in:   encryptByApp,
			want: Decision{Allowed: true, Reason: "no rules"},
		},
		{
			name:  "unknown kmsOperation flows to an allow rule",
			rules: []Rule{allow("any-op", `kms_operation.startsWith("GenerateDataKey")`)},
			in:    futureKMSOp,
			want:  Decision{Allowed: true, Rule: "any-op", Reason: `allowed by rule "any-op"`},
		},
		{
			name: "unknown kmsOperation can be denied",
			rules: []Rule{deny("known-ops-only",
				`!(kms_operation in ["Encrypt", "ReEncrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "Decrypt", "CreateKey", "DescribeKey"])`)},
			in:   futureKMSOp,
			want: Decision{Rule: "known-ops-only", Reason: `denied by rule "known-ops-only"`},
		},
		{
			name:  "runtime error in a deny rule denies",
			rules: []Rule{deny("numeric-principal", `int(principal) > 0`)},
			in:    encryptByApp,
			want: Decision{Rule: "numeric-principal",
				Reason: `rule "numeric-principal" failed: type conversion error from 'string' to 'int'`},
		},
		{
			name:  "runtime error in an allow rule denies",
			rules: []Rule{allow("numeric-principal", `int(principal) > 0`), allow("any", `true`)},
			in:    encryptByApp,
			want: Decision{Rule: "numeric-principal",
				Reason: `rule "numeric-principal" failed: type conversion error from 'string' to 'int'`},
		},
		{
			name:  "absent metadata key fails closed",
			rules: []Rule{deny("ebs-by-metadata", `metadata.kmsViaService == "ebs"`)},
			in:    encryptByApp,
			want:  Decision{Rule: "ebs-by-metadata", Reason: `rule "ebs-by-metadata" failed: no such key: kmsViaService`},
		},
		{
			name:  "metadata has the requestMetadata keys",
			rules: []Rule{allow("metadata", `metadata.kmsOperation == kms_operation && metadata["awsPrincipalArn"] == principal && !has(metadata.awsSourceVpc)`)},
			in:    encryptByApp,
			want:  Decision{Allowed: true, Rule: "metadata", Reason: `allowed by rule "metadata"`},
		},
		{
			name:  "comprehension over metadata",
			rules: []Rule{deny("from-a-vpc", `metadata.exists(k, k.startsWith("awsSource"))`)},
			in:    encryptByApp,
			want:  Decision{Allowed: true, Reason: "no deny rule matched"},
		},
		{
			name: "every variable is bound",
			rules: []Rule{allow("all", `operation == "Encrypt" && key_store == "/kms/xks/v1" && key_id == "hsm-key-1" &&
				access_key_id == "EXAMPLEAPPKEYID23456" && kms_operation == "GenerateDataKey" &&
				key_arn.endsWith(":key/1234abcd-12ab-34cd-56ef-1234567890ab") && via_service == "" &&
				source_vpc == "" && source_vpce == "" && request_id == "4112f4d6-db54-4af4-ae30-c55a22a8dfae"`)},
			in:   encryptByApp,
			want: Decision{Allowed: true, Rule: "all", Reason: `allowed by rule "all"`},
		},
		{
			name: "key owner and caller accounts",
			rules: []Rule{allow("same-account-same-region",
				`arn_account(key_arn) == arn_account(principal) && arn_region(key_arn) == "us-east-1"`)},
			in:   encryptByApp,
			want: Decision{Allowed: true, Rule: "same-account-same-region", Reason: `allowed by rule "same-account-same-region"`},
		},
		{
			name:  "GetKeyMetadata at CreateKey",
			rules: []Rule{allow("create-by-admin", `kms_operation == "CreateKey" && key_arn == "" && operation == "GetKeyMetadata"`)},
			in:    createKey,
			want:  Decision{Allowed: true, Rule: "create-by-admin", Reason: `allowed by rule "create-by-admin"`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Compile(tt.rules)
			if err != nil {
				t.Fatal(err)
			}
			in := tt.in
			if got := p.Evaluate(&in); got != tt.want {
				t.Errorf("Evaluate = %+v\nwant       %+v", got, tt.want)
			}
		})
	}
}

func TestEvaluateCostLimit(t *testing.T) {
	list := "[" + strings.Repeat("1,", 99) + "1]"
	expr := fmt.Sprintf("%s.all(a, %s.all(b, %s.all(c, a+b+c > 0)))", list, list, list)
	p, err := Compile([]Rule{allow("cubic", expr)})
	if err != nil {
		t.Fatal(err)
	}
	d := p.Evaluate(&encryptByApp)
	if d.Allowed || d.Rule != "cubic" || !strings.Contains(d.Reason, "cost limit exceeded") {
		t.Errorf("Evaluate = %+v, want a denial for exceeding the cost limit", d)
	}
}

func TestEvaluateWithoutPolicyOrInput(t *testing.T) {
	var none *Policy[Input]
	if d := none.Evaluate(&encryptByApp); !d.Allowed {
		t.Errorf("nil policy: %+v, want allowed", d)
	}
	p, err := Compile([]Rule{deny("never", `false`)})
	if err != nil {
		t.Fatal(err)
	}
	if d := p.Evaluate(nil); d.Allowed {
		t.Errorf("nil input: %+v, want denied", d)
	}
}

func TestCompileErrors(t *testing.T) {
	tests := []struct {
		name  string
		rules []Rule
		want  []string // substrings of the error
	}{
		{"syntax error", []Rule{allow("broken", `principal ==`)},
			[]string{`rule "broken": compiling expression:`, "Syntax error"}},
		{"non-bool result", []Rule{allow("stringy", `principal`)},
			[]string{`rule "stringy": expression yields string, not bool`}},
		{"dyn result", []Rule{allow("dynamic", `dyn(principal)`)},
			[]string{`rule "dynamic": expression yields dyn, not bool`}},
		{"unknown variable", []Rule{deny("typo", `princpal == "x"`)},
			[]string{`rule "typo": compiling expression:`, "undeclared reference to 'princpal'"}},
		{"unknown function", []Rule{deny("no-regex-glob", `principal.like("x")`)},
			[]string{`rule "no-regex-glob": compiling expression:`, "like"}},
		{"wrong argument type", []Rule{deny("int-list", `account_in(principal, [1])`)},
			[]string{`rule "int-list": compiling expression:`, "account_in"}},
		{"bad effect", []Rule{{Name: "permit", Effect: "permit", Expression: "true"}},
			[]string{`rule "permit": effect "permit" is neither "allow" nor "deny"`}},
		{"effect is case-sensitive", []Rule{{Name: "shout", Effect: "Deny", Expression: "true"}},
			[]string{`rule "shout": effect "Deny"`}},
		{"missing effect", []Rule{{Name: "bare", Expression: "true"}},
			[]string{`rule "bare": effect ""`}},
		{"empty expression", []Rule{allow("blank", "")},
			[]string{`rule "blank": empty expression`}},
		{"duplicate name", []Rule{allow("twice", "true"), deny("twice", "false")},
			[]string{`rule "twice": name used again (rules 1 and 2)`}},
		{"empty name", []Rule{allow("ok", "true"), allow("", "true")},
			[]string{`rule 2: empty name`}},
		{"every error is reported", []Rule{allow("one", "1"), allow("two", "2")},
			[]string{`rule "one"`, `rule "two"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Compile(tt.rules)
			if err == nil {
				t.Fatalf("Compile succeeded: %+v", p)
			}
			for _, want := range tt.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not contain %q", err, want)
				}
			}
		})
	}
}

// realisticPolicy is what a customer might configure for one key store: keep
// two services and unknown callers out, let the application roles of two
// accounts and the key administrators in.
var realisticPolicy = []Rule{
	deny("no-ebs-encrypt", `operation == "Encrypt" && via_service == "ebs"`),
	deny("no-service-principals", `!principal.startsWith("arn:") && principal != "AWS Internal"`),
	allow("app-roles", `account_in(principal, ["111122223333", "444455556666"]) && arn_resource(principal).startsWith("role/app")`),
	allow("key-admins", `glob(principal, "arn:aws:sts::111122223333:assumed-role/KeyAdmin/*") && operation == "GetKeyMetadata"`),
	allow("same-account-keys", `arn_account(key_arn) == arn_account(principal) && arn_region(key_arn) == "us-east-1" && kms_operation in ["Decrypt", "ReEncrypt"]`),
}

// TestEvaluateConcurrently shares one policy among many goroutines, for the
// race detector.
func TestEvaluateConcurrently(t *testing.T) {
	p, err := Compile(realisticPolicy)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		in   Input
		want Decision
	}{
		{encryptByApp, p.Evaluate(&encryptByApp)},
		{encryptViaEBS, p.Evaluate(&encryptViaEBS)},
		{decryptByApp, p.Evaluate(&decryptByApp)},
		{encryptByEC2, p.Evaluate(&encryptByEC2)},
		{byOtherAcct, p.Evaluate(&byOtherAcct)},
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				c := cases[(g+i)%len(cases)]
				in := c.in
				if got := p.Evaluate(&in); got != c.want {
					t.Errorf("Evaluate(%+v) = %+v, want %+v", c.in, got, c.want)
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestDocExamples compiles the example rules of the package documentation.
func TestDocExamples(t *testing.T) {
	_, err := Compile([]Rule{
		allow("one-account-via-ebs", `arn_account(principal) == "111122223333" && via_service == "ebs"`),
		allow("keys-of-this-account", `key_arn.glob("arn:aws:kms:eu-west-1:111122223333:key/*") || operation == "GetKeyMetadata"`),
		deny("create-by-admins", `kms_operation == "CreateKey" && !principal.glob("arn:aws:sts::111122223333:assumed-role/KeyAdmin/*")`),
		deny("known-ops", `!(kms_operation in ["Encrypt", "ReEncrypt", "GenerateDataKey",
	         "GenerateDataKeyWithoutPlaintext", "Decrypt", "CreateKey", "DescribeKey"])`),
		deny("no-ebs-encrypt", `operation == "Encrypt" && via_service == "ebs"`),
		allow("app-roles", `account_in(principal, ["111122223333"]) && arn_resource(principal).startsWith("role/app")`),
		allow("key-admins", `principal.glob("arn:aws:sts::111122223333:assumed-role/KeyAdmin/*") && operation == "GetKeyMetadata"`),
		allow("vpce", `has(metadata.awsSourceVpce)`),
		allow("govcloud", `arn_partition(key_arn) == "aws-us-gov"`),
	})
	if err != nil {
		t.Fatal(err)
	}
}
