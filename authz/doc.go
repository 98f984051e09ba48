// Package authz is the proxy's secondary authorization: a second layer of
// access control, after AWS KMS's own key policies and after SigV4 (or after
// mutual TLS, for Azure Managed HSM's EKM calls), that lets a key store
// decide which callers may use its external keys and how.
//
// The XKS specification makes this optional but recommends it (it SHOULD be
// possible to make an external key usable only by specific AWS callers), and
// leaves the policy language to the proxy. Here a policy is a list of named
// rules, each a CEL (Common Expression Language, https://cel.dev) expression
// that yields a bool:
//
//	[
//	  {"name": "no-ebs-encrypt", "effect": "deny",
//	   "expression": "operation == \"Encrypt\" && via_service == \"ebs\""},
//	  {"name": "app-roles", "effect": "allow",
//	   "expression": "account_in(principal, [\"111122223333\"]) && arn_resource(principal).startsWith(\"role/app\")"},
//	  {"name": "key-admins", "effect": "allow",
//	   "expression": "principal.glob(\"arn:aws:sts::111122223333:assumed-role/KeyAdmin/*\") && operation == \"GetKeyMetadata\""}
//	]
//
// The request metadata a rule reads (principal, kms_operation, key_arn,
// ...) is part of the body KMS signs, so anyone who holds the key store's
// SigV4 secret can write any value into it: rules on those fields constrain
// KMS, not a holder of the secret. operation, key_store, key_id and
// access_key_id come from the request itself.
//
// Compile checks a policy once, when the configuration is loaded; Evaluate
// runs it for each GetKeyMetadata, Encrypt and Decrypt request. GetHealthStatus
// is never subject to policy. A denied request is answered with
// AccessDeniedException, and the Decision names the rule responsible so that
// the log can tell the customer which statement to fix.
//
// # Semantics
//
//  1. The deny rules run in the order given; the first that yields true
//     denies the request.
//  2. If the policy has allow rules, they run in the order given and the first
//     that yields true allows the request; if none does, the request is
//     denied ("no allow rule matched"). A policy of deny rules only allows
//     whatever they do not deny.
//  3. A policy without rules allows every request.
//
// Authorization fails closed: a rule that fails at run time, of either
// effect, denies the request, and the reason names the rule and the error.
// Typical failures are a conversion that does not apply (int(principal)), a
// missing map key (metadata.kmsViaService when KMS did not send it) and a
// rule exceeding its cost limit. Evaluation stops at the first rule that
// decides, so rules after it neither match nor fail.
//
// Policies see requests as KMS sends them and judge nothing else: a
// kmsOperation that the specification does not list is not an error, and a
// policy may allow it or deny it like any other.
//
// # Variables
//
// Every variable is a string, empty when the request did not carry it.
//
//	operation      the XKS operation: "GetKeyMetadata", "Encrypt" or "Decrypt"
//	key_store      the key store's URI path prefix, e.g. "/kms/xks/v1"
//	key_id         the externalKeyId in the request path
//	access_key_id  the SigV4 access key id that signed the request
//	principal      requestMetadata.awsPrincipalArn: the KMS caller's ARN, a
//	               service principal such as "ec2.amazonaws.com", or "AWS Internal"
//	kms_operation  requestMetadata.kmsOperation, e.g. "GenerateDataKey", "CreateKey"
//	key_arn        requestMetadata.kmsKeyArn (Encrypt and Decrypt)
//	via_service    requestMetadata.kmsViaService, e.g. "ebs"
//	source_vpc     requestMetadata.awsSourceVpc
//	source_vpce    requestMetadata.awsSourceVpce
//	request_id     requestMetadata.kmsRequestId
//
// metadata is a map(string, string) of the same requestMetadata fields under
// the names KMS uses (awsPrincipalArn, kmsOperation, kmsKeyArn,
// kmsViaService, awsSourceVpc, awsSourceVpce, kmsRequestId). It holds only
// the fields that are not empty, so has(metadata.awsSourceVpce) asks whether
// the request came through a VPC endpoint, and reading an absent field is a
// run-time error that denies.
//
// # Azure Managed HSM EKM
//
// The same rules, with the same semantics and functions, authorize the calls
// of the Azure EKM front end (CompileEKM, EKMInput), over this API's fields;
// info is never subject to policy:
//
//	operation       the EKM operation: "metadata", "wrapkey" or "unwrapkey"
//	key_store       the key store's path prefix, e.g. "/contoso/prod"
//	key_id          the key name (external key id) in the request path
//	alg             the wrap algorithm: "A256KW", "A256KWP", "RSA-OAEP" or
//	                "RSA-OAEP-256" ("" for metadata)
//	client          the subject common name of the client certificate
//	request_id      request_context.request_id
//	correlation_id  request_context.correlation_id
//	pool_name       request_context.pool_name
//
// For example, only RSA-OAEP-256 for the pool "contoso":
//
//	allow  pool_name == "contoso" && (operation == "metadata" || alg == "RSA-OAEP-256")
//
// # Functions
//
// Besides CEL's standard functions (startsWith, endsWith, contains, matches,
// size, in, ...) and macros (all, exists, ...), rules may use:
//
//	glob(s, pattern) bool   s.glob(pattern) bool
//	    Whether s matches pattern, where '*' stands for any run of characters,
//	    none and ':' and '/' included, and '?' for exactly one character. All
//	    other characters stand for themselves; there is no escape character.
//	    glob(principal, "arn:aws:iam::111122223333:*")
//
//	arn_partition(s) string   arn_service(s) string   arn_region(s) string
//	arn_account(s) string     arn_resource(s) string
//	    A section of the ARN arn:partition:service:region:account:resource
//	    (the resource keeps any further colons), or "" when s is not an ARN,
//	    so that service principals need no special case.
//	    arn_account(key_arn) == arn_account(principal)
//	    arn_partition(key_arn) == "aws-us-gov"
//
//	account_in(s, list(string)) bool
//	    Whether the ARN s names one of the accounts listed; false for
//	    anything that is not an ARN with an account.
//	    account_in(principal, ["111122223333", "444455556666"])
//
// # Examples
//
// Only roles of one account, and only through EBS:
//
//	allow  arn_account(principal) == "111122223333" && via_service == "ebs"
//
// Keys of this store serve only KMS keys in the account and region they were
// created for:
//
//	allow  key_arn.glob("arn:aws:kms:eu-west-1:111122223333:key/*") || operation == "GetKeyMetadata"
//
// Creating KMS keys over this store is reserved to the key administrators:
//
//	deny   kms_operation == "CreateKey" && !principal.glob("arn:aws:sts::111122223333:assumed-role/KeyAdmin/*")
//
// Refuse KMS operations that did not exist when the policy was written:
//
//	deny   !(kms_operation in ["Encrypt", "ReEncrypt", "GenerateDataKey",
//	         "GenerateDataKeyWithoutPlaintext", "Decrypt", "CreateKey", "DescribeKey"])
//
// # Cost
//
// Programs are compiled once and evaluated without building a map per
// request; a realistic policy takes about a microsecond per request. CEL has
// no loops other than its comprehension macros, so a rule without them does
// a bounded amount of work. A rule with them runs under a cost limit, and a
// rule that exceeds it fails and so denies.
package authz
