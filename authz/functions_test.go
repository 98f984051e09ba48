package authz

import (
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/aws/aws-sdk-go-v2/aws/arn"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

func TestGlob(t *testing.T) {
	tests := []struct {
		name       string
		s, pattern string
		want       bool
	}{
		{"empty pattern matches only the empty string", "", "", true},
		{"empty pattern does not match text", "a", "", false},
		{"literal matches itself", "ec2.amazonaws.com", "ec2.amazonaws.com", true},
		{"literal is case-sensitive", "EC2.amazonaws.com", "ec2.amazonaws.com", false},
		{"literal must match all of s", "ec2.amazonaws.com.evil", "ec2.amazonaws.com", false},
		{"only star matches the empty string", "", "*", true},
		{"only star matches anything", "arn:aws:iam::111122223333:role/a/b", "*", true},
		{"star matches none", "abc", "abc*", true},
		{"star crosses colons and slashes", "arn:aws:iam::111122223333:role/path/name", "arn:aws:iam::*/name", true},
		{"account wildcard", "arn:aws:sts::111122223333:assumed-role/Admin/s", "arn:aws:iam::111122223333:*", false},
		{"account prefix", "arn:aws:iam::111122223333:role/Admin", "arn:aws:iam::111122223333:*", true},
		{"other account", "arn:aws:iam::444455556666:role/Admin", "arn:aws:iam::111122223333:*", false},
		{"stars in a row", "abc", "a**c", true},
		{"star backtracks", "aXbXbc", "a*bc", true},
		{"star backtracks and fails", "aXbXbd", "a*bc", false},
		{"several stars", "arn:aws:kms:eu-west-1:111122223333:key/k", "arn:*:kms:*:111122223333:key/*", true},
		{"question mark is one character", "ab", "a?", true},
		{"question mark is not zero characters", "a", "a?", false},
		{"question mark is not two characters", "abc", "a?", false},
		{"question mark is one multi-byte character", "aé", "a?", true},
		{"question mark does not match empty", "", "?", false},
		{"dot is literal", "aXb", "a.b", false},
		{"dot matches dot", "a.b", "a.b", true},
		{"plus is literal", "aa", "a+", false},
		{"parentheses are literal", "f(x)", "f(x)", true},
		{"brackets are literal", "a", "[a]", false},
		{"backslash is literal", `a\*`, `a\*`, true},
		{"backslash does not escape", "a*", `a\*`, false},
		{"caret and dollar are literal", "^a$", "^a$", true},
		{"regex-looking pattern", "abc", ".+", false},
		{"pattern longer than s", "ab", "abc", false},
		{"star then question mark", "ab", "*?", true},
		{"star then question mark needs a character", "", "*?", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Glob(tt.s, tt.pattern); got != tt.want {
				t.Errorf("Glob(%q, %q) = %v, want %v", tt.s, tt.pattern, got, tt.want)
			}
		})
	}
}

// TestGlobAllocatesNothing guards the per-request cost of glob in policies.
func TestGlobAllocatesNothing(t *testing.T) {
	allocs := testing.AllocsPerRun(100, func() {
		Glob("arn:aws:sts::111122223333:assumed-role/Admin/session", "arn:aws:sts::*:assumed-role/Admin/*")
	})
	if allocs != 0 {
		t.Errorf("Glob allocates %v times per call", allocs)
	}
}

func TestARNHelpers(t *testing.T) {
	type fields struct{ partition, service, region, account, resource string }
	tests := []struct {
		name string
		s    string
		want fields
	}{
		{"IAM role has no region", "arn:aws:iam::111122223333:role/KMSUser",
			fields{"aws", "iam", "", "111122223333", "role/KMSUser"}},
		{"KMS key", "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
			fields{"aws", "kms", "us-east-1", "111122223333", "key/1234abcd-12ab-34cd-56ef-1234567890ab"}},
		{"colons stay in the resource", "arn:aws:logs:us-east-1:111122223333:log-group:/aws/x:*",
			fields{"aws", "logs", "us-east-1", "111122223333", "log-group:/aws/x:*"}},
		{"assumed role session", "arn:aws:sts::111122223333:assumed-role/Admin/alice@example.com",
			fields{"aws", "sts", "", "111122223333", "assumed-role/Admin/alice@example.com"}},
		{"GovCloud partition", "arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/k",
			fields{"aws-us-gov", "kms", "us-gov-west-1", "111122223333", "key/k"}},
		{"China partition", "arn:aws-cn:iam::111122223333:root",
			fields{"aws-cn", "iam", "", "111122223333", "root"}},
		{"S3 bucket has no account", "arn:aws:s3:::bucket",
			fields{"aws", "s3", "", "", "bucket"}},
		{"empty resource", "arn:aws:iam::111122223333:",
			fields{"aws", "iam", "", "111122223333", ""}},
		{"service principal is not an ARN", "ec2.amazonaws.com", fields{}},
		{"AWS Internal is not an ARN", "AWS Internal", fields{}},
		{"empty string is not an ARN", "", fields{}},
		{"too few sections", "arn:aws:iam::111122223333", fields{}},
		{"prefix is case-sensitive", "ARN:aws:iam::111122223333:root", fields{}},
		{"prefix must lead", " arn:aws:iam::111122223333:root", fields{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := fields{
				evalString(t, `arn_partition(s)`, tt.s),
				evalString(t, `arn_service(s)`, tt.s),
				evalString(t, `arn_region(s)`, tt.s),
				evalString(t, `arn_account(s)`, tt.s),
				evalString(t, `arn_resource(s)`, tt.s),
			}
			if got != tt.want {
				t.Errorf("fields of %q = %+v, want %+v", tt.s, got, tt.want)
			}
		})
	}
}

func TestAccountIn(t *testing.T) {
	tests := []struct {
		name, principal, list string
		want                  bool
	}{
		{"account listed", "arn:aws:iam::111122223333:role/a", `["444455556666", "111122223333"]`, true},
		{"account not listed", "arn:aws:iam::777788889999:role/a", `["444455556666", "111122223333"]`, false},
		{"empty list", "arn:aws:iam::111122223333:role/a", `[]`, false},
		{"service principal", "ec2.amazonaws.com", `["111122223333"]`, false},
		{"AWS Internal", "AWS Internal", `["111122223333"]`, false},
		{"ARN without an account never matches an empty entry", "arn:aws:s3:::bucket", `[""]`, false},
		{"no partial account match", "arn:aws:iam::111122223333:role/a", `["11112222"]`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := evalBool(t, `account_in(s, `+tt.list+`)`, tt.principal); got != tt.want {
				t.Errorf("account_in(%q, %s) = %v, want %v", tt.principal, tt.list, got, tt.want)
			}
		})
	}
}

func TestGlobInCEL(t *testing.T) {
	for _, expr := range []string{
		`glob(s, "arn:aws:iam::111122223333:*")`,
		`s.glob("arn:aws:iam::111122223333:*")`,
		`s.glob("arn:aws:iam::????????????:role/*")`,
	} {
		if !evalBool(t, expr, "arn:aws:iam::111122223333:role/a") {
			t.Errorf("%s is false", expr)
		}
	}
}

// evalString evaluates a string CEL expression in the policy environment,
// with s as the principal.
func evalString(t *testing.T, expr, s string) string {
	t.Helper()
	expr = strings.ReplaceAll(expr, "(s", "(principal")
	e, err := xks.env()
	if err != nil {
		t.Fatal(err)
	}
	ast, iss := e.Compile(expr)
	if iss.Err() != nil {
		t.Fatalf("%s: %v", expr, iss.Err())
	}
	prg, err := e.Program(ast)
	if err != nil {
		t.Fatal(err)
	}
	out, _, err := prg.Eval(&activation[Input]{voc: xks, in: &Input{RequestMetadata: xksapi.RequestMetadata{AWSPrincipalARN: s}}})
	if err != nil {
		t.Fatalf("%s with principal %q: %v", expr, s, err)
	}
	return out.Value().(string)
}

// evalBool evaluates a bool CEL expression over s by making it the only allow
// rule of a policy, with s as the principal.
func evalBool(t *testing.T, expr, s string) bool {
	t.Helper()
	expr = strings.ReplaceAll(strings.ReplaceAll(expr, "(s", "(principal"), "s.glob", "principal.glob")
	p, err := Compile([]Rule{{Name: "t", Effect: EffectAllow, Expression: expr}})
	if err != nil {
		t.Fatal(err)
	}
	d := p.Evaluate(&Input{RequestMetadata: xksapi.RequestMetadata{AWSPrincipalARN: s}})
	if d.Rule == "t" && !d.Allowed {
		t.Fatalf("%s with principal %q: %s", expr, s, d.Reason)
	}
	return d.Allowed
}

// globReference is Glob written as the textbook dynamic programme over
// characters, to check the backtracking version against.
func globReference(s, pattern string) bool {
	sr := []rune(s)
	// m[j] reports whether pattern[:i] matches s[:j] for the current i.
	m := make([]bool, len(sr)+1)
	m[0] = true
	for _, p := range pattern {
		next := make([]bool, len(sr)+1)
		for j := range next {
			switch {
			case p == '*':
				next[j] = m[j] || (j > 0 && next[j-1])
			case j == 0:
			case p == '?' || p == sr[j-1]:
				next[j] = m[j-1]
			}
		}
		m = next
	}
	return m[len(sr)]
}

// globRegexp is Glob translated to a regular expression, a second reference.
func globRegexp(pattern string) *regexp.Regexp {
	var b strings.Builder
	b.WriteString(`(?s)\A`)
	for _, r := range pattern {
		switch r {
		case '*':
			b.WriteString(`.*`)
		case '?':
			b.WriteString(`.`)
		default:
			b.WriteString(regexp.QuoteMeta(string(r)))
		}
	}
	b.WriteString(`\z`)
	return regexp.MustCompile(b.String())
}

func FuzzGlob(f *testing.F) {
	f.Add("arn:aws:iam::111122223333:role/a", "arn:aws:iam::111122223333:*")
	f.Add("arn:aws:sts::111122223333:assumed-role/Admin/s", "arn:*:sts::*:assumed-role/*/*")
	f.Add("aXbXbc", "a*bc")
	f.Add("", "")
	f.Add("", "*")
	f.Add("a", "?")
	f.Add("é", "?")
	f.Add("a.+()[]{}|^$\\", "a.+()[]{}|^$\\")
	f.Add("abc", ".+")
	f.Add("\xff\xfe", "?\xfe")
	f.Add(strings.Repeat("a", 64), strings.Repeat("*a", 16)+"b")
	f.Fuzz(func(t *testing.T, s, pattern string) {
		got := Glob(s, pattern)
		if !utf8.ValidString(s) || !utf8.ValidString(pattern) {
			// The references see invalid bytes as U+FFFD; Glob compares
			// them as bytes. Only require that it did not panic.
			return
		}
		if want := globReference(s, pattern); got != want {
			t.Fatalf("Glob(%q, %q) = %v, reference says %v", s, pattern, got, want)
		}
		if want := globRegexp(pattern).MatchString(s); got != want {
			t.Fatalf("Glob(%q, %q) = %v, regexp says %v", s, pattern, got, want)
		}
	})
}

// FuzzParseARN holds parseARN to the AWS SDK's ARN parser.
func FuzzParseARN(f *testing.F) {
	for _, s := range []string{
		"arn:aws:iam::111122223333:role/a", "arn:aws:logs:us-east-1:111122223333:log-group:/x:*",
		"arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/k", "arn:::::", "arn:aws:iam::1",
		"ec2.amazonaws.com", "AWS Internal", "", "arn:", "ARN:aws:iam::1:r",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, ok := parseARN(s)
		want, err := arn.Parse(s)
		if ok != (err == nil) {
			t.Fatalf("parseARN(%q) ok = %v, arn.Parse error = %v", s, ok, err)
		}
		if ok && got != (arnFields{want.Partition, want.Service, want.Region, want.AccountID, want.Resource}) {
			t.Fatalf("parseARN(%q) = %+v, arn.Parse = %+v", s, got, want)
		}
	})
}
