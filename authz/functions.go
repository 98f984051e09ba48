package authz

import (
	"strings"
	"unicode/utf8"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/common/types/ref"
	"cel.dev/cel-go/common/types/traits"
)

// Glob reports whether s matches pattern, in which '*' stands for any run of
// characters (none included, ':' and '/' included) and '?' for exactly one
// character. Every other character, '\' and the regular-expression
// metacharacters among them, stands for itself, so an ARN pasted into a
// pattern means what it says.
//
// Matching takes O(len(s)·len(pattern)) time at worst and allocates nothing.
func Glob(s, pattern string) bool {
	// Greedy matching with backtracking to the most recent '*' only: a later
	// '*' can absorb whatever an earlier one would have, so retrying the
	// earlier ones never finds a match the latest one misses.
	var si, pi int
	starPi, starSi := -1, 0
	for si < len(s) {
		if pi < len(pattern) {
			switch pattern[pi] {
			case '*':
				starPi, starSi = pi, si
				pi++
				continue
			case '?':
				_, n := utf8.DecodeRuneInString(s[si:])
				si += n
				pi++
				continue
			default:
				if s[si] == pattern[pi] {
					si++
					pi++
					continue
				}
			}
		}
		if starPi < 0 {
			return false
		}
		// Let the last '*' take one more character and retry after it.
		_, n := utf8.DecodeRuneInString(s[starSi:])
		starSi += n
		si, pi = starSi, starPi+1
	}
	for pi < len(pattern) && pattern[pi] == '*' {
		pi++
	}
	return pi == len(pattern)
}

// arnFields are the sections of an ARN after "arn:".
type arnFields struct {
	partition, service, region, account, resource string
}

// parseARN splits s the way the AWS SDK's arn.Parse does, as
// arn:partition:service:region:account:resource where the resource may
// contain more colons, without allocating. It reports false when s is not an
// ARN: a service principal such as "ec2.amazonaws.com", "AWS Internal", "".
func parseARN(s string) (arnFields, bool) {
	rest, ok := strings.CutPrefix(s, "arn:")
	if !ok {
		return arnFields{}, false
	}
	var f arnFields
	for _, field := range []*string{&f.partition, &f.service, &f.region, &f.account} {
		*field, rest, ok = strings.Cut(rest, ":")
		if !ok {
			return arnFields{}, false
		}
	}
	f.resource = rest
	return f, true
}

// arnField is the CEL binding of one arn_* helper.
func arnField(field func(arnFields) string) func(ref.Val) ref.Val {
	return func(v ref.Val) ref.Val {
		s, ok := v.(types.String)
		if !ok {
			return types.MaybeNoSuchOverloadErr(v)
		}
		a, ok := parseARN(string(s))
		if !ok {
			return types.String("")
		}
		return types.String(field(a))
	}
}

func globBinding(s, pattern ref.Val) ref.Val {
	sv, ok := s.(types.String)
	if !ok {
		return types.MaybeNoSuchOverloadErr(s)
	}
	pv, ok := pattern.(types.String)
	if !ok {
		return types.MaybeNoSuchOverloadErr(pattern)
	}
	return types.Bool(Glob(string(sv), string(pv)))
}

func accountInBinding(s, accounts ref.Val) ref.Val {
	sv, ok := s.(types.String)
	if !ok {
		return types.MaybeNoSuchOverloadErr(s)
	}
	list, ok := accounts.(traits.Lister)
	if !ok {
		return types.MaybeNoSuchOverloadErr(accounts)
	}
	a, ok := parseARN(string(sv))
	if !ok || a.account == "" {
		return types.False
	}
	n, ok := list.Size().(types.Int)
	if !ok {
		return types.MaybeNoSuchOverloadErr(accounts)
	}
	// Get rather than Iterator: an iterator is allocated per call.
	for i := range n {
		elem := list.Get(i)
		account, ok := elem.(types.String)
		if !ok {
			return types.MaybeNoSuchOverloadErr(elem)
		}
		if string(account) == a.account {
			return types.True
		}
	}
	return types.False
}

// helperFunctions declares the policy helpers described in the package
// documentation.
func helperFunctions() []cel.EnvOption {
	fields := []struct {
		name  string
		field func(arnFields) string
	}{
		{"arn_partition", func(a arnFields) string { return a.partition }},
		{"arn_service", func(a arnFields) string { return a.service }},
		{"arn_region", func(a arnFields) string { return a.region }},
		{"arn_account", func(a arnFields) string { return a.account }},
		{"arn_resource", func(a arnFields) string { return a.resource }},
	}
	opts := make([]cel.EnvOption, 0, 2+len(fields))
	opts = append(opts,
		cel.Function("glob",
			cel.Overload("glob_string_string",
				[]*cel.Type{cel.StringType, cel.StringType}, cel.BoolType,
				cel.BinaryBinding(globBinding)),
			cel.MemberOverload("string_glob_string",
				[]*cel.Type{cel.StringType, cel.StringType}, cel.BoolType,
				cel.BinaryBinding(globBinding))),
		cel.Function("account_in",
			cel.Overload("account_in_string_list_string",
				[]*cel.Type{cel.StringType, cel.ListType(cel.StringType)}, cel.BoolType,
				cel.BinaryBinding(accountInBinding))),
	)
	for _, f := range fields {
		opts = append(opts, cel.Function(f.name,
			cel.Overload(f.name+"_string",
				[]*cel.Type{cel.StringType}, cel.StringType,
				cel.UnaryBinding(arnField(f.field)))))
	}
	return opts
}
