// Package tlscheck holds the TLS rules of the XKS proxy specification that
// Caddy does not enforce by itself.
//
// # Mutual TLS
//
// If an XKS proxy supports mutual TLS, it must let the customer configure
// both the root CA and the subject name of the client certificate, and end
// the handshake for any other. Caddy's client_auth checks the chain (mode
// require_and_verify with a trust_pool holding the Amazon Trust Services
// roots); the tls.client_auth.verifier.xks_subject module in this package
// checks the name, which AWS KMS sends as the subject CN
// cks.kms.<region>.amazonaws.com:
//
//	xks.example.com {
//		tls {
//			client_auth {
//				mode require_and_verify
//				trust_pool file /etc/caddy/amazon-trust-services.pem
//				verifier xks_subject cks.kms.us-east-1.amazonaws.com
//			}
//		}
//		...
//	}
//
// In JSON, inside a TLS connection policy's client_authentication:
//
//	"verifiers": [{"verifier": "xks_subject", "common_names": ["cks.kms.us-east-1.amazonaws.com"]}]
//
// The verifier refuses every client whose chain Caddy did not verify, so a
// client_auth mode that skips verification (request, require) turns mTLS
// into "no client gets in" rather than "any certificate with the right
// name gets in".
package tlscheck
