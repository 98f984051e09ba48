package authz

import (
	"errors"
	"fmt"

	"cel.dev/cel-go/cel"
	celast "cel.dev/cel-go/common/ast"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/interpreter"
)

// Rule is one named policy rule.
type Rule struct {
	// Name identifies the rule in configuration errors and in the Decision,
	// and so in the log line of every request the rule denies. It must be
	// unique within the policy and not empty.
	Name string `json:"name"`
	// Effect is "allow" or "deny".
	Effect string `json:"effect"`
	// Expression is a CEL expression that yields a bool; see the package
	// documentation for the variables and functions it may use.
	Expression string `json:"expression"`
}

// The rule effects.
const (
	EffectAllow = "allow"
	EffectDeny  = "deny"
)

// Decision is the outcome of evaluating a policy for one request.
type Decision struct {
	// Allowed reports whether the request may proceed.
	Allowed bool
	// Rule names the rule that decided: the deny rule that matched, the rule
	// that failed, or the allow rule that matched. It is empty when no rule
	// matched.
	Rule string
	// Reason says why, for the log.
	Reason string
}

// costLimit caps the work a rule with comprehensions may do for one request,
// in CEL's cost units (about one per operation). Realistic rules cost well
// under a hundred; the limit only stops nested comprehensions that would
// otherwise hold a request for seconds.
const costLimit = 100_000

// Policy is a compiled list of rules over the requests of one API, whose
// inputs are T (Input for XKS, EKMInput for Azure EKM). It is safe for
// concurrent use.
type Policy[T any] struct {
	voc         *vocabulary[T]
	deny, allow []*rule
}

type rule struct {
	name    string
	program cel.Program
	// matched is the Decision.Reason when the rule yields true, prepared at
	// compile time so that evaluation formats nothing.
	matched string
}

// Compile checks and compiles rules over XKS requests, in the order given,
// into a Policy. Every error names the offending rule (by its position when
// it has no name).
func Compile(rules []Rule) (*Policy[Input], error) { return compile(xks, rules) }

// CompileEKM is Compile for rules over Azure EKM requests.
func CompileEKM(rules []Rule) (*Policy[EKMInput], error) { return compile(ekm, rules) }

func compile[T any](voc *vocabulary[T], rules []Rule) (*Policy[T], error) {
	e, err := voc.env()
	if err != nil {
		return nil, fmt.Errorf("building the policy environment: %w", err)
	}
	p := &Policy[T]{voc: voc}
	seen := make(map[string]int, len(rules))
	var errs []error
	for i, r := range rules {
		if r.Name == "" {
			errs = append(errs, fmt.Errorf("rule %d: empty name", i+1))
			continue
		}
		if j, dup := seen[r.Name]; dup {
			errs = append(errs, fmt.Errorf("rule %q: name used again (rules %d and %d)", r.Name, j+1, i+1))
			continue
		}
		seen[r.Name] = i
		compiled, err := compileRule(e, r)
		if err != nil {
			errs = append(errs, fmt.Errorf("rule %q: %w", r.Name, err))
			continue
		}
		if r.Effect == EffectDeny {
			p.deny = append(p.deny, compiled)
		} else {
			p.allow = append(p.allow, compiled)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return p, nil
}

func compileRule(e *cel.Env, r Rule) (*rule, error) {
	var matched string
	switch r.Effect {
	case EffectAllow:
		matched = fmt.Sprintf("allowed by rule %q", r.Name)
	case EffectDeny:
		matched = fmt.Sprintf("denied by rule %q", r.Name)
	default:
		return nil, fmt.Errorf("effect %q is neither %q nor %q", r.Effect, EffectAllow, EffectDeny)
	}
	if r.Expression == "" {
		return nil, errors.New("empty expression")
	}
	ast, iss := e.Compile(r.Expression)
	if err := iss.Err(); err != nil {
		return nil, fmt.Errorf("compiling expression: %w", err)
	}
	if t := ast.OutputType(); !t.IsExactType(types.BoolType) {
		return nil, fmt.Errorf("expression yields %s, not bool", t)
	}
	opts := []cel.ProgramOption{cel.EvalOptions(cel.OptOptimize)}
	if loops(ast) {
		opts = append(opts, cel.CostLimit(costLimit))
	}
	program, err := e.Program(ast, opts...)
	if err != nil {
		return nil, fmt.Errorf("planning expression: %w", err)
	}
	return &rule{name: r.Name, program: program, matched: matched}, nil
}

// loops reports whether the expression iterates. CEL has no other loops, no
// recursion and no user-defined functions, so an expression without a
// comprehension (all, exists, exists_one, map, filter) evaluates each of its
// nodes at most once and needs no cost limit. Tracking the cost would
// triple the time a simple rule takes.
func loops(a *cel.Ast) bool {
	root := celast.NavigateAST(a.NativeRep())
	return len(celast.MatchDescendants(root, celast.KindMatcher(celast.ComprehensionKind))) > 0
}

// eval runs the rule; err is set when the rule failed rather than yielded
// a bool.
func (r *rule) eval(a interpreter.Activation) (bool, error) {
	out, _, err := r.program.Eval(a)
	if err != nil {
		return false, err
	}
	b, ok := out.(types.Bool)
	if !ok {
		return false, fmt.Errorf("expression yielded %s, not bool", out.Type())
	}
	return bool(b), nil
}

// Evaluate decides whether the request described by in is allowed:
//
//  1. The deny rules run in order; the first that yields true denies.
//  2. If there are allow rules, they run in order and the first that yields
//     true allows; when none does, the request is denied.
//  3. A policy without rules (including a nil *Policy) allows everything.
//
// A rule that fails at run time denies the request, whatever its effect:
// authorization fails closed. Evaluation stops at the first rule that
// decides, so a rule after it can neither match nor fail.
//
// Evaluate never panics. A nil in is denied by any policy that has rules.
func (p *Policy[T]) Evaluate(in *T) (d Decision) {
	if p == nil || len(p.deny)+len(p.allow) == 0 {
		return Decision{Allowed: true, Reason: "no rules"}
	}
	if in == nil {
		return Decision{Reason: "no request to authorize"}
	}
	// cel-go recovers panics inside its own evaluation; this catches any
	// left in the code around it.
	defer func() {
		if v := recover(); v != nil {
			d = Decision{Reason: fmt.Sprintf("policy evaluation panicked: %v", v)}
		}
	}()
	a := &activation[T]{voc: p.voc, in: in}
	for _, r := range p.deny {
		match, err := r.eval(a)
		if err != nil {
			return failed(r, err)
		}
		if match {
			return Decision{Rule: r.name, Reason: r.matched}
		}
	}
	if len(p.allow) == 0 {
		return Decision{Allowed: true, Reason: "no deny rule matched"}
	}
	for _, r := range p.allow {
		match, err := r.eval(a)
		if err != nil {
			return failed(r, err)
		}
		if match {
			return Decision{Allowed: true, Rule: r.name, Reason: r.matched}
		}
	}
	return Decision{Reason: "no allow rule matched"}
}

func failed(r *rule, err error) Decision {
	return Decision{Rule: r.name, Reason: fmt.Sprintf("rule %q failed: %v", r.name, err)}
}
