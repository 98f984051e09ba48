package xkshandler

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/authz"
	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
	"github.com/caddy-xks/caddy-xks/tlscheck"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// defaultMaxRequestBody bounds what is read before authentication. The
// largest legitimate body (a 4300-byte ciphertext plus an 8192-byte AAD, in
// Base64, with metadata and long ARNs) is under 24 KiB.
const defaultMaxRequestBody = 64 << 10

// Handler serves the XKS Proxy API v1 for one or more external key stores.
// It answers every request it is given: a path that is not an XKS API path
// of a configured key store gets 404 InvalidUriPathException.
type Handler struct {
	// KeyStores are the external key stores served, each under its own
	// URI path with its own credentials, backends and keys. At least one.
	KeyStores []*KeyStore `json:"key_stores,omitempty"`

	// MaxRequestBody is the largest request body accepted, in bytes; a
	// larger one gets UnsupportedOperationException without being
	// authenticated. Default: 65536.
	MaxRequestBody int64 `json:"max_request_body,omitempty"`

	// MaxConcurrentStreams is how many requests each HTTP/2 connection of
	// the server may have open at once (HTTP/2's
	// SETTINGS_MAX_CONCURRENT_STREAMS), for every site of the server; with
	// several xks handlers on one server, the smallest value applies. A
	// request's body is read before its signature is checked, so this
	// bounds what one connection can make the proxy hold without any
	// credential. Default: 32.
	MaxConcurrentStreams int `json:"max_concurrent_streams,omitempty"`

	// ReadyPath is a path answered without authentication, for load
	// balancers: 200 when every key store has an HSM backend that is not
	// UNAVAILABLE, Caddy holds a certificate for every name the config
	// serves key stores on over TLS (and every name in Hostnames), and the
	// server is not shutting down (from the moment a stop begins, for all
	// of the http app's shutdown_delay); 503 otherwise, with no detail
	// either way. It never depends on the storage: an outage of the
	// storage a fleet shares must not take every instance out at once. It
	// must lie outside the key stores' URI paths. A handler that a route
	// limits to this path serves no key store, so it may sit on a
	// plain-HTTP site. Default: none.
	ReadyPath string `json:"ready_path,omitempty"`

	// Hostnames are the names KMS connects to, whose server certificate is
	// checked against what KMS accepts (trusted root, subject CN) at start
	// and after each renewal. Names seen in requests' TLS server name are
	// checked too, so this is only needed to check before KMS first
	// connects. Default: none.
	Hostnames []string `json:"hostnames,omitempty"`

	// UsageFlushInterval is how often each instance writes its count of
	// Encrypts per key version to Caddy's storage, where the fleet's counts
	// add up (see KeyStore.EncryptLimit). A crash loses at most one
	// interval's count, which the next start counts as used. Default: 10s.
	UsageFlushInterval caddy.Duration `json:"usage_flush_interval,omitempty"`

	stores map[string]*KeyStore // by URI path
	// provisioned are the key stores whose provisioning began: Cleanup
	// gives back their usage counters.
	provisioned []*KeyStore
	logger      *zap.Logger
	audit       *zap.Logger
	preflight   *tlscheck.Watcher
	// certNames are the names ready needs a certificate for.
	certNames []string
	// usageStorage is the usageStores key this handler holds, if any.
	usageStorage json.RawMessage
	holdsStorage bool
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.xks",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets defaults, resolves secrets, looks up the HSM backends and
// builds each key store's verifier. Caddy calls Validate after it.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.audit = h.logger.Named("audit")
	if h.MaxRequestBody == 0 {
		h.MaxRequestBody = defaultMaxRequestBody
	}
	if h.MaxConcurrentStreams == 0 {
		h.MaxConcurrentStreams = frontend.DefaultMaxConcurrentStreams
	}
	frontend.ProvisionServer(ctx, h.MaxConcurrentStreams, "XKS", "KMS", h.logger)
	appIface, err := ctx.AppIfConfigured("hsm")
	if err != nil {
		return fmt.Errorf("the xks handler needs HSM backends (the hsm app): %w", err)
	}
	app := appIface.(*hsm.App)
	sites := configSites(ctx)
	plain := plainHTTPServers(sites)
	h.certNames = certificateNames(sites)
	for _, name := range h.Hostnames {
		if name = strings.ToLower(name); !slices.Contains(h.certNames, name) {
			h.certNames = append(h.certNames, name)
		}
	}
	for _, ks := range h.KeyStores {
		if listen, ok := plain[CompleteURIPath(ks.URIPath)]; ok && !ks.AllowPlainHTTP {
			return fmt.Errorf("xks: key store %s is served on a site without TLS (listen %v): KMS always calls over TLS; "+
				"serve it on an https site, or set allow_plain_http behind a TLS-terminating load balancer", ks.URIPath, listen)
		}
	}
	usage := usageSettings{storage: ctx.Storage(), instance: instanceID(h.logger), interval: time.Duration(h.UsageFlushInterval)}
	if raw, ok := closingStorage(usage.storage); ok {
		// The usage counters outlive the config, whose storage module
		// is cleaned up with it: they write through an instance of
		// their own (usageStores), which the handler holds open too.
		if usage.storage, err = acquireUsageStore(raw); err != nil {
			return fmt.Errorf("xks: %w", err)
		}
		usage.storageConfig = raw
		h.usageStorage, h.holdsStorage = raw, true
	}
	if usage.interval <= 0 {
		usage.interval = defaultUsageFlushInterval
	}
	h.stores = make(map[string]*KeyStore, len(h.KeyStores))
	for _, ks := range h.KeyStores {
		h.provisioned = append(h.provisioned, ks)
		if err := ks.provision(app, h.logger, usage); err != nil {
			return err
		}
		h.stores[ks.URIPath] = ks
	}
	liveStores.add(h.KeyStores)
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("xks: registering metrics: %w", err)
	}
	h.preflight, err = tlscheck.Preflight(ctx, h.Hostnames, h.logger.Named("certificate"), func(r tlscheck.Report) {
		if len(r.Chain) == 0 {
			return // no certificate is served for the name
		}
		metrics.certExpiry.WithLabelValues(r.Hostname).Set(float64(r.NotAfter.Unix()))
		metrics.certDays.set(r.Hostname, r.NotAfter)
	})
	if err != nil {
		return fmt.Errorf("xks: %w", err)
	}
	return nil
}

// Cleanup gives back the key stores' usage counters: the last config to use
// a counter writes its final count.
func (h *Handler) Cleanup() error {
	liveStores.remove(h.provisioned)
	for _, ks := range h.provisioned {
		ks.cleanup()
	}
	if h.holdsStorage {
		releaseUsageStore(h.usageStorage)
	}
	return nil
}

// Validate checks the configuration without side effects. Caddy calls it
// once the handler is provisioned.
func (h *Handler) Validate() error {
	if len(h.KeyStores) == 0 {
		return errors.New("xks: at least one key store is required")
	}
	seen := make(map[string]bool, len(h.KeyStores))
	for _, ks := range h.KeyStores {
		if err := ks.validate(); err != nil {
			return fmt.Errorf("xks: %w", err)
		}
		if seen[ks.URIPath] {
			return fmt.Errorf("xks: key store %s is configured twice", ks.URIPath)
		}
		seen[ks.URIPath] = true
	}
	if h.MaxRequestBody < 0 {
		return errors.New("xks: max_request_body must be positive")
	}
	if h.MaxConcurrentStreams < 0 {
		return errors.New("xks: max_concurrent_streams must be positive")
	}
	if h.ReadyPath != "" {
		if !strings.HasPrefix(h.ReadyPath, "/") || strings.Contains(h.ReadyPath, APIPathSuffix+"/") {
			return fmt.Errorf("xks: ready_path %q must be a path outside the XKS API", h.ReadyPath)
		}
	}
	return nil
}

// ServeHTTP answers one XKS API call. Protocol errors are written here as
// XKS JSON; a Go error returned to Caddy would produce an empty body that
// KMS cannot interpret.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	x := exchange{start: time.Now()}
	path := sigv4auth.RawPath(r)
	if h.ReadyPath != "" && path == h.ReadyPath {
		h.ready(w, r)
		return nil
	}
	h.serve(&x, r, path)
	// Step 7: the answer, the audit line and the metrics.
	frontend.AskToLeave(w, r)
	h.respond(w, &x)
	x.elapsed = time.Since(x.start)
	x.log(h.audit)
	x.observe()
	return nil
}

// ready answers a load balancer's probe: can this instance serve every key
// store? Health results are cached by the backends and certificates by
// Caddy, so probes cost no HSM or storage work.
func (h *Handler) ready(w http.ResponseWriter, r *http.Request) {
	status := http.StatusOK
	if frontend.ShuttingDown(r) || !h.holdsCertificates() || !h.backendsUp(r.Context()) {
		status = http.StatusServiceUnavailable
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = io.WriteString(w, http.StatusText(status)+"\n")
	}
}

// backendsUp reports whether every key store has an HSM backend that is
// not UNAVAILABLE.
func (h *Handler) backendsUp(ctx context.Context) bool {
	for _, ks := range h.KeyStores {
		if !slices.ContainsFunc(ks.backends, func(b *hsm.Backend) bool { return b.Health(ctx).Status != hsm.HealthUnavailable }) {
			return false
		}
	}
	return true
}

// holdsCertificates reports whether Caddy's certificate cache holds a
// certificate for each name the instance serves key stores on over TLS.
// The cache is filled from storage (or by an ACME order) after the config
// starts; until then a TLS handshake for the name fails.
func (h *Handler) holdsCertificates() bool {
	for _, name := range h.certNames {
		if len(caddytls.AllMatchingCertificates(name)) == 0 {
			return false
		}
	}
	return true
}

// serve runs steps 1 to 6 of the request path (see the package doc) and
// leaves the answer, or the XKS error that ended the call, in x.
func (h *Handler) serve(x *exchange, r *http.Request, path string) {
	// 1. The route, on the raw path, before authentication.
	var ok bool
	x.ks, x.op, x.keyID, ok = h.route(path)
	if !ok {
		x.err = newError(xksapi.InvalidURIPathException, "the URI path is not an XKS API path of this proxy")
		return
	}
	if r.Method != http.MethodPost {
		x.err = &xksError{name: xksapi.ValidationException, message: "method " + r.Method + " is not allowed; XKS API calls use POST", status: xksapi.StatusWrongMethod}
		return
	}
	// KMS always calls over TLS: a plain request came some other way.
	if r.TLS == nil && !x.ks.AllowPlainHTTP {
		x.err = &xksError{name: xksapi.AccessDeniedException, message: "XKS calls must arrive over TLS",
			cause: errors.New("a plain-HTTP request, and the key store does not set allow_plain_http")}
		return
	}
	// 2. The body, bounded, and its signature over the path just routed on.
	body, xerr := readBody(r, h.MaxRequestBody)
	if xerr != nil {
		x.err = xerr
		return
	}
	// A configured access key id is logged even when verification fails:
	// it says which credential a failing client claims to hold.
	var err error
	x.akid, err = x.ks.verifier.VerifyHTTP(r, path, body)
	if err != nil {
		x.err = &xksError{name: xksapi.AuthenticationFailedException, message: "the request signature could not be verified", cause: err}
		if verr, ok := errors.AsType[*sigv4auth.Error](err); ok {
			x.akid = verr.AccessKeyID
		}
		return
	}
	// The name the client reached the proxy by is worth a certificate
	// check, now that the client is known to be KMS (or holds its secret).
	if r.TLS != nil {
		h.preflight.Watch(r.TLS.ServerName)
	}
	// 3. The JSON body, decoded and validated.
	req, xerr := decodeRequest(x.op, body)
	if xerr != nil {
		x.err = xerr
		return
	}
	x.requestMetadata = &req.requestMetadata
	// 4 and 5. A call about a key must pass the key store's rules;
	// GetHealthStatus is about the proxy and is subject to none of them.
	if x.op != opHealth {
		release, xerr := admitKeyCall(x)
		if xerr != nil {
			x.err = xerr
			return
		}
		defer release()
	}

	// 6. The HSM work, within the key store's deadline.
	ctx, cancel := context.WithDeadline(r.Context(), x.start.Add(time.Duration(x.ks.Deadline)))
	defer cancel()
	hsmStart := time.Now()
	switch x.op {
	case opHealth:
		x.response, x.healthReason = x.ks.health(ctx)
	case opMetadata:
		x.response, err = x.ks.keyMetadata(ctx, x.keyID)
	case opEncrypt:
		x.response, err = x.ks.encrypt(ctx, x.keyID, req)
	case opDecrypt:
		x.response, err = x.ks.decrypt(ctx, x.keyID, req)
	}
	x.hsmTime = time.Since(hsmStart)
	if err != nil {
		x.err = fromHSM(err)
	}
}

// admitKeyCall applies the key store's rules to a call about a key: the
// key must be on its allow-list (step 4) and allowed by its policy (step
// 5), a disabled key is refused for Encrypt and Decrypt, and the key
// store's quota and bound on concurrent HSM work must have room. release
// must be called when the HSM work is done.
func admitKeyCall(x *exchange) (release func(), xerr *xksError) {
	ks := x.ks
	if !ks.allows(x.keyID) {
		return nil, newError(xksapi.KeyNotFoundException, "the external key is not configured for this key store")
	}
	d := ks.authorize(&authz.Input{
		Operation:       x.op.String(),
		KeyStore:        ks.URIPath,
		ExternalKeyID:   x.keyID,
		AccessKeyID:     x.akid,
		RequestMetadata: *x.requestMetadata,
	})
	x.rule = d.Rule
	if !d.Allowed {
		return nil, &xksError{name: xksapi.AccessDeniedException, message: "the request is not authorized by the key store's policy", cause: errors.New(d.Reason)}
	}
	if (x.op == opEncrypt || x.op == opDecrypt) && ks.disabled[x.keyID] {
		return nil, newError(xksapi.InvalidStateException, "the external key is disabled in this key store's configuration")
	}
	return ks.admit()
}

// readBody reads at most limit bytes of the request body
// (frontend.ReadBody), in the XKS vocabulary: a larger body is
// UnsupportedOperationException, an unreadable one ValidationException.
func readBody(r *http.Request, limit int64) ([]byte, *xksError) {
	body, err := frontend.ReadBody(r, limit)
	if tooLarge, ok := errors.AsType[*frontend.BodyTooLargeError](err); ok {
		return nil, newError(xksapi.UnsupportedOperationException, tooLarge.Error())
	}
	if err != nil {
		return nil, validationError(err.Error())
	}
	return body, nil
}

// respond writes the call's answer: its response, or its XKS error with the
// spec's status, as compact JSON.
func (h *Handler) respond(w http.ResponseWriter, x *exchange) {
	status := http.StatusOK
	payload := x.response
	if x.err != nil {
		status = x.err.httpStatus()
		payload = xksapi.ErrorBody{ErrorName: x.err.name, ErrorMessage: xksapi.ErrorMessage(x.err.message)}
		if status == xksapi.StatusWrongMethod {
			w.Header().Set("Allow", http.MethodPost)
		}
	}
	out, err := json.Marshal(payload)
	if err != nil {
		// Every payload is a fixed struct of strings and bytes; this cannot
		// fail, but a reply must still go out.
		h.logger.Error("encoding response", zap.Error(err))
		status = http.StatusInternalServerError
		out = []byte(`{"errorName":"` + xksapi.InternalException + `"}`)
	}
	frontend.WriteJSON(w, status, out)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
