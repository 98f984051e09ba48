package xkscmd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-xks/caddy-xks/xksapi"
)

// xksClient calls a running proxy as KMS does: POST, JSON, SigV4 with the
// service kms-xks-proxy, over TLS verified against the system roots (or a
// CA given for local use).
type xksClient struct {
	base       string // https://host[:port]<uri path>, without a trailing slash
	region     string
	credential aws.Credentials
	http       *http.Client
	signer     *v4.Signer
	now        func() time.Time

	// protocols counts the answers by HTTP version; copies of a client
	// (check's variations of one) count into the same one.
	protocols *protocolCount
}

// protocolCount counts answers by HTTP version, as the proxy chose it.
type protocolCount struct {
	mu sync.Mutex
	n  map[string]int
}

// add counts an answer; a client made without a count (in tests) counts
// nothing.
func (p *protocolCount) add(proto string) {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.n[proto]++
	p.mu.Unlock()
}

// String names the HTTP versions the proxy answered with, and how often
// when it used more than one.
func (p *protocolCount) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch len(p.n) {
	case 0:
		return "none (no answer)"
	case 1:
		for proto := range p.n {
			return proto
		}
	}
	parts := make([]string, 0, len(p.n))
	for proto, n := range p.n {
		parts = append(parts, fmt.Sprintf("%s (%d)", proto, n))
	}
	slices.Sort(parts)
	return strings.Join(parts, ", ")
}

// clientFromFlags builds a client from --proxy-config (the console file,
// which names the key store path and a credential) or from
// --access-key-id and --secret-file; --cacert trusts a local CA. With
// --proxy-config, a target without a path gets the file's key store path.
func clientFromFlags(fl caddycmd.Flags, target string, concurrency int) (*xksClient, error) {
	c := &xksClient{region: fl.String("region"), signer: v4.NewSigner(), now: time.Now, protocols: &protocolCount{n: make(map[string]int)}}
	base := strings.TrimSuffix(target, "/")
	if file := fl.String("proxy-config"); file != "" {
		raw, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		var pc consoleProxyConfig
		if err := json.Unmarshal(raw, &pc); err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		c.credential = aws.Credentials{AccessKeyID: pc.XksProxyAuthenticationCredential.AccessKeyID, SecretAccessKey: pc.XksProxyAuthenticationCredential.RawSecretAccessKey}
		// A URL without a path means the file's key store; a URL with one
		// is taken as given (a key store path, or a --raw route).
		if u, err := url.Parse(base); err == nil && u.Path == "" {
			base += pc.XksProxyURIPath
		}
	} else {
		secret, err := os.ReadFile(fl.String("secret-file"))
		if err != nil {
			return nil, fmt.Errorf("reading the secret access key (--secret-file or --proxy-config): %w", err)
		}
		c.credential = aws.Credentials{AccessKeyID: fl.String("access-key-id"), SecretAccessKey: strings.TrimSpace(string(secret))}
	}
	if c.credential.AccessKeyID == "" {
		return nil, fmt.Errorf("no credential: give --proxy-config, or --access-key-id and --secret-file")
	}
	c.base = base
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12}
	if file := fl.String("cacert"); file != "" {
		pem, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", file)
		}
		tlsConfig.RootCAs = pool
	}
	// A proxy that requires mTLS (as KMS's own client certificate does it)
	// is checked with a client certificate of the operator's.
	if certFile, keyFile := fl.String("client-cert"), fl.String("client-key"); certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("loading the client certificate (--client-cert and --client-key): %w", err)
		}
		tlsConfig.Certificates = []tls.Certificate{cert}
	}
	transport := &http.Transport{
		TLSClientConfig:     tlsConfig,
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: concurrency,
		IdleConnTimeout:     90 * time.Second,
	}
	if fl.Bool("http1") {
		// A client that does not offer h2 gets HTTP/1.1 from any proxy,
		// as the spec requires the proxy to fall back to; each request in
		// flight then has a keep-alive connection of its own.
		tlsConfig.NextProtos = []string{"http/1.1"}
		transport.ForceAttemptHTTP2 = false
		transport.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	c.http = &http.Client{Timeout: 5 * time.Second, Transport: transport}
	return c, nil
}

// result is one answer: its status, body and how long it took.
type result struct {
	status  int
	body    []byte
	latency time.Duration
}

// errorBody is the XKS error body of a failed answer; its fields are
// empty when the body is not one.
func (r result) errorBody() xksapi.ErrorBody {
	var e xksapi.ErrorBody
	_ = json.Unmarshal(r.body, &e)
	return e
}

// errorName is the XKS errorName of a failed answer, or the HTTP status of
// one without.
func (r result) errorName() string {
	if name := r.errorBody().ErrorName; name != "" {
		return name
	}
	return fmt.Sprintf("HTTP %d", r.status)
}

// call signs and sends one request to base+path (path may be empty).
func (c *xksClient) call(ctx context.Context, method, path string, body []byte, tweak func(*http.Request)) (result, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, bytes.NewReader(body))
	if err != nil {
		return result{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	sum := sha256.Sum256(body)
	if err := c.signer.SignHTTP(ctx, c.credential, req, hex.EncodeToString(sum[:]), "kms-xks-proxy", c.region, c.now()); err != nil {
		return result{}, err
	}
	if tweak != nil {
		tweak(req)
	}
	start := time.Now()
	resp, err := c.http.Do(req)
	if err != nil {
		return result{}, err
	}
	defer resp.Body.Close()
	c.protocols.add(resp.Proto)
	out, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return result{}, err
	}
	return result{status: resp.StatusCode, body: out, latency: time.Since(start)}, nil
}

// decryptRequestFor is the Decrypt request of an Encrypt answer.
func decryptRequestFor(meta xksapi.RequestMetadata, sealed xksapi.EncryptResponse, aad []byte) xksapi.DecryptRequest {
	return xksapi.DecryptRequest{
		RequestMetadata:      meta,
		Ciphertext:           sealed.Ciphertext,
		CiphertextMetadata:   sealed.CiphertextMetadata,
		InitializationVector: sealed.InitializationVector,
		AuthenticationTag:    sealed.AuthenticationTag,
		Algorithm:            "AES_GCM",
		AAD:                  aad,
	}
}

// mustJSON encodes a request body; the request types hold only strings
// and bytes, which always encode.
func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}
