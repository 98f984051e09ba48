// Package tlscheck holds the TLS rules of the XKS proxy specification that
// Caddy does not enforce by itself: the subject name of AWS KMS's client
// certificate for mutual TLS, and what KMS demands of the proxy's server
// certificate.
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
// name gets in". It reads the CN only, not the subject alternative names,
// because that is the name the specification gives.
//
// # The server certificate
//
// KMS accepts an XKS proxy's server certificate only if its chain ends in
// a root it trusts, its subject common name (CN) is the proxy's hostname or
// a wildcard for it (the subject alternative names alone are not enough),
// and it is not expired. CheckChain checks a chain against these rules and
// says what to change; Preflight runs it on every chain Caddy serves for
// the proxy's hostnames, when the configuration starts and after each
// renewal, and logs a warning for each problem.
//
// Two lists of the roots KMS trusts exist, and neither is authoritative for
// what KMS trusts today: the specification's TrustedCertificateAuthorities
// (a November 2022 snapshot, 130 roots; see KMSTrustedRoots) and the one its
// repository's pull request 22 proposes (June 2024, "based on latest
// keystore", 145 roots). Both are carried here (kmsroots.txt), with the
// certificates of the roots that Mozilla's store, as Debian's
// ca-certificates ships it, still or already holds (kmsroots.pem): the path
// from a served chain to its root is built against those, never against
// the host's CA bundle, so the verdict is the same on every image. A chain
// that ends in a root on both lists is accepted; on the 2022 list only, it
// is accepted today but the root is being removed (rule
// root_being_removed: renew to another root); on the 2024 list only, it is
// likely accepted (rule root_unconfirmed: confirm with KMS's connection
// test); on neither, KMS refuses it (rule trusted_root). A full chain whose
// root is unknown is that root's problem (trusted_root), not the chain's;
// a chain served without its intermediates is the chain's (rule chain).
// tools/genroots writes both files.
//
// What that means for the certificate issuers Caddy uses, by their default
// chains:
//
//   - Let's Encrypt, RSA key (key_type rsa2048 or rsa4096): the leaf is
//     issued by an RSA intermediate (R10 to R14) signed by ISRG Root X1,
//     which is listed. Accepted.
//   - Let's Encrypt, ECDSA key (Caddy's default, p256): the ECDSA
//     intermediates (E5 to E9) exist twice, issued by ISRG Root X2 and
//     cross-signed by ISRG Root X1. Since June 2024 the default chain uses
//     the one from ISRG Root X1, which is on both lists. The alternate chain
//     ends in ISRG Root X2, which only the 2024 list names: likely accepted,
//     not certain. Caddy picks the alternate chain with preferred_chains
//     { root_common_name "ISRG Root X2" } and, since the X2 chain is the
//     smaller one, with preferred_chains smallest; set preferred_chains
//     { root_common_name "ISRG Root X1" } (as Caddyfile.example does), or
//     use an RSA key.
//   - Let's Encrypt profiles: the default classic profile puts the first
//     name in the CN. The tlsserver and shortlived profiles issue
//     certificates without a CN, which KMS refuses; do not select them
//     (issuer acme { profile ... }).
//   - Let's Encrypt's newer roots, generated in 2025 (subject O=ISRG, for
//     example CN=Root YE), are on neither list. A renewal whose chain moves
//     to them is reported by the preflight.
//   - ZeroSSL (Caddy's second default issuer when an email is set): its
//     chains have ended in USERTrust RSA Certification Authority or USERTrust
//     ECC Certification Authority (Sectigo), both listed.
//   - Google Trust Services (ACME with external account binding): GTS Root
//     R1 to R4 are listed (the 2022 list names their first certificates,
//     the 2024 list the ones Mozilla's store holds now), and so is
//     GlobalSign Root CA, which has cross-signed GTS roots.
//   - Amazon Trust Services (Amazon Root CA 1 to 4, Starfield), DigiCert,
//     GlobalSign, Entrust and most other public CAs are listed; a
//     certificate from them is loaded with tls <cert_file> <key_file>.
//   - Caddy's internal CA (tls internal, local_certs) is never accepted: its
//     root is private and its leaves have no CN.
//
// The CN holds at most 64 characters, so a proxy hostname longer than that
// can only be matched by a wildcard CN. A wildcard CN matches one label
// (*.xks.example.com covers proxy.xks.example.com, not
// a.proxy.xks.example.com); KMS's XksProxyCertificateDaysToExpire metric is
// empty for a wildcard CN.
//
// The lists can be out of date in both directions: KMS's real trust store
// may have gained roots since 2024, or dropped some. A chain the preflight
// flags may therefore still work, and the connection test in the KMS
// console is the final word. The roots of the lists whose certificates
// Debian 12's ca-certificates (20230311) does not hold are named in
// kmsroots.txt without one in kmsroots.pem; a chain under such a root is
// reported as root_unconfirmed.
package tlscheck
