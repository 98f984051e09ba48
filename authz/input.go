package authz

import (
	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/common/types/ref"
	"cel.dev/cel-go/interpreter"
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

	// The requestMetadata fields, named after their JSON keys.
	AWSPrincipalARN string
	KMSOperation    string
	KMSKeyARN       string
	KMSViaService   string
	AWSSourceVPC    string
	AWSSourceVPCE   string
	KMSRequestID    string
}

// Indexes of the CEL variables in activation.values.
const (
	varOperation = iota
	varKeyStore
	varKeyID
	varAccessKeyID
	varPrincipal
	varKMSOperation
	varKeyARN
	varViaService
	varSourceVPC
	varSourceVPCE
	varRequestID
	varMetadata
	varCount
)

// variables declares every name a rule may use. Each must have a case in
// activation.ResolveName.
var variables = []cel.EnvOption{
	cel.Variable("operation", cel.StringType),
	cel.Variable("key_store", cel.StringType),
	cel.Variable("key_id", cel.StringType),
	cel.Variable("access_key_id", cel.StringType),
	cel.Variable("principal", cel.StringType),
	cel.Variable("kms_operation", cel.StringType),
	cel.Variable("key_arn", cel.StringType),
	cel.Variable("via_service", cel.StringType),
	cel.Variable("source_vpc", cel.StringType),
	cel.Variable("source_vpce", cel.StringType),
	cel.Variable("request_id", cel.StringType),
	cel.Variable("metadata", cel.MapType(cel.StringType, cel.StringType)),
}

// activation hands the fields of one Input to the rules of a policy. It is
// built once per Evaluate and shared by every rule, and it converts each field
// to a CEL value only when a rule first reads it, so a request costs no map
// and no conversion of fields that no rule looks at.
type activation struct {
	in     *Input
	values [varCount]ref.Val
}

var _ interpreter.Activation = (*activation)(nil)

// ResolveName implements interpreter.Activation.
func (a *activation) ResolveName(name string) (any, bool) {
	i := varIndex(name)
	if i < 0 {
		return nil, false
	}
	if a.values[i] == nil {
		a.values[i] = a.value(i)
	}
	return a.values[i], true
}

// Parent implements interpreter.Activation.
func (a *activation) Parent() interpreter.Activation { return nil }

func varIndex(name string) int {
	switch name {
	case "operation":
		return varOperation
	case "key_store":
		return varKeyStore
	case "key_id":
		return varKeyID
	case "access_key_id":
		return varAccessKeyID
	case "principal":
		return varPrincipal
	case "kms_operation":
		return varKMSOperation
	case "key_arn":
		return varKeyARN
	case "via_service":
		return varViaService
	case "source_vpc":
		return varSourceVPC
	case "source_vpce":
		return varSourceVPCE
	case "request_id":
		return varRequestID
	case "metadata":
		return varMetadata
	}
	return -1
}

func (a *activation) value(i int) ref.Val {
	in := a.in
	switch i {
	case varOperation:
		return types.String(in.Operation)
	case varKeyStore:
		return types.String(in.KeyStore)
	case varKeyID:
		return types.String(in.ExternalKeyID)
	case varAccessKeyID:
		return types.String(in.AccessKeyID)
	case varPrincipal:
		return types.String(in.AWSPrincipalARN)
	case varKMSOperation:
		return types.String(in.KMSOperation)
	case varKeyARN:
		return types.String(in.KMSKeyARN)
	case varViaService:
		return types.String(in.KMSViaService)
	case varSourceVPC:
		return types.String(in.AWSSourceVPC)
	case varSourceVPCE:
		return types.String(in.AWSSourceVPCE)
	case varRequestID:
		return types.String(in.KMSRequestID)
	default: // varMetadata
		return metadataMap(in)
	}
}

// metadataMap is the requestMetadata under the keys KMS uses. Empty fields,
// which are the fields the request did not carry, are left out, so that
// has(metadata.kmsViaService) asks whether KMS sent the field.
func metadataMap(in *Input) ref.Val {
	m := make(map[string]string, 7)
	for _, f := range [...]struct{ key, value string }{
		{"awsPrincipalArn", in.AWSPrincipalARN},
		{"kmsOperation", in.KMSOperation},
		{"kmsKeyArn", in.KMSKeyARN},
		{"kmsViaService", in.KMSViaService},
		{"awsSourceVpc", in.AWSSourceVPC},
		{"awsSourceVpce", in.AWSSourceVPCE},
		{"kmsRequestId", in.KMSRequestID},
	} {
		if f.value != "" {
			m[f.key] = f.value
		}
	}
	return types.NewStringStringMap(types.DefaultTypeAdapter, m)
}
