package sigv4auth

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"
)

// DefaultService is the SigV4 service name AWS KMS signs XKS requests for.
const DefaultService = "kms-xks-proxy"

// DefaultMaxSkew is how far a request time may lie from the proxy's clock,
// in either direction, as the XKS specification recommends.
const DefaultMaxSkew = 5 * time.Minute

// MaxAllowedSkew bounds MaxSkew: a signed request can be replayed for as
// long as its time is accepted, and AWS's own services accept 15 minutes.
const MaxAllowedSkew = 15 * time.Minute

// Config configures a Verifier.
type Config struct {
	// Region is the AWS region in the credential scope, the region of the KMS
	// key store that calls the proxy. It is required.
	Region string
	// Service is the service name in the credential scope. Default:
	// "kms-xks-proxy".
	Service string
	// Credentials are the access key id and secret pairs accepted at once;
	// more than one lets a customer rotate them without downtime. At least
	// one is required and access key ids must be unique.
	Credentials []Credential
	// MaxSkew is how far the request time may lie before or after the
	// proxy's clock, at most MaxAllowedSkew. Default: 5 minutes.
	MaxSkew time.Duration
	// Now returns the proxy's clock. Default: time.Now.
	Now func() time.Time
}

// Verifier checks SigV4 signatures on XKS requests. It is safe for
// concurrent use; its configuration is fixed once created, so a
// configuration reload builds a new Verifier.
type Verifier struct {
	region      string
	service     string
	maxSkew     time.Duration
	now         func() time.Time
	credentials map[string]*credentialState
}

// NewVerifier validates cfg, fills in its defaults and returns a Verifier.
// Errors name an offending credential by its access key id, never by its
// secret.
func NewVerifier(cfg Config) (*Verifier, error) {
	if cfg.Service == "" {
		cfg.Service = DefaultService
	}
	if cfg.MaxSkew == 0 {
		cfg.MaxSkew = DefaultMaxSkew
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if err := checkScopeField("region", cfg.Region); err != nil {
		return nil, err
	}
	if err := checkScopeField("service", cfg.Service); err != nil {
		return nil, err
	}
	if cfg.MaxSkew < 0 {
		return nil, fmt.Errorf("max skew must not be negative, got %s", cfg.MaxSkew)
	}
	if cfg.MaxSkew > MaxAllowedSkew {
		return nil, fmt.Errorf("max skew %s is over %s: a captured request could be replayed for that long", cfg.MaxSkew, MaxAllowedSkew)
	}
	if len(cfg.Credentials) == 0 {
		return nil, errors.New("at least one credential is required")
	}
	v := &Verifier{
		region:      cfg.Region,
		service:     cfg.Service,
		maxSkew:     cfg.MaxSkew,
		now:         cfg.Now,
		credentials: make(map[string]*credentialState, len(cfg.Credentials)),
	}
	for i, c := range cfg.Credentials {
		if err := ValidateCredential(c); err != nil {
			return nil, fmt.Errorf("credential %d: %w", i, err)
		}
		if _, dup := v.credentials[c.AccessKeyID]; dup {
			return nil, fmt.Errorf("credential %d: access key id %q is configured more than once", i, c.AccessKeyID)
		}
		v.credentials[c.AccessKeyID] = &credentialState{accessKeyID: c.AccessKeyID, secret: c.SecretAccessKey}
	}
	return v, nil
}

// checkScopeField rejects a region or service that could never match a
// credential scope.
func checkScopeField(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s is required", what)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == '/' || c <= ' ' || c >= 0x7f {
			return fmt.Errorf("%s %q must not contain '/', spaces or control characters", what, s)
		}
	}
	return nil
}

// scratch is the per-request working memory, pooled so that a verification
// does not allocate.
type scratch struct {
	canonical []byte // canonical request, then string to sign
	mac       []byte // HMAC input
}

var scratchPool = sync.Pool{New: func() any {
	return &scratch{canonical: make([]byte, 0, 1024), mac: make([]byte, 0, 512)}
}}

// maxPooledScratch keeps one request with huge headers from pinning memory.
const maxPooledScratch = 16 << 10

// Verify checks the SigV4 signature of one request and returns the access
// key id it was signed with. rawPath is the path exactly as on the request
// line (before '?') and rawQuery what follows '?'. host is the Host header
// or HTTP/2 :authority as received. header holds all other headers as
// net/http presents them (http.Header has no Host). body is the complete
// request body.
//
// Every failure is an *Error; the caller answers the client with
// AuthenticationFailedException whatever its Reason.
func (v *Verifier) Verify(method, rawPath, rawQuery, host string, header http.Header, body []byte) (accessKeyID string, err error) {
	query := ""
	if rawQuery != "" {
		var reason Reason
		var detail string
		query, reason, detail = canonicalQuery(rawQuery)
		if reason != "" {
			return "", failure(reason, "", detail)
		}
	}

	authValues := headerValues(header, "authorization")
	switch {
	case len(authValues) == 0:
		return "", failure(ReasonMissingAuthorization, "", "no Authorization header")
	case len(authValues) > 1:
		return "", failure(ReasonDuplicateAuthorization, "", fmt.Sprintf("%d Authorization headers", len(authValues)))
	}
	auth, credential, reason, detail := parseAuthorization(authValues[0])
	if reason != "" {
		return "", failure(reason, "", detail)
	}

	cred, ok := v.credentials[auth.accessKeyID]
	if !ok {
		return "", failure(ReasonUnknownAccessKeyID, "", describeUnknownAccessKeyID(auth.accessKeyID))
	}
	id := cred.accessKeyID
	if auth.region != v.region {
		return "", failure(ReasonScopeMismatch, id, "region "+quoteForLog(auth.region)+" is not "+quoteForLog(v.region))
	}
	if auth.service != v.service {
		return "", failure(ReasonScopeMismatch, id, "service "+quoteForLog(auth.service)+" is not "+quoteForLog(v.service))
	}

	if !hasSignedHeader(auth.signedHeaders, "host") {
		return "", failure(ReasonMissingSignedHeader, id, "host is not signed")
	}
	requestTime, requestDateTime, err := v.requestTime(&auth, header, id)
	if err != nil {
		return "", err
	}
	if requestDateTime[:8] != auth.date {
		return "", failure(ReasonScopeMismatch, id, "credential date "+auth.date+" is not the request date "+requestDateTime[:8])
	}
	if skew := requestTime.Sub(v.now()); skew > v.maxSkew || skew < -v.maxSkew {
		return "", failure(ReasonClockSkew, id, fmt.Sprintf("request time %s is %s from the proxy clock, more than %s",
			requestDateTime, skew.Round(time.Second), v.maxSkew))
	}

	bodyHash := sha256.Sum256(body)
	var payloadHash [2 * sha256.Size]byte
	hex.Encode(payloadHash[:], bodyHash[:])
	if claimed := headerValues(header, "x-amz-content-sha256"); len(claimed) != 0 {
		if len(claimed) != 1 || claimed[0] != string(payloadHash[:]) {
			return "", failure(ReasonPayloadHashMismatch, id, "X-Amz-Content-Sha256 is not the SHA-256 of the body")
		}
	}

	s := scratchPool.Get().(*scratch)
	defer func() {
		if cap(s.canonical) <= maxPooledScratch && cap(s.mac) <= maxPooledScratch {
			scratchPool.Put(s)
		}
	}()

	key := cred.signingKeyFor(auth.date, v.region, v.service)
	req := signedRequest{
		accessKeyID: id,
		auth:        auth,
		credential:  credential,
		dateTime:    requestDateTime,
		method:      method,
		path:        canonicalPath(rawPath),
		query:       query,
		host:        host,
		header:      header,
		payloadHash: payloadHash,
	}
	if !needsPathEscape(req.path) {
		// XKS paths: the received and the escaped form are the same.
		err = checkSignature(s, key, &req, false)
	} else {
		// Signers disagree on paths with other bytes: curl signs the path as
		// sent, the AWS SDKs escape it once more. Either proves the secret.
		err = checkSignature(s, key, &req, false)
		if err == nil {
			return id, nil
		}
		err = checkSignature(s, key, &req, true)
	}
	if err != nil {
		return "", err
	}
	return id, nil
}

// canonicalPath returns the path SigV4 signs for an empty one.
func canonicalPath(rawPath string) string {
	if rawPath == "" {
		return "/"
	}
	return rawPath
}

// requestTime finds the request time in X-Amz-Date or, failing that, Date,
// requires it to be signed and returns it with its ISO 8601 basic form for
// the string to sign.
func (v *Verifier) requestTime(auth *authorization, header http.Header, id string) (time.Time, string, error) {
	name := "x-amz-date"
	values := headerValues(header, name)
	if len(values) == 0 {
		if dates := headerValues(header, "date"); len(dates) != 0 {
			name, values = "date", dates
		}
	}
	if len(values) == 0 {
		return time.Time{}, "", failure(ReasonMissingSignedHeader, id, "no X-Amz-Date or Date header")
	}
	if !hasSignedHeader(auth.signedHeaders, name) {
		return time.Time{}, "", failure(ReasonMissingSignedHeader, id, name+" is not signed")
	}
	if len(values) != 1 {
		return time.Time{}, "", failure(ReasonMalformedDate, id, "more than one "+name+" header")
	}
	if name == "x-amz-date" {
		t, ok := parseAmzDate(values[0])
		if !ok {
			return time.Time{}, "", failure(ReasonMalformedDate, id, "X-Amz-Date "+quoteForLog(values[0])+" is not yyyymmddThhmmssZ")
		}
		return t, values[0], nil
	}
	t, ok := parseDateHeader(values[0])
	if !ok {
		return time.Time{}, "", failure(ReasonMalformedDate, id, "Date "+quoteForLog(values[0])+" is not a date")
	}
	return t, t.Format(amzDateLayout), nil
}

// signedRequest is what a signature covers, as Verify has parsed it from
// the request. It holds values, not pointers to Verify's variables, so that
// they stay on the stack.
type signedRequest struct {
	accessKeyID string // the credential's, for errors
	auth        authorization
	credential  string // the Authorization header's Credential value
	dateTime    string // the request time, yyyymmddThhmmssZ
	method      string
	path        string // canonicalPath of the raw path
	query       string // canonical
	host        string
	header      http.Header
	payloadHash [2 * sha256.Size]byte // hex SHA-256 of the body
}

// checkSignature builds the canonical request and the string to sign of req
// straight into scratch buffers, signs it with key and compares the result
// with the request's signature in constant time. escapePath escapes the
// path once more, as the AWS SDKs sign it.
func checkSignature(s *scratch, key *signingKey, req *signedRequest, escapePath bool) error {
	auth, id := &req.auth, req.accessKeyID
	cr := s.canonical[:0]
	cr = append(cr, req.method...)
	cr = append(cr, '\n')
	if escapePath {
		cr = appendEscapedPath(cr, req.path)
	} else {
		cr = append(cr, req.path...)
	}
	cr = append(cr, '\n')
	cr = append(cr, req.query...)
	cr = append(cr, '\n')
	for rest := auth.signedHeaders; ; {
		name, more, found := strings.Cut(rest, ";")
		cr = append(cr, name...)
		cr = append(cr, ':')
		if name == "host" {
			if req.host == "" {
				return failure(ReasonMissingSignedHeader, id, "host is signed but the request has none")
			}
			cr = appendCanonicalValue(cr, req.host)
		} else {
			values := headerValues(req.header, name)
			if len(values) == 0 {
				return failure(ReasonMissingSignedHeader, id, "signed header "+quoteForLog(name)+" is absent from the request")
			}
			for i, val := range values {
				if i > 0 {
					cr = append(cr, ',')
				}
				cr = appendCanonicalValue(cr, val)
			}
		}
		cr = append(cr, '\n')
		if !found {
			break
		}
		rest = more
	}
	cr = append(cr, '\n')
	cr = append(cr, auth.signedHeaders...)
	cr = append(cr, '\n')
	cr = append(cr, req.payloadHash[:]...)
	crHash := sha256.Sum256(cr)

	sts := cr[:0]
	sts = append(sts, algorithm...)
	sts = append(sts, '\n')
	sts = append(sts, req.dateTime...)
	sts = append(sts, '\n')
	sts = append(sts, auth.scope(req.credential)...)
	sts = append(sts, '\n')
	sts = hex.AppendEncode(sts, crHash[:])
	s.canonical = sts

	var sig [sha256.Size]byte
	sig, s.mac = key.sign(sts, s.mac)
	if !hmac.Equal(sig[:], auth.signature[:]) {
		return failure(ReasonSignatureMismatch, id, "the signature does not match the request")
	}
	return nil
}

// describeUnknownAccessKeyID names a client-supplied access key id in the log
// only if it has the syntax of one, so that a secret sent in its place by a
// misconfigured client is not written out.
func describeUnknownAccessKeyID(id string) string {
	if isAccessKeyIDSyntax(id) {
		return "access key id " + id + " is not configured"
	}
	return fmt.Sprintf("the request's access key id (%d characters) is not a valid access key id", len(id))
}

// RawPath is the path of r's request target exactly as it was on the
// request line, before '?': nothing is cleaned or decoded. It is the path a
// SigV4 signer signed, and a server that routes on the path must route on
// this one and hand the same string to VerifyHTTP, so that the route and the
// signature cannot see two different paths. For an absolute-form target
// (RFC 9112 section 3.2.2), and for a request built in-process rather than
// read from the wire, it is r.URL's escaped path.
func RawPath(r *http.Request) string {
	target := r.RequestURI
	if !strings.HasPrefix(target, "/") { // absolute-form or empty
		return r.URL.EscapedPath()
	}
	path, _, _ := strings.Cut(target, "?")
	return path
}

// VerifyHTTP verifies a request received by a net/http server. rawPath is
// RawPath(r), as the server routed on it. The query comes from the raw
// request target too (r.RequestURI), and the host from r.Host. body is the
// complete request body, already read by the caller. The request must be
// the one received, before any rewrite.
func (v *Verifier) VerifyHTTP(r *http.Request, rawPath string, body []byte) (accessKeyID string, err error) {
	var rawQuery string
	if r.RequestURI != "" {
		_, rawQuery, _ = strings.Cut(r.RequestURI, "?")
	} else {
		// A request built in-process rather than read from the wire.
		rawQuery = r.URL.RawQuery
	}
	host := r.Host
	if host == "" && r.URL != nil {
		host = r.URL.Host
	}
	return v.Verify(r.Method, rawPath, rawQuery, host, r.Header, body)
}
