package authz

import (
	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/common/types/ref"
)

// EKMInput is what a rule can see of one Azure Managed HSM EKM request:
// where it went, the client certificate it came with, and the
// request_context that Managed HSM sent with it. A field that the request
// did not carry is empty.
type EKMInput struct {
	// Operation is the EKM operation: "metadata", "wrapkey" or "unwrapkey".
	// info is never authorized by policy.
	Operation string
	// KeyStore is the key store's path prefix.
	KeyStore string
	// KeyName is the key name (the external key id) from the request path.
	KeyName string
	// Alg is the wrap algorithm of wrapkey and unwrapkey.
	Alg string
	// Client is the subject common name of the client certificate.
	Client string
	// RequestID, CorrelationID and PoolName are the request_context's
	// request_id, correlation_id and pool_name.
	RequestID, CorrelationID, PoolName string
}

// ekmVariables are the names a rule over an EKM request may use.
var ekmVariables = []variable[EKMInput]{
	{"operation", cel.StringType, func(in *EKMInput) ref.Val { return types.String(in.Operation) }},
	{"key_store", cel.StringType, func(in *EKMInput) ref.Val { return types.String(in.KeyStore) }},
	{"key_id", cel.StringType, func(in *EKMInput) ref.Val { return types.String(in.KeyName) }},
	{"alg", cel.StringType, func(in *EKMInput) ref.Val { return types.String(in.Alg) }},
	{"client", cel.StringType, func(in *EKMInput) ref.Val { return types.String(in.Client) }},
	{"request_id", cel.StringType, func(in *EKMInput) ref.Val { return types.String(in.RequestID) }},
	{"correlation_id", cel.StringType, func(in *EKMInput) ref.Val { return types.String(in.CorrelationID) }},
	{"pool_name", cel.StringType, func(in *EKMInput) ref.Val { return types.String(in.PoolName) }},
}

// ekm is the vocabulary of EKM requests.
var ekm = newVocabulary(ekmVariables)
