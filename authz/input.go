package authz

import (
	"sync"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/common/types/ref"
	"cel.dev/cel-go/interpreter"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// Input is what a rule can see of one XKS request: where it went, who signed
// it and the requestMetadata that AWS KMS sent with it. A field that the
// request did not carry is empty.
type Input struct {
	// Operation is the XKS operation: "GetKeyMetadata", "Encrypt" or
	// "Decrypt". GetHealthStatus is never authorized by policy.
	Operation string
	// KeyStore is the key store's URI path prefix.
	KeyStore string
	// ExternalKeyID is the externalKeyId from the request path.
	ExternalKeyID string
	// AccessKeyID is the SigV4 access key id that signed the request.
	AccessKeyID string

	// RequestMetadata is the request's requestMetadata as KMS sent it.
	xksapi.RequestMetadata
}

// xksVariables are the names a rule over an XKS request may use, each
// with its value for an Input.
var xksVariables = []variable[Input]{
	{"operation", cel.StringType, func(in *Input) ref.Val { return types.String(in.Operation) }},
	{"key_store", cel.StringType, func(in *Input) ref.Val { return types.String(in.KeyStore) }},
	{"key_id", cel.StringType, func(in *Input) ref.Val { return types.String(in.ExternalKeyID) }},
	{"access_key_id", cel.StringType, func(in *Input) ref.Val { return types.String(in.AccessKeyID) }},
	{"principal", cel.StringType, func(in *Input) ref.Val { return types.String(in.AWSPrincipalARN) }},
	{"kms_operation", cel.StringType, func(in *Input) ref.Val { return types.String(in.KMSOperation) }},
	{"key_arn", cel.StringType, func(in *Input) ref.Val { return types.String(in.KMSKeyARN) }},
	{"via_service", cel.StringType, func(in *Input) ref.Val { return types.String(in.KMSViaService) }},
	{"source_vpc", cel.StringType, func(in *Input) ref.Val { return types.String(in.AWSSourceVPC) }},
	{"source_vpce", cel.StringType, func(in *Input) ref.Val { return types.String(in.AWSSourceVPCE) }},
	{"request_id", cel.StringType, func(in *Input) ref.Val { return types.String(in.KMSRequestID) }},
	{"metadata", cel.MapType(cel.StringType, cel.StringType), metadataMap},
}

// xks is the vocabulary of XKS requests.
var xks = newVocabulary(xksVariables)

// variable is one name a rule may use, with its value for an input.
type variable[T any] struct {
	name  string
	typ   *cel.Type
	value func(*T) ref.Val
}

// maxVariables bounds a vocabulary, so that an activation holds its values
// in an array rather than a slice of its own.
const maxVariables = 16

// vocabulary is the variables of one API's requests and the CEL
// environment that declares them with the helper functions. Building the
// environment is costly and it is safe for concurrent use, so all policies
// of an API share one.
type vocabulary[T any] struct {
	vars []variable[T]
	env  func() (*cel.Env, error)
}

func newVocabulary[T any](vars []variable[T]) *vocabulary[T] {
	if len(vars) > maxVariables {
		panic("authz: too many variables")
	}
	v := &vocabulary[T]{vars: vars}
	v.env = sync.OnceValues(func() (*cel.Env, error) {
		opts := make([]cel.EnvOption, 0, len(vars))
		for _, x := range vars {
			opts = append(opts, cel.Variable(x.name, x.typ))
		}
		return cel.NewEnv(append(opts, helperFunctions()...)...)
	})
	return v
}

// index finds a variable by name, or returns -1. A scan of a dozen names
// is faster than a map: most differ in length or first byte.
func (v *vocabulary[T]) index(name string) int {
	for i := range v.vars {
		if v.vars[i].name == name {
			return i
		}
	}
	return -1
}

// activation hands the fields of one input to the rules of a policy. It is
// built once per Evaluate and shared by every rule, and it converts each field
// to a CEL value only when a rule first reads it, so a request costs no map
// and no conversion of fields that no rule looks at.
type activation[T any] struct {
	voc    *vocabulary[T]
	in     *T
	values [maxVariables]ref.Val
}

// ResolveName implements interpreter.Activation.
func (a *activation[T]) ResolveName(name string) (any, bool) {
	i := a.voc.index(name)
	if i < 0 {
		return nil, false
	}
	if a.values[i] == nil {
		a.values[i] = a.voc.vars[i].value(a.in)
	}
	return a.values[i], true
}

// Parent implements interpreter.Activation.
func (a *activation[T]) Parent() interpreter.Activation { return nil }

// metadataMap is the requestMetadata under the keys KMS uses. Empty fields,
// which are the fields the request did not carry, are left out, so that
// has(metadata.kmsViaService) asks whether KMS sent the field.
func metadataMap(in *Input) ref.Val {
	fields := in.RequestMetadata.Fields()
	m := make(map[string]string, len(fields))
	for _, f := range fields {
		if f.Value != "" {
			m[f.Key] = f.Value
		}
	}
	return types.NewStringStringMap(types.DefaultTypeAdapter, m)
}

// Interface guards
var _ interpreter.Activation = (*activation[Input])(nil)
