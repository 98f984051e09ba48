package tlscheck

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
)

func init() {
	caddy.RegisterModule(new(SubjectVerifier))
}

// SubjectVerifier is a TLS client-certificate verifier that accepts a client
// only if the leaf of its verified certificate chain has a subject common
// name (CN) that is one of CommonNames. It implements the XKS rule that a
// proxy doing mutual TLS must let the customer configure the client
// certificate's subject name and terminate the handshake for any other:
// AWS KMS presents CN=cks.kms.<region>.amazonaws.com.
//
// It checks the name only. The chain to the configured root CA is Caddy's
// job (client_auth mode require_and_verify with a trust_pool); without a
// verified chain this verifier refuses every client.
//
// Subject alternative names are ignored: the XKS specification names the
// subject CN, and a certificate whose SAN matches but whose CN does not is
// refused. Names compare without regard to ASCII case, as DNS names do.
type SubjectVerifier struct {
	// CommonNames are the subject common names accepted, compared exactly
	// (ignoring ASCII case), for example "cks.kms.us-east-1.amazonaws.com".
	// Wildcards are not supported. At least one is required; there is no
	// default.
	CommonNames []string `json:"common_names,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*SubjectVerifier) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "tls.client_auth.verifier.xks_subject",
		New: func() caddy.Module { return new(SubjectVerifier) },
	}
}

// Validate checks that at least one name is configured and that none could
// be mistaken for a pattern. Caddy runs it when it loads the module.
func (v *SubjectVerifier) Validate() error {
	if len(v.CommonNames) == 0 {
		return errors.New("xks_subject: at least one common name is required, e.g. cks.kms.us-east-1.amazonaws.com")
	}
	for _, name := range v.CommonNames {
		if name == "" || strings.ContainsAny(name, "*?[] \t") {
			return fmt.Errorf("xks_subject: common name %q: names are matched exactly; wildcards and spaces are not allowed", name)
		}
	}
	return nil
}

// VerifyClientCertificate accepts the client only if Caddy verified its
// certificate chain and the leaf's subject CN is one of v.CommonNames.
func (v *SubjectVerifier) VerifyClientCertificate(rawCerts [][]byte, verifiedChains [][]*x509.Certificate) error {
	if len(verifiedChains) == 0 || len(verifiedChains[0]) == 0 {
		// Fail closed: a name is only worth checking on a certificate whose
		// chain to the configured CA was verified.
		return errors.New("xks_subject: client certificate chain was not verified; configure client_auth with mode require_and_verify and a trust_pool")
	}
	leaf := verifiedChains[0][0]
	if len(rawCerts) == 0 || !bytes.Equal(rawCerts[0], leaf.Raw) {
		return errors.New("xks_subject: verified chain does not start with the presented client certificate")
	}
	cn := leaf.Subject.CommonName
	for _, name := range v.CommonNames {
		if strings.EqualFold(cn, name) {
			return nil
		}
	}
	if cn == "" {
		return errors.New("xks_subject: client certificate has no subject common name")
	}
	return fmt.Errorf("xks_subject: client certificate subject common name %q is not accepted", cn)
}

// UnmarshalCaddyfile sets up the verifier from Caddyfile tokens. Syntax,
// inside a tls directive's client_auth block:
//
//	verifier xks_subject <common_name>... {
//		common_name <common_name>...
//	}
//
// For example:
//
//	client_auth {
//		mode require_and_verify
//		trust_pool file /etc/caddy/amazon-trust-services.pem
//		verifier xks_subject cks.kms.us-east-1.amazonaws.com
//	}
func (v *SubjectVerifier) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module name
	v.CommonNames = append(v.CommonNames, d.RemainingArgs()...)
	for d.NextBlock(0) {
		switch d.Val() {
		case "common_name":
			names := d.RemainingArgs()
			if len(names) == 0 {
				return d.ArgErr()
			}
			v.CommonNames = append(v.CommonNames, names...)
		default:
			return d.Errf("unknown xks_subject option %q", d.Val())
		}
	}
	if len(v.CommonNames) == 0 {
		return d.Err("xks_subject needs at least one common name")
	}
	return nil
}

// Interface guards
var (
	_ caddy.Module                       = (*SubjectVerifier)(nil)
	_ caddy.Validator                    = (*SubjectVerifier)(nil)
	_ caddytls.ClientCertificateVerifier = (*SubjectVerifier)(nil)
	_ caddyfile.Unmarshaler              = (*SubjectVerifier)(nil)
)
