package ekmhandler

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-xks/caddy-xks/authz"
	"github.com/caddy-xks/caddy-xks/ekmapi"
	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/hsm"
	"github.com/caddy-xks/caddy-xks/sigv4auth"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// defaultMaxRequestBody bounds what is read. The largest legitimate body
// (an RSA-4096 ciphertext, 683 characters of base64url, with a
// request_context) is under 2 KiB.
const defaultMaxRequestBody = 8 << 10

// Handler serves the Azure Managed HSM External Key Management proxy API
// (v0.1-preview) for one or more key stores, each under its own path
// prefix, reached by Managed HSM over mutual TLS. It answers every request
// it is given: a path that is not an API path of a configured key store
// gets 404 NotFound.
type Handler struct {
	// KeyStores are the key stores served, each under its own path prefix
	// with its own client certificates, backends and keys. At least one.
	KeyStores []*KeyStore `json:"key_stores,omitempty"`

	// MaxRequestBody is the largest request body accepted, in bytes; a
	// larger one gets 400 InvalidRequest unread. Default: 8192.
	MaxRequestBody int64 `json:"max_request_body,omitempty"`

	// MaxConcurrentStreams is how many requests each HTTP/2 connection of
	// the server may have open at once (HTTP/2's
	// SETTINGS_MAX_CONCURRENT_STREAMS), for every site of the server; with
	// several handlers on one server (an xks site beside), the smallest
	// value applies. Managed HSM calls over HTTP/1.1. Default: 32.
	MaxConcurrentStreams int `json:"max_concurrent_streams,omitempty"`

	stores map[string]*KeyStore // by path prefix
	logger *zap.Logger
	audit  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.azure_ekm",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets defaults, reads each key store's client roots, looks up
// the HSM backends and runs the key checks. Caddy calls Validate after it.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.audit = h.logger.Named("audit")
	if h.MaxRequestBody == 0 {
		h.MaxRequestBody = defaultMaxRequestBody
	}
	if h.MaxConcurrentStreams == 0 {
		h.MaxConcurrentStreams = frontend.DefaultMaxConcurrentStreams
	}
	frontend.ProvisionServer(ctx, h.MaxConcurrentStreams, "Azure EKM", "Managed HSM", h.logger)
	appIface, err := ctx.AppIfConfigured("hsm")
	if err != nil {
		return fmt.Errorf("the azure_ekm handler needs HSM backends (the hsm app): %w", err)
	}
	app := appIface.(*hsm.App)
	h.stores = make(map[string]*KeyStore, len(h.KeyStores))
	for _, ks := range h.KeyStores {
		if err := ks.provision(app, h.logger); err != nil {
			return fmt.Errorf("azure_ekm: %w", err)
		}
		h.stores[ks.PathPrefix] = ks
	}
	if err := frontend.Register(ctx.GetMetricsRegistry(), metrics().Collectors()...); err != nil {
		return fmt.Errorf("azure_ekm: registering metrics: %w", err)
	}
	return nil
}

// Validate checks the configuration without side effects.
func (h *Handler) Validate() error {
	if len(h.KeyStores) == 0 {
		return errors.New("azure_ekm: at least one key store is required")
	}
	seen := make(map[string]bool, len(h.KeyStores))
	for _, ks := range h.KeyStores {
		if err := ks.validate(); err != nil {
			return fmt.Errorf("azure_ekm: %w", err)
		}
		if seen[ks.PathPrefix] {
			return fmt.Errorf("azure_ekm: key store %s is configured twice", ks.name())
		}
		seen[ks.PathPrefix] = true
	}
	if h.MaxRequestBody < 0 || h.MaxConcurrentStreams < 0 {
		return errors.New("azure_ekm: max_request_body and max_concurrent_streams must be positive")
	}
	return nil
}

// ServeHTTP answers one EKM API call. Errors are written here as ProxyError
// JSON; a Go error returned to Caddy would give an empty body.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	x := exchange{start: time.Now()}
	h.serve(&x, r)
	frontend.AskToLeave(w, r)
	h.respond(w, &x)
	x.elapsed = time.Since(x.start)
	x.log(h.audit)
	x.observe()
	return nil
}

// serve runs the request path (see the package doc) and leaves the answer,
// or the error that ended the call, in x.
func (h *Handler) serve(x *exchange, r *http.Request) {
	// 1. The route, on the raw path, before authentication.
	var ok bool
	x.ks, x.op, x.keyName, ok = h.route(sigv4auth.RawPath(r))
	if !ok {
		x.err = newError(ekmapi.CodeNotFound, "the path is not an API path of this proxy")
		return
	}
	if r.Method != http.MethodPost {
		x.err = newError(ekmapi.CodeMethodNotAllowed, "method "+r.Method+" is not allowed; EKM API calls use POST")
		return
	}
	// 2. Mutual TLS: the key store's roots and subject names.
	var xerr *ekmError
	if x.client, xerr = x.ks.authenticate(r.TLS); xerr != nil {
		x.err = xerr
		return
	}
	// 3. The api-version, the key name, the body.
	if xerr := checkAPIVersion(r.URL.RawQuery); xerr != nil {
		x.err = xerr
		return
	}
	if x.op != opInfo && !ekmapi.ValidKeyName(x.keyName) {
		x.err = invalid(fmt.Sprintf("the key name must be 1 to %d characters of a-z, A-Z, 0-9 and -", ekmapi.MaxKeyNameLen))
		x.keyName = ""
		return
	}
	body, err := frontend.ReadBody(r, h.MaxRequestBody)
	if err != nil {
		x.err = &ekmError{code: ekmapi.CodeInvalidRequest, message: err.Error(), cause: err}
		return
	}
	x.bodyLen = len(body)
	req, xerr := decodeRequest(x.op, body)
	if xerr != nil {
		x.err = xerr
		return
	}
	x.req = req
	// 4 and 5. A call about a key must pass the key store's rules; info
	// is about the proxy and is subject to none of them.
	if x.op != opInfo {
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
	case opInfo:
		x.response, x.healthReason, x.err = x.ks.info(ctx)
	case opMetadata:
		x.response, err = x.ks.metadata(ctx, x.keyName)
	case opWrap:
		x.response, err = x.ks.wrap(ctx, x.keyName, req)
	case opUnwrap:
		x.response, err = x.ks.unwrap(ctx, x.keyName, req)
	}
	x.hsmTime = time.Since(hsmStart)
	if err != nil {
		x.err = fromHSM(err)
	}
}

// admitKeyCall applies the key store's rules to a call about a key: the
// key must be on its allow-list and allowed by its policy, a disabled key
// is refused, and the key store's quota and bound on concurrent work must
// have room. release must be called when the HSM work is done.
func admitKeyCall(x *exchange) (release func(), xerr *ekmError) {
	ks := x.ks
	if !ks.allows(x.keyName) {
		return nil, newError(ekmapi.CodeKeyNotFound, "the key is not configured for this key store")
	}
	d := ks.policy.Evaluate(&authz.EKMInput{
		Operation:     x.op.String(),
		KeyStore:      ks.PathPrefix,
		KeyName:       x.keyName,
		Alg:           x.req.alg,
		Client:        x.client,
		RequestID:     x.req.context.RequestID,
		CorrelationID: x.req.context.CorrelationID,
		PoolName:      x.req.context.PoolName,
	})
	x.rule = d.Rule
	if !d.Allowed {
		x.denied = true
		return nil, &ekmError{code: ekmapi.CodeForbidden, message: "the request is not authorized by the key store's policy", cause: errors.New(d.Reason)}
	}
	if ks.disabled[x.keyName] {
		return nil, newError(ekmapi.CodeKeyDisabled, "operation "+x.op.String()+" is not allowed on a disabled key")
	}
	release, err := ks.Admit()
	if err != nil {
		return nil, fromLimits(err)
	}
	return release, nil
}

// respond writes the call's answer: its response, or its ProxyError with
// its status, as compact JSON.
func (h *Handler) respond(w http.ResponseWriter, x *exchange) {
	status := http.StatusOK
	payload := x.response
	if x.err != nil {
		status = x.err.status()
		payload = ekmapi.ProxyError{Code: x.err.code, Message: x.err.message}
		x.err.header(w.Header())
	}
	x.status = status
	out, err := json.Marshal(payload)
	if err != nil {
		// Every payload is a fixed struct of strings and bytes; this cannot
		// fail, but a reply must still go out.
		h.logger.Error("encoding response", zap.Error(err))
		x.status = http.StatusInternalServerError
		out = []byte(`{"code":"` + ekmapi.CodeInternalServerError + `","message":"encoding the response failed"}`)
	}
	frontend.WriteJSON(w, x.status, out)
}

// metrics are the handler's request metrics, for the life of the process.
var metrics = sync.OnceValue(func() *frontend.RequestMetrics {
	return frontend.NewRequestMetrics("xks_ekm", "Azure Managed HSM EKM proxy API", "the ProxyError code")
})

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
