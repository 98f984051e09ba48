package xkshandler

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

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

	// ReadyPath is a path answered without authentication, for load
	// balancers: 200 when every key store has an HSM backend that is not
	// UNAVAILABLE, 503 otherwise, with no detail either way. It must lie
	// outside the key stores' URI paths. Default: none.
	ReadyPath string `json:"ready_path,omitempty"`

	// Hostnames are the names KMS connects to, whose server certificate is
	// checked against what KMS accepts (trusted root, subject CN) at start
	// and after each renewal. Names seen in requests' TLS server name are
	// checked too, so this is only needed to check before KMS first
	// connects. Default: none.
	Hostnames []string `json:"hostnames,omitempty"`

	stores    map[string]*KeyStore // by URI path
	logger    *zap.Logger
	audit     *zap.Logger
	preflight *tlscheck.Watcher
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
	appIface, err := ctx.AppIfConfigured("hsm")
	if err != nil {
		return fmt.Errorf("the xks handler needs HSM backends (the hsm app): %w", err)
	}
	app := appIface.(*hsm.App)
	h.stores = make(map[string]*KeyStore, len(h.KeyStores))
	for _, ks := range h.KeyStores {
		if err := ks.provision(app); err != nil {
			return err
		}
		h.stores[ks.URIPath] = ks
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("xks: registering metrics: %w", err)
	}
	h.preflight, err = tlscheck.Preflight(ctx, h.Hostnames, h.logger.Named("certificate"), func(r tlscheck.Report) {
		metrics.certExpiry.WithLabelValues(r.Hostname).Set(float64(r.NotAfter.Unix()))
	})
	if err != nil {
		return fmt.Errorf("xks: %w", err)
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
	if h.ReadyPath != "" {
		if !strings.HasPrefix(h.ReadyPath, "/") || strings.Contains(h.ReadyPath, APIPathSuffix+"/") {
			return fmt.Errorf("xks: ready_path %q must be a path outside the XKS API", h.ReadyPath)
		}
	}
	return nil
}

// route splits a raw request path (sigv4auth.RawPath) into its key store,
// operation and external key id. Routing is on the path exactly as received: nothing is
// cleaned or decoded, so what is routed is what was signed.
func (h *Handler) route(path string) (ks *KeyStore, op operation, keyID string, ok bool) {
	marker := APIPathSuffix + "/"
	i := strings.LastIndex(path, marker)
	if i < 0 {
		return nil, 0, "", false
	}
	ks = h.stores[path[:i+len(APIPathSuffix)]]
	if ks == nil {
		return nil, 0, "", false
	}
	rest := path[i+len(marker):]
	if rest == "health" {
		return ks, opHealth, "", true
	}
	id, action, found := strings.Cut(strings.TrimPrefix(rest, "keys/"), "/")
	if !found || !strings.HasPrefix(rest, "keys/") || !validKeyID(id) {
		return nil, 0, "", false
	}
	switch action {
	case "metadata":
		op = opMetadata
	case "encrypt":
		op = opEncrypt
	case "decrypt":
		op = opDecrypt
	default:
		return nil, 0, "", false
	}
	return ks, op, id, true
}

// exchange is the state of one XKS call, for the response and the audit log.
type exchange struct {
	start           time.Time
	ks              *KeyStore
	op              operation
	keyID           string
	akid            string
	requestMetadata *xksapi.RequestMetadata
	rule            string // the authorization rule that decided, if any
	hsmTime         time.Duration
	elapsed         time.Duration
	err             *xksError
	response        any
	// healthReason says why a GetHealthStatus reports a backend that is
	// not ACTIVE.
	healthReason string
}

// ServeHTTP answers one XKS API call. Protocol errors are written here as
// XKS JSON; a Go error returned to Caddy would produce an empty body that
// KMS cannot interpret.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	x := exchange{start: time.Now()}
	if r.TLS != nil {
		h.preflight.Watch(r.TLS.ServerName)
	}
	path := sigv4auth.RawPath(r)
	if h.ReadyPath != "" && path == h.ReadyPath {
		h.ready(w, r)
		return nil
	}
	h.serve(&x, r, path)
	h.respond(w, &x)
	x.elapsed = time.Since(x.start)
	h.log(&x)
	x.observe()
	return nil
}

// ready answers a load balancer's probe: is every key store able to serve?
// Health results are cached by the backends, so probes cost no HSM work.
func (h *Handler) ready(w http.ResponseWriter, r *http.Request) {
	status := http.StatusOK
	for _, ks := range h.KeyStores {
		up := false
		for _, b := range ks.backends {
			if b.Health(r.Context()).Status != hsm.HealthUnavailable {
				up = true
				break
			}
		}
		if !up {
			status = http.StatusServiceUnavailable
			break
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = io.WriteString(w, http.StatusText(status)+"\n")
	}
}

func (h *Handler) serve(x *exchange, r *http.Request, path string) {
	var ok bool
	x.ks, x.op, x.keyID, ok = h.route(path)
	if !ok {
		x.err = newError(InvalidURIPathException, "the URI path is not an XKS API path of this proxy")
		return
	}
	if r.Method != http.MethodPost {
		x.err = &xksError{name: ValidationException, message: "method " + r.Method + " is not allowed; XKS API calls use POST", status: http.StatusMethodNotAllowed}
		return
	}
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
		x.err = &xksError{name: AuthenticationFailedException, message: "the request signature could not be verified", cause: err}
		if verr, ok := errors.AsType[*sigv4auth.Error](err); ok {
			x.akid = verr.AccessKeyID
		}
		return
	}
	req, xerr := decodeRequest(x.op, body)
	if xerr != nil {
		x.err = xerr
		return
	}
	x.requestMetadata = &req.requestMetadata
	if x.op != opHealth && !x.ks.allows(x.keyID) {
		x.err = newError(KeyNotFoundException, "the external key is not configured for this key store")
		return
	}
	if x.op != opHealth {
		d := x.ks.authorize(x)
		x.rule = d.Rule
		if !d.Allowed {
			x.err = &xksError{name: AccessDeniedException, message: "the request is not authorized by the key store's policy", cause: errors.New(d.Reason)}
			return
		}
	}
	if (x.op == opEncrypt || x.op == opDecrypt) && x.ks.disabled[x.keyID] {
		x.err = newError(InvalidStateException, "the external key is disabled in this key store's configuration")
		return
	}
	if x.op != opHealth {
		release, xerr := x.ks.admit()
		if xerr != nil {
			x.err = xerr
			return
		}
		defer release()
	}

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

// readBody reads at most limit bytes of the request body.
func readBody(r *http.Request, limit int64) ([]byte, *xksError) {
	if r.ContentLength > limit {
		return nil, newError(UnsupportedOperationException, fmt.Sprintf("request bodies larger than %d bytes are not supported", limit))
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return nil, validationError("the request body could not be read")
	}
	if int64(len(body)) > limit {
		return nil, newError(UnsupportedOperationException, fmt.Sprintf("request bodies larger than %d bytes are not supported", limit))
	}
	return body, nil
}

func (h *Handler) respond(w http.ResponseWriter, x *exchange) {
	status := http.StatusOK
	payload := x.response
	if x.err != nil {
		status = x.err.httpStatus()
		payload = xksapi.ErrorBody{ErrorName: x.err.name, ErrorMessage: xksapi.ErrorMessage(x.err.message)}
		if status == http.StatusMethodNotAllowed {
			w.Header().Set("Allow", http.MethodPost)
		}
	}
	out, err := json.Marshal(payload)
	if err != nil {
		// Every payload is a fixed struct of strings and bytes; this cannot
		// fail, but a reply must still go out.
		h.logger.Error("encoding response", zap.Error(err))
		status = http.StatusInternalServerError
		out = []byte(`{"errorName":"InternalException"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(out)))
	w.WriteHeader(status)
	_, _ = w.Write(out)
}

// auditKeys are the audit line's names of the requestMetadata fields, in
// the order of RequestMetadata.Fields: their JSON keys in snake case
// (kmsRequestId is kms_request_id).
var auditKeys = func() []string {
	var keys []string
	for _, f := range (&xksapi.RequestMetadata{}).Fields() {
		var b strings.Builder
		for _, c := range f.Key {
			if 'A' <= c && c <= 'Z' {
				b.WriteByte('_')
				c += 'a' - 'A'
			}
			b.WriteRune(c)
		}
		keys = append(keys, b.String())
	}
	return keys
}()

// log writes the audit line of a call. It names who asked for what and how
// it ended; it never carries plaintext, AAD, secrets or signatures.
func (h *Handler) log(x *exchange) {
	outcome := "ok"
	level := zapcore.InfoLevel
	if x.err != nil {
		outcome = x.err.name
		if x.err.httpStatus() >= 500 {
			level = zapcore.ErrorLevel
		}
	}
	ce := h.audit.Check(level, "xks request")
	if ce == nil {
		return
	}
	fields := make([]zap.Field, 0, 16)
	fields = append(fields, zap.String("operation", x.op.String()), zap.String("outcome", outcome))
	if x.ks != nil {
		fields = append(fields, zap.String("key_store", x.ks.URIPath))
	}
	if x.keyID != "" {
		fields = append(fields, zap.String("external_key_id", x.keyID))
	}
	if x.akid != "" {
		fields = append(fields, zap.String("access_key_id", x.akid))
	}
	if m := x.requestMetadata; m != nil {
		for i, f := range m.Fields() {
			fields = append(fields, zap.String(auditKeys[i], f.Value))
		}
	}
	if x.rule != "" {
		fields = append(fields, zap.String("authz_rule", x.rule))
	}
	switch {
	case x.err != nil && x.err.cause != nil:
		fields = append(fields, zap.String("reason", x.err.cause.Error()))
	case x.healthReason != "":
		fields = append(fields, zap.String("reason", x.healthReason))
	}
	fields = append(fields, zap.Duration("hsm_time", x.hsmTime), zap.Duration("total_time", x.elapsed))
	ce.Write(fields...)
}

// Version is the caddy-xks release this source is. A build from a
// published module version reports that version instead.
const Version = "v0.1.0"

// proxyModel is the xksProxyModel of GetHealthStatus: the product and its
// version, and Caddy's.
var proxyModel = sync.OnceValue(func() string {
	version := Version
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, m := range append([]*debug.Module{&info.Main}, info.Deps...) {
			// A local build (replaced module, or "(devel)") has no version
			// of its own to report.
			if m.Path == "github.com/caddy-xks/caddy-xks" && m.Replace == nil && strings.HasPrefix(m.Version, "v") && !strings.HasPrefix(m.Version, "v0.0.0-") {
				version = m.Version
			}
		}
	}
	caddyVersion, _ := caddy.Version()
	return "caddy-xks " + version + " (Caddy " + caddyVersion + ")"
})

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
