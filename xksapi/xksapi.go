// Package xksapi holds the wire format of the AWS KMS XKS Proxy API v1: the
// JSON bodies of GetKeyMetadata, Encrypt, Decrypt and GetHealthStatus, and
// of errors, with the spec's error names and their statuses (errors.go),
// and the spec's limits on their fields (limits.go). Field names are the
// spec's. []byte fields are standard, padded Base64 on the wire,
// which is what encoding/json writes and reads.
//
// The proxy's handler answers with these types and the `caddy xks` client
// commands send and read them, so both speak one format, and the tests
// hold both to it. The package
// imports nothing of the project, so that every part of it, the HSM layer
// included, can use it.
package xksapi

// RequestMetadata is the KMS context sent with every call. Which fields are
// present depends on the operation; the proxy treats their content as
// opaque.
type RequestMetadata struct {
	AWSPrincipalARN string `json:"awsPrincipalArn,omitempty"`
	AWSSourceVPC    string `json:"awsSourceVpc,omitempty"`
	AWSSourceVPCE   string `json:"awsSourceVpce,omitempty"`
	KMSKeyARN       string `json:"kmsKeyArn,omitempty"`
	KMSOperation    string `json:"kmsOperation"`
	KMSRequestID    string `json:"kmsRequestId"`
	KMSViaService   string `json:"kmsViaService,omitempty"`
}

// MetadataField is one field of a RequestMetadata: its JSON key and value.
type MetadataField struct {
	Key, Value string
}

// Fields returns every field of m under its JSON key, empty ones included:
// kmsRequestId and kmsOperation, which every call carries, first. It is for
// code that handles the fields alike (the audit line, policies' metadata
// map) and must not spell them out again.
func (m *RequestMetadata) Fields() [7]MetadataField {
	return [...]MetadataField{
		{"kmsRequestId", m.KMSRequestID},
		{"kmsOperation", m.KMSOperation},
		{"awsPrincipalArn", m.AWSPrincipalARN},
		{"kmsKeyArn", m.KMSKeyARN},
		{"kmsViaService", m.KMSViaService},
		{"awsSourceVpc", m.AWSSourceVPC},
		{"awsSourceVpce", m.AWSSourceVPCE},
	}
}

// MetadataOnlyRequest is the body of GetKeyMetadata and GetHealthStatus.
type MetadataOnlyRequest struct {
	RequestMetadata RequestMetadata `json:"requestMetadata"`
}

// EncryptRequest is the body of Encrypt.
type EncryptRequest struct {
	RequestMetadata RequestMetadata `json:"requestMetadata"`
	Plaintext       []byte          `json:"plaintext"`
	Algorithm       string          `json:"encryptionAlgorithm"`
	AAD             []byte          `json:"additionalAuthenticatedData,omitempty"`
	CDIVAlgorithm   string          `json:"ciphertextDataIntegrityValueAlgorithm,omitempty"`
}

// DecryptRequest is the body of Decrypt.
type DecryptRequest struct {
	RequestMetadata      RequestMetadata `json:"requestMetadata"`
	Ciphertext           []byte          `json:"ciphertext"`
	CiphertextMetadata   []byte          `json:"ciphertextMetadata,omitempty"`
	InitializationVector []byte          `json:"initializationVector"`
	AuthenticationTag    []byte          `json:"authenticationTag"`
	Algorithm            string          `json:"encryptionAlgorithm"`
	AAD                  []byte          `json:"additionalAuthenticatedData,omitempty"`
}

// MetadataResponse answers GetKeyMetadata.
type MetadataResponse struct {
	KeySpec   string   `json:"keySpec"`
	KeyUsage  []string `json:"keyUsage"`
	KeyStatus string   `json:"keyStatus"`
}

// EncryptResponse answers Encrypt.
type EncryptResponse struct {
	Ciphertext                   []byte `json:"ciphertext"`
	CiphertextMetadata           []byte `json:"ciphertextMetadata,omitempty"`
	InitializationVector         []byte `json:"initializationVector"`
	AuthenticationTag            []byte `json:"authenticationTag"`
	CiphertextDataIntegrityValue []byte `json:"ciphertextDataIntegrityValue,omitempty"`
}

// DecryptResponse answers Decrypt.
type DecryptResponse struct {
	Plaintext []byte `json:"plaintext"`
}

// HealthResponse answers GetHealthStatus.
type HealthResponse struct {
	XKSProxyFleetSize int              `json:"xksProxyFleetSize"`
	XKSProxyVendor    string           `json:"xksProxyVendor"`
	XKSProxyModel     string           `json:"xksProxyModel"`
	EKMVendor         string           `json:"ekmVendor"`
	EKMFleetDetails   []EKMFleetDetail `json:"ekmFleetDetails"`
}

// EKMFleetDetail is one HSM in a HealthResponse.
type EKMFleetDetail struct {
	ID           string `json:"id"`
	Model        string `json:"model"`
	HealthStatus string `json:"healthStatus"`
}

// ErrorBody is the body of every failed call.
type ErrorBody struct {
	ErrorName    string `json:"errorName"`
	ErrorMessage string `json:"errorMessage,omitempty"`
}
