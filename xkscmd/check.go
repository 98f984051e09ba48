package xkscmd

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/caddy-xks/caddy-xks/sigv4auth"
	"github.com/caddy-xks/caddy-xks/xksapi"
)

// kmsTimeout is how long KMS waits for an answer of the proxy.
const kmsTimeout = 250 * time.Millisecond

// checkRow is one named check and how it went.
type checkRow struct {
	name   string
	err    error
	detail string
}

// checker runs the conformance checks against one key store, signing as
// KMS does.
type checker struct {
	ctx            context.Context
	c              *xksClient
	key            string
	encryptOnlyKey string
	runID          string
	requests       int
	rows           []checkRow
}

func (ck *checker) run(name string, check func() (string, error)) {
	detail, err := check()
	ck.rows = append(ck.rows, checkRow{name: name, err: err, detail: detail})
}

// meta is the requestMetadata of the next call; its kmsRequestId names the
// run, so the proxy's audit log shows which calls came from a check.
func (ck *checker) meta(operation string) xksapi.RequestMetadata {
	ck.requests++
	return xksapi.RequestMetadata{
		AWSPrincipalARN: "arn:aws:iam::111122223333:role/caddy-xks-check",
		KMSKeyARN:       "arn:aws:kms:us-east-1:111122223333:key/caddy-xks-check",
		KMSOperation:    operation,
		KMSRequestID:    fmt.Sprintf("caddy-xks-check-%s-%d", ck.runID, ck.requests),
	}
}

func (ck *checker) post(c *xksClient, path string, body []byte) (result, error) {
	return c.call(ck.ctx, http.MethodPost, path, body, nil)
}

// decodeOK decodes a 200 answer into out.
func decodeOK(r result, err error, out any) error {
	if err != nil {
		return err
	}
	if r.status != http.StatusOK {
		return fmt.Errorf("got %d %s, want 200", r.status, r.errorName())
	}
	if err := json.Unmarshal(r.body, out); err != nil {
		return fmt.Errorf("answer is not the XKS JSON: %w", err)
	}
	return nil
}

// expectError checks an error answer against the spec's error table: its
// status, its errorName, and an errorMessage (if any) that follows the
// spec's rules.
func expectError(r result, err error, name string) (string, error) {
	if err != nil {
		return "", err
	}
	status := xksapi.Status(name)
	if r.status != status || r.errorName() != name {
		return "", fmt.Errorf("got %d %s, want %d %s", r.status, r.errorName(), status, name)
	}
	if !xksapi.ValidErrorMessage(r.errorBody().ErrorMessage) {
		return "", fmt.Errorf("%d %s, but its errorMessage is not under %d printable ASCII characters", status, name, xksapi.MaxErrorMessageLen+1)
	}
	return fmt.Sprintf("%d %s", status, name), nil
}

func (ck *checker) health() (string, error) {
	var h xksapi.HealthResponse
	r, err := ck.post(ck.c, "/health", mustJSON(xksapi.MetadataOnlyRequest{RequestMetadata: ck.meta("KmsHealthCheck")}))
	if err := decodeOK(r, err, &h); err != nil {
		return "", err
	}
	switch {
	case h.XKSProxyFleetSize <= 0:
		return "", fmt.Errorf("xksProxyFleetSize is %d, want more than 0", h.XKSProxyFleetSize)
	case h.XKSProxyVendor == "" || h.XKSProxyModel == "" || h.EKMVendor == "":
		return "", errors.New("xksProxyVendor, xksProxyModel and ekmVendor must all be given")
	case len(h.EKMFleetDetails) < 1 || len(h.EKMFleetDetails) > 10:
		return "", fmt.Errorf("%d ekmFleetDetails, want 1 to 10", len(h.EKMFleetDetails))
	}
	var statuses []string
	for _, d := range h.EKMFleetDetails {
		switch d.HealthStatus {
		case "ACTIVE", "DEGRADED", "UNAVAILABLE":
		default:
			return "", fmt.Errorf("ekmFleetDetails %q has healthStatus %q, want ACTIVE, DEGRADED or UNAVAILABLE", d.ID, d.HealthStatus)
		}
		statuses = append(statuses, d.HealthStatus)
	}
	if !slices.ContainsFunc(statuses, func(s string) bool { return s != "UNAVAILABLE" }) {
		return "", errors.New("every HSM is UNAVAILABLE: KMS would not connect the key store")
	}
	product := h.XKSProxyModel
	if !strings.HasPrefix(product, h.XKSProxyVendor) {
		product = h.XKSProxyVendor + " " + product
	}
	return fmt.Sprintf("%s, fleet of %d, HSMs %s", product, h.XKSProxyFleetSize, strings.Join(statuses, ",")), nil
}

func (ck *checker) metadata() (string, error) {
	var md xksapi.MetadataResponse
	r, err := ck.post(ck.c, "/keys/"+ck.key+"/metadata", mustJSON(xksapi.MetadataOnlyRequest{RequestMetadata: ck.meta("CreateKey")}))
	if err := decodeOK(r, err, &md); err != nil {
		return "", err
	}
	got := fmt.Sprintf("%s %s %s", md.KeySpec, strings.Join(md.KeyUsage, ","), md.KeyStatus)
	// What KMS's CreateKey requires of an external key.
	switch {
	case md.KeySpec != "AES_256":
		return "", fmt.Errorf("%s: keySpec must be AES_256", got)
	case !slices.Contains(md.KeyUsage, "ENCRYPT") || !slices.Contains(md.KeyUsage, "DECRYPT"):
		return "", fmt.Errorf("%s: keyUsage must contain ENCRYPT and DECRYPT", got)
	case len(md.KeyUsage) > 10:
		return "", fmt.Errorf("%s: more than 10 keyUsage values", got)
	case md.KeyStatus != "ENABLED":
		return "", fmt.Errorf("%s: keyStatus must be ENABLED", got)
	}
	return got, nil
}

// encrypt encrypts plaintext with key and checks the answer's shape.
func (ck *checker) encrypt(key string, plaintext, aad []byte, cdiv bool) (xksapi.EncryptResponse, error) {
	req := xksapi.EncryptRequest{RequestMetadata: ck.meta("Encrypt"), Plaintext: plaintext, Algorithm: "AES_GCM", AAD: aad}
	if cdiv {
		req.CDIVAlgorithm = "SHA_256"
	}
	var sealed xksapi.EncryptResponse
	r, err := ck.post(ck.c, "/keys/"+key+"/encrypt", mustJSON(req))
	if err := decodeOK(r, err, &sealed); err != nil {
		return sealed, fmt.Errorf("encrypt: %w", err)
	}
	switch n := len(sealed.InitializationVector); {
	case len(sealed.Ciphertext) != len(plaintext):
		return sealed, fmt.Errorf("encrypt: %d bytes of ciphertext for %d of plaintext", len(sealed.Ciphertext), len(plaintext))
	case !xksapi.ValidIVLen(n):
		return sealed, fmt.Errorf("encrypt: %d-byte IV, want %d or %d", n, xksapi.IVLen, xksapi.LongIVLen)
	case len(sealed.AuthenticationTag) != xksapi.TagLen:
		return sealed, fmt.Errorf("encrypt: %d-byte tag, want %d", len(sealed.AuthenticationTag), xksapi.TagLen)
	case len(sealed.CiphertextMetadata) > xksapi.MaxCiphertextMetadataLen:
		return sealed, fmt.Errorf("encrypt: %d bytes of ciphertextMetadata, at most %d", len(sealed.CiphertextMetadata), xksapi.MaxCiphertextMetadataLen)
	case cdiv != (sealed.CiphertextDataIntegrityValue != nil):
		return sealed, fmt.Errorf("encrypt: ciphertextDataIntegrityValue asked for: %v, returned: %v", cdiv, !cdiv)
	}
	return sealed, nil
}

func (ck *checker) decrypt(key string, sealed xksapi.EncryptResponse, aad []byte) (result, error) {
	return ck.post(ck.c, "/keys/"+key+"/decrypt", mustJSON(decryptRequestFor(ck.meta("Decrypt"), sealed, aad)))
}

// roundTrip encrypts random bytes and decrypts them again; with cdiv it
// recomputes the ciphertext data integrity value as KMS does.
func (ck *checker) roundTrip(plaintextLen, aadLen int, cdiv bool) (string, error) {
	plaintext, aad := randomBytes(plaintextLen), randomBytes(aadLen)
	sealed, err := ck.encrypt(ck.key, plaintext, aad, cdiv)
	if err != nil {
		return "", err
	}
	if cdiv {
		h := sha256.New()
		for _, part := range [][]byte{aad, sealed.CiphertextMetadata, sealed.InitializationVector, sealed.Ciphertext, sealed.AuthenticationTag} {
			h.Write(part)
		}
		if want := h.Sum(nil); !bytes.Equal(sealed.CiphertextDataIntegrityValue, want) {
			return "", fmt.Errorf("ciphertextDataIntegrityValue is %x, SHA-256(AAD||metadata||IV||ciphertext||tag) is %x", sealed.CiphertextDataIntegrityValue, want)
		}
	}
	var opened xksapi.DecryptResponse
	r, err := ck.decrypt(ck.key, sealed, aad)
	if err := decodeOK(r, err, &opened); err != nil {
		return "", fmt.Errorf("decrypt: %w", err)
	}
	if !bytes.Equal(opened.Plaintext, plaintext) {
		return "", errors.New("decrypt returned another plaintext")
	}
	detail := fmt.Sprintf("%d-byte plaintext, %d-byte AAD, %d-byte IV", plaintextLen, aadLen, len(sealed.InitializationVector))
	if cdiv {
		detail += ", CDIV matches"
	}
	return detail, nil
}

// randomBytes returns n random bytes, or nil for 0 (no AAD at all).
func randomBytes(n int) []byte {
	if n == 0 {
		return nil
	}
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails (crypto/rand documents it)
	return b
}

func (ck *checker) tamperedCiphertext() (string, error) {
	sealed, err := ck.encrypt(ck.key, randomBytes(32), nil, false)
	if err != nil {
		return "", err
	}
	sealed.Ciphertext[0] ^= 1
	r, err := ck.decrypt(ck.key, sealed, nil)
	return expectError(r, err, xksapi.InvalidCiphertextException)
}

func (ck *checker) wrongAAD() (string, error) {
	sealed, err := ck.encrypt(ck.key, randomBytes(32), randomBytes(16), false)
	if err != nil {
		return "", err
	}
	r, err := ck.decrypt(ck.key, sealed, randomBytes(16))
	return expectError(r, err, xksapi.InvalidCiphertextException)
}

func (ck *checker) unknownKey() (string, error) {
	key := "caddy-xks-check-no-such-key-" + hex.EncodeToString(randomBytes(6))
	r, err := ck.post(ck.c, "/keys/"+key+"/metadata", mustJSON(xksapi.MetadataOnlyRequest{RequestMetadata: ck.meta("CreateKey")}))
	return expectError(r, err, xksapi.KeyNotFoundException)
}

func (ck *checker) wrongSecret() (string, error) {
	other, err := sigv4auth.NewCredential()
	if err != nil {
		return "", err
	}
	c := *ck.c
	c.credential.SecretAccessKey = other.SecretAccessKey
	// The signer caches signing keys by access key id alone: a signer that
	// signed with the right secret would sign with it again.
	c.signer = v4.NewSigner()
	r, err := ck.post(&c, "/health", mustJSON(xksapi.MetadataOnlyRequest{RequestMetadata: ck.meta("KmsHealthCheck")}))
	return expectError(r, err, xksapi.AuthenticationFailedException)
}

func (ck *checker) wrongPrefix() (string, error) {
	c := *ck.c
	i := strings.LastIndex(c.base, "/kms/xks/")
	c.base = c.base[:i] + "/invalid" + c.base[i:]
	r, err := ck.post(&c, "/health", mustJSON(xksapi.MetadataOnlyRequest{RequestMetadata: ck.meta("KmsHealthCheck")}))
	return expectError(r, err, xksapi.InvalidURIPathException)
}

func (ck *checker) getMethod() (string, error) {
	r, err := ck.c.call(ck.ctx, http.MethodGet, "/health", nil, nil)
	if err != nil {
		return "", err
	}
	if r.status != xksapi.StatusWrongMethod {
		return "", fmt.Errorf("got %d %s, want 405", r.status, r.errorName())
	}
	return "405 Method Not Allowed", nil
}

func (ck *checker) malformedBody() (string, error) {
	r, err := ck.post(ck.c, "/health", []byte(`{}`))
	return expectError(r, err, xksapi.ValidationException)
}

// encryptOnlyCDIV asks an encrypt-only key for a CDIV, which needs the
// decrypt-back check that such a key cannot do.
func (ck *checker) encryptOnlyCDIV() (string, error) {
	req := xksapi.EncryptRequest{RequestMetadata: ck.meta("Encrypt"), Plaintext: randomBytes(32), Algorithm: "AES_GCM", CDIVAlgorithm: "SHA_256"}
	r, err := ck.post(ck.c, "/keys/"+ck.encryptOnlyKey+"/encrypt", mustJSON(req))
	return expectError(r, err, xksapi.InvalidKeyUsageException)
}

// latency sends samples Encrypt calls one after the other and fails when
// their p99 reaches limit (KMS gives up on a call after 250 ms).
func (ck *checker) latency(samples int, limit time.Duration) (p50, p99 time.Duration, err error) {
	body := mustJSON(xksapi.EncryptRequest{RequestMetadata: ck.meta("Encrypt"), Plaintext: randomBytes(32), Algorithm: "AES_GCM"})
	latencies := make([]time.Duration, 0, samples)
	for range samples {
		r, err := ck.post(ck.c, "/keys/"+ck.key+"/encrypt", body)
		if err != nil {
			return 0, 0, err
		}
		if r.status != http.StatusOK {
			return 0, 0, fmt.Errorf("got %d %s, want 200", r.status, r.errorName())
		}
		latencies = append(latencies, r.latency)
	}
	slices.Sort(latencies)
	p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
	if p99 >= limit {
		return p50, p99, fmt.Errorf("p99 of %d Encrypt calls is %s, the limit is %s", samples, p99.Round(time.Microsecond), limit)
	}
	return p50, p99, nil
}

func cmdCheck(fl caddycmd.Flags, out io.Writer) (int, error) {
	target := fl.Arg(0)
	if target == "" {
		return caddy.ExitCodeFailedStartup, errors.New("usage: caddy xks check <key store URL> (see --help)")
	}
	samples := fl.Int("samples")
	if samples < 1 {
		return caddy.ExitCodeFailedStartup, errors.New("--samples must be at least 1")
	}
	maxP99 := fl.Duration("max-p99")
	if maxP99 <= 0 {
		return caddy.ExitCodeFailedStartup, errors.New("--max-p99 must be above 0")
	}
	c, err := clientFromFlags(fl, target, 1)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if !strings.Contains(c.base, "/kms/xks/") {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("%s is not a key store URL: its path must end with /kms/xks/v1", c.base)
	}
	ck := &checker{
		ctx:            context.Background(),
		c:              c,
		key:            fl.String("key"),
		encryptOnlyKey: fl.String("encrypt-only-key"),
		runID:          hex.EncodeToString(randomBytes(4)),
	}
	ck.run("health", ck.health)
	ck.run("metadata", ck.metadata)
	ck.run("round trip", func() (string, error) { return ck.roundTrip(32, 0, false) })
	ck.run("round trip with AAD", func() (string, error) { return ck.roundTrip(32, 64, false) })
	ck.run("CDIV", func() (string, error) { return ck.roundTrip(32, 64, true) })
	ck.run("largest request", func() (string, error) {
		return ck.roundTrip(xksapi.SupportedPlaintextLen, xksapi.SupportedAADLen, false)
	})
	ck.run("unknown key", ck.unknownKey)
	ck.run("wrong secret", ck.wrongSecret)
	ck.run("wrong URI prefix", ck.wrongPrefix)
	ck.run("tampered ciphertext", ck.tamperedCiphertext)
	ck.run("wrong AAD", ck.wrongAAD)
	ck.run("GET method", ck.getMethod)
	ck.run("malformed body", ck.malformedBody)
	if ck.encryptOnlyKey != "" {
		ck.run("encrypt-only CDIV", ck.encryptOnlyCDIV)
	}
	var p50, p99 time.Duration
	ck.run("latency", func() (string, error) {
		var err error
		p50, p99, err = ck.latency(samples, maxP99)
		return fmt.Sprintf("%d sequential Encrypt calls, p99 under %s", samples, maxP99), err
	})

	fmt.Fprintf(out, "%s\n\n", c.base)
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tRESULT\tDETAIL")
	var failed []string
	for _, row := range ck.rows {
		result, detail := "PASS", row.detail
		if row.err != nil {
			result, detail = "FAIL", row.err.Error()
			failed = append(failed, row.name)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", row.name, result, detail)
	}
	if err := tw.Flush(); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	fmt.Fprintf(out, "\nprotocol %s\n", c.protocols)
	if p99 > 0 {
		fmt.Fprintf(out, "p50 %s\np99 %s\n", p50.Round(time.Microsecond), p99.Round(time.Microsecond))
	}
	if len(failed) > 0 {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("%d of %d checks failed: %s", len(failed), len(ck.rows), strings.Join(failed, ", "))
	}
	return caddy.ExitCodeSuccess, nil
}
