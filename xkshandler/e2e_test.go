package xkshandler_test

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/frontend"
	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

func random(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// specAAD and sampleAAD build the AAD given to the HSM independently of the
// handler's code: the spec's framing and AWS's sample proxy's. The tests
// pass AADs under 64 KiB and metadata under 256 bytes, as the spec bounds
// them.
func specAAD(aad, md []byte) []byte {
	out := binary.BigEndian.AppendUint16(nil, uint16(len(aad))) //nolint:gosec // see above
	out = append(out, aad...)
	out = append(out, byte(len(md))) //nolint:gosec // see above
	return append(out, md...)
}

func sampleAAD(aad, md []byte) []byte {
	out := binary.BigEndian.AppendUint16(nil, uint16(len(aad))) //nolint:gosec // see specAAD
	if len(aad) > 0 {
		sum := sha256.Sum256(aad)
		out = append(out, sum[:]...)
	}
	out = append(out, byte(len(md))) //nolint:gosec // see specAAD
	return append(out, md...)
}

func goGCM(t testing.TB, key []byte) cipher.AEAD {
	t.Helper()
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		t.Fatal(err)
	}
	return gcm
}

func TestHealth(t *testing.T) {
	f := newFixture(t)
	r := f.call(f.ks1[0], "/ks1/kms/xks/v1/health", healthBody)
	if r.status != http.StatusOK {
		t.Fatalf("health: %d %s", r.status, r.raw)
	}
	if r.body["xksProxyFleetSize"] != float64(1) || r.str("xksProxyVendor") == "" || !strings.HasPrefix(r.str("xksProxyModel"), "caddy-xks "+frontend.Version+" (Caddy ") || r.str("ekmVendor") != "SoftHSM project" {
		t.Errorf("health: %s", r.raw)
	}
	fleet, _ := r.body["ekmFleetDetails"].([]any)
	if len(fleet) != 1 {
		t.Fatalf("ekmFleetDetails: %s", r.raw)
	}
	ekm := fleet[0].(map[string]any)
	if ekm["healthStatus"] != "ACTIVE" || ekm["id"] == "" || ekm["model"] == "" {
		t.Errorf("ekmFleetDetails: %v", ekm)
	}
	// Health is never subject to the key allow-list: /ks2 allows one key
	// and still answers.
	if r := f.call(f.ks2, "/ks2/kms/xks/v1/health", healthBody); r.status != http.StatusOK {
		t.Errorf("ks2 health: %d %s", r.status, r.raw)
	}
}

func TestGetKeyMetadata(t *testing.T) {
	f := newFixture(t)
	tests := []struct {
		key, spec, usage, status string
	}{
		{keyBoth, "AES_256", "ENCRYPT,DECRYPT", "ENABLED"},
		{keyEncOnly, "AES_256", "ENCRYPT", "ENABLED"},
		{keyDecOnly, "AES_256", "DECRYPT", "ENABLED"},
		{keyNone, "AES_256", "", "ENABLED"},
		{keyAES128, "AES_128", "ENCRYPT,DECRYPT", "ENABLED"},
		{keyOff, "AES_256", "ENCRYPT,DECRYPT", "DISABLED"},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+tt.key+"/metadata", metaBody)
			if r.status != http.StatusOK {
				t.Fatalf("%d %s", r.status, r.raw)
			}
			var usage []string
			for _, u := range r.body["keyUsage"].([]any) {
				usage = append(usage, u.(string))
			}
			if r.str("keySpec") != tt.spec || strings.Join(usage, ",") != tt.usage || r.str("keyStatus") != tt.status {
				t.Errorf("got %s", r.raw)
			}
		})
	}
}

func TestEncryptDecryptRoundTrip(t *testing.T) {
	f := newFixture(t)
	tests := []struct {
		name           string
		ptLen, aadLen  int
		noAAD, useCDIV bool
	}{
		{"empty plaintext, no AAD", 0, 0, true, false},
		{"1 byte, 1-byte AAD", 1, 1, false, false},
		{"32 bytes, empty AAD", 32, 0, false, true},
		{"4300 bytes, 8192-byte AAD, CDIV", 4300, 8192, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pt := random(t, tt.ptLen)
			var aad []byte
			if !tt.noAAD {
				aad = random(t, tt.aadLen)
			}
			r := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody(pt, aad, tt.useCDIV))
			if r.status != http.StatusOK {
				t.Fatalf("encrypt: %d %s", r.status, r.raw)
			}
			s := sealed{r.bytes(t, "ciphertext"), r.bytes(t, "initializationVector"), r.bytes(t, "authenticationTag"), r.bytes(t, "ciphertextMetadata")}
			if len(s.ciphertext) != len(pt) || len(s.tag) != 16 || len(s.iv) != 12 || string(s.metadata) != "test-v1" {
				t.Fatalf("encrypt answer: ct %d, tag %d, iv %d, metadata %q", len(s.ciphertext), len(s.tag), len(s.iv), s.metadata)
			}
			if tt.useCDIV {
				h := sha256.New()
				for _, part := range [][]byte{aad, s.metadata, s.iv, s.ciphertext, s.tag} {
					h.Write(part)
				}
				if got, want := r.str("ciphertextDataIntegrityValue"), base64.StdEncoding.EncodeToString(h.Sum(nil)); got != want {
					t.Errorf("CDIV %s, want %s", got, want)
				}
			} else if _, ok := r.body["ciphertextDataIntegrityValue"]; ok {
				t.Error("CDIV returned without being asked for")
			}
			d := f.call(f.ks1[0], "/ks1/kms/xks/v1/keys/"+keyBoth+"/decrypt", decryptBody(s, aad))
			if d.status != http.StatusOK {
				t.Fatalf("decrypt: %d %s", d.status, d.raw)
			}
			if got := d.bytes(t, "plaintext"); !bytes.Equal(got, pt) {
				t.Error("decrypt returned another plaintext")
			}
		})
	}
}

// TestCiphertextMatchesGoGCM checks the proxy's output against Go's AES-GCM
// with the same key material (an extractable test key, which only a backend
// with allow_exportable_keys uses): the HSM got the spec's AAD framing, and
// the IV and tag are split correctly.
func TestCiphertextMatchesGoGCM(t *testing.T) {
	f := newFixture(t)
	gcm := goGCM(t, f.token.KeyValue(t, keyClear))
	pt, aad := random(t, 100), []byte("project=nile,department=marketing")
	s := f.encrypt(f.ks2, "/clear", keyClear, pt, aad)
	sealedByGo := gcm.Seal(nil, s.iv, pt, specAAD(aad, []byte("test-v1")))
	if !bytes.Equal(sealedByGo, append(append([]byte{}, s.ciphertext...), s.tag...)) {
		t.Fatal("the proxy's ciphertext and tag differ from Go's AES-GCM with the spec's AAD framing")
	}
}

// TestMigrationFromAWSSampleProxy decrypts a ciphertext made the way AWS's
// sample proxy makes it (SHA-256 of the AAD in the HSM AAD, a static
// ciphertextMetadata) through a key store with aad_framing aws_sample, and
// checks that such a key store encrypts the same way.
func TestMigrationFromAWSSampleProxy(t *testing.T) {
	f := newFixture(t)
	gcm := goGCM(t, f.token.KeyValue(t, keyClear))
	for _, tc := range []struct {
		name     string
		aad, md  []byte
		withMeta bool
	}{
		{"AAD and metadata", []byte("project=nile"), []byte("key_version=1"), true},
		{"AAD only", []byte("project=nile"), nil, false},
		{"neither", nil, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pt, iv := random(t, 48), random(t, 12)
			out := gcm.Seal(nil, iv, pt, sampleAAD(tc.aad, tc.md))
			s := sealed{ciphertext: out[:len(pt)], iv: iv, tag: out[len(pt):]}
			if tc.withMeta {
				s.metadata = tc.md
			}
			r := f.call(f.ks2, "/legacy/kms/xks/v1/keys/"+keyClear+"/decrypt", decryptBody(s, tc.aad))
			if r.status != http.StatusOK || !bytes.Equal(r.bytes(t, "plaintext"), pt) {
				t.Fatalf("decrypt of a sample-proxy ciphertext: %d %s", r.status, r.raw)
			}
			// The same ciphertext through a spec-framed key store must fail
			// when there is an AAD: the framings differ exactly there.
			if len(tc.aad) > 0 {
				expectError(t, f.call(f.ks2, "/clear/kms/xks/v1/keys/"+keyClear+"/decrypt", decryptBody(s, tc.aad)),
					http.StatusBadRequest, "InvalidCiphertextException")
			}
		})
	}
	pt, aad := random(t, 32), []byte("ctx")
	s := f.encrypt(f.ks2, "/legacy", keyClear, pt, aad)
	if _, err := gcm.Open(nil, s.iv, append(append([]byte{}, s.ciphertext...), s.tag...), sampleAAD(aad, s.metadata)); err != nil {
		t.Errorf("a ciphertext of the aws_sample key store does not open with the sample framing: %v", err)
	}
}

func TestErrorTable(t *testing.T) {
	f := newFixture(t)
	ok := f.ks1[0]
	wrongSecret := credential{ok.akid, newCredential(t).secret}
	pt, aad := random(t, 32), []byte("aad")
	good := f.encrypt(ok, "/ks1", keyBoth, pt, aad)
	flip := func(b []byte, i int) []byte {
		c := append([]byte{}, b...)
		c[i%len(c)] ^= 1
		return c
	}
	withCT, withTag, withIV, withMD := good, good, good, good
	withCT.ciphertext = flip(good.ciphertext, 3)
	withTag.tag = flip(good.tag, 0)
	withIV.iv = flip(good.iv, 5)
	withMD.metadata = []byte("test-v2")
	noMD := good
	noMD.metadata = nil
	keyPath := func(key, op string) string { return "/ks1/kms/xks/v1/keys/" + key + "/" + op }
	// An encrypt-only key encrypts; only the CDIV check, which decrypts,
	// makes it fail (see the table).
	if r := f.call(ok, keyPath(keyEncOnly, "encrypt"), encryptBody(pt, nil, false)); r.status != http.StatusOK {
		t.Errorf("encrypt with an encrypt-only key: %d %s", r.status, r.raw)
	}

	tests := []struct {
		name   string
		send   func() response
		status int
		error  string
	}{
		// 404 InvalidUriPathException, before authentication.
		{"unknown prefix, signed", func() response { return f.call(ok, "/nope/kms/xks/v1/health", healthBody) }, 404, "InvalidUriPathException"},
		{"unknown prefix, unsigned", func() response { return f.post("/nope/kms/xks/v1/health", healthBody) }, 404, "InvalidUriPathException"},
		{"test client's invalid path", func() response { return f.call(ok, "/ks1/invalid/kms/xks/v1/health", healthBody) }, 404, "InvalidUriPathException"},
		{"unknown operation", func() response { return f.call(ok, keyPath(keyBoth, "sign"), metaBody) }, 404, "InvalidUriPathException"},
		{"API version v2", func() response { return f.call(ok, "/ks1/kms/xks/v2/health", healthBody) }, 404, "InvalidUriPathException"},
		{"key id with a bad character", func() response { return f.call(ok, keyPath("k%21", "metadata"), metaBody) }, 404, "InvalidUriPathException"},
		// 405 for anything but POST on an API path.
		{"GET health", func() response { return f.send(ok, http.MethodGet, "/ks1/kms/xks/v1/health", "", region, time.Now()) }, 405, "ValidationException"},
		{"PUT encrypt", func() response {
			return f.send(ok, http.MethodPut, keyPath(keyBoth, "encrypt"), encryptBody(pt, nil, false), region, time.Now())
		}, 405, "ValidationException"},
		// 401 AuthenticationFailedException.
		{"unsigned", func() response { return f.post("/ks1/kms/xks/v1/health", healthBody) }, 401, "AuthenticationFailedException"},
		{"wrong secret", func() response { return f.call(wrongSecret, "/ks1/kms/xks/v1/health", healthBody) }, 401, "AuthenticationFailedException"},
		{"another key store's credential", func() response { return f.call(f.ks2, "/ks1/kms/xks/v1/health", healthBody) }, 401, "AuthenticationFailedException"},
		{"signed for another region", func() response {
			return f.send(ok, http.MethodPost, "/ks1/kms/xks/v1/health", healthBody, "eu-west-1", time.Now())
		}, 401, "AuthenticationFailedException"},
		{"signed 6 minutes ago", func() response {
			return f.send(ok, http.MethodPost, "/ks1/kms/xks/v1/health", healthBody, region, time.Now().Add(-6*time.Minute))
		}, 401, "AuthenticationFailedException"},
		// 400 ValidationException, health included.
		{"health with {}", func() response { return f.call(ok, "/ks1/kms/xks/v1/health", `{}`) }, 400, "ValidationException"},
		{"metadata with empty requestMetadata", func() response { return f.call(ok, keyPath(keyBoth, "metadata"), `{"requestMetadata":{}}`) }, 400, "ValidationException"},
		{"encrypt with bad Base64", func() response {
			return f.call(ok, keyPath(keyBoth, "encrypt"), `{`+cryptoMeta+`,"plaintext":"@@","encryptionAlgorithm":"AES_GCM"}`)
		}, 400, "ValidationException"},
		{"decrypt with a 13-byte IV", func() response {
			s := good
			s.iv = random(t, 13)
			return f.call(ok, keyPath(keyBoth, "decrypt"), decryptBody(s, aad))
		}, 400, "ValidationException"},
		// 404 KeyNotFoundException.
		{"key on the token but not allowed", func() response { return f.call(ok, keyPath(keyNotAllow, "metadata"), metaBody) }, 404, "KeyNotFoundException"},
		{"key allowed but not on the token", func() response { return f.call(ok, keyPath(keyMissing, "metadata"), metaBody) }, 404, "KeyNotFoundException"},
		{"key of another key store", func() response { return f.call(ok, keyPath(keyOtherKS, "encrypt"), encryptBody(pt, nil, false)) }, 404, "KeyNotFoundException"},
		// 400 InvalidKeyUsageException.
		{"encrypt with a decrypt-only key", func() response { return f.call(ok, keyPath(keyDecOnly, "encrypt"), encryptBody(pt, nil, false)) }, 400, "InvalidKeyUsageException"},
		{"decrypt with an encrypt-only key", func() response { return f.call(ok, keyPath(keyEncOnly, "decrypt"), decryptBody(good, aad)) }, 400, "InvalidKeyUsageException"},
		{"CDIV with an encrypt-only key", func() response { return f.call(ok, keyPath(keyEncOnly, "encrypt"), encryptBody(pt, nil, true)) }, 400, "InvalidKeyUsageException"},
		{"encrypt with a key of no usage", func() response { return f.call(ok, keyPath(keyNone, "encrypt"), encryptBody(pt, nil, false)) }, 400, "InvalidKeyUsageException"},
		{"encrypt with an AES-128 key", func() response { return f.call(ok, keyPath(keyAES128, "encrypt"), encryptBody(pt, nil, false)) }, 400, "InvalidKeyUsageException"},
		// 400 InvalidStateException.
		{"encrypt with a disabled key", func() response { return f.call(ok, keyPath(keyOff, "encrypt"), encryptBody(pt, nil, false)) }, 400, "InvalidStateException"},
		{"decrypt with a disabled key", func() response { return f.call(ok, keyPath(keyOff, "decrypt"), decryptBody(good, aad)) }, 400, "InvalidStateException"},
		// 400 InvalidCiphertextException.
		{"flipped ciphertext bit", func() response { return f.call(ok, keyPath(keyBoth, "decrypt"), decryptBody(withCT, aad)) }, 400, "InvalidCiphertextException"},
		{"wrong tag", func() response { return f.call(ok, keyPath(keyBoth, "decrypt"), decryptBody(withTag, aad)) }, 400, "InvalidCiphertextException"},
		{"wrong IV", func() response { return f.call(ok, keyPath(keyBoth, "decrypt"), decryptBody(withIV, aad)) }, 400, "InvalidCiphertextException"},
		{"wrong AAD", func() response { return f.call(ok, keyPath(keyBoth, "decrypt"), decryptBody(good, []byte("aaD"))) }, 400, "InvalidCiphertextException"},
		{"missing AAD", func() response { return f.call(ok, keyPath(keyBoth, "decrypt"), decryptBody(good, nil)) }, 400, "InvalidCiphertextException"},
		{"changed ciphertextMetadata", func() response { return f.call(ok, keyPath(keyBoth, "decrypt"), decryptBody(withMD, aad)) }, 400, "InvalidCiphertextException"},
		{"dropped ciphertextMetadata", func() response { return f.call(ok, keyPath(keyBoth, "decrypt"), decryptBody(noMD, aad)) }, 400, "InvalidCiphertextException"},
		{"metadata passed as AAD", func() response {
			s := noMD
			return f.call(ok, keyPath(keyBoth, "decrypt"), decryptBody(s, append(append([]byte{}, aad...), good.metadata...)))
		}, 400, "InvalidCiphertextException"},
		// 501 UnsupportedOperationException.
		{"body over the limit", func() response {
			return f.call(ok, keyPath(keyBoth, "encrypt"), encryptBody(random(t, 50000), nil, false))
		}, 501, "UnsupportedOperationException"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			expectError(t, tt.send(), tt.status, tt.error)
		})
	}
}

// post sends an unsigned POST.
func (f *fixture) post(path, body string) response {
	f.t.Helper()
	req, err := http.NewRequest(http.MethodPost, f.origin+path, strings.NewReader(body))
	if err != nil {
		f.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	return f.do(req)
}

func TestKeyStoresAreIsolated(t *testing.T) {
	f := newFixture(t)
	expectError(t, f.call(f.ks1[0], "/ks2/kms/xks/v1/health", healthBody), 401, "AuthenticationFailedException")
	expectError(t, f.call(f.ks2, "/ks1/kms/xks/v1/health", healthBody), 401, "AuthenticationFailedException")
	expectError(t, f.call(f.ks2, "/ks2/kms/xks/v1/keys/"+keyBoth+"/metadata", metaBody), 404, "KeyNotFoundException")
	if r := f.call(f.ks2, "/ks2/kms/xks/v1/keys/"+keyOtherKS+"/metadata", metaBody); r.status != http.StatusOK {
		t.Errorf("ks2's own key: %d %s", r.status, r.raw)
	}
}

func TestCredentialRotation(t *testing.T) {
	f := newFixture(t)
	old, next := f.ks1[0], newCredential(t)
	f.ks1 = []credential{old, next}
	f.load(2)
	for _, c := range []credential{old, next} {
		if r := f.call(c, "/ks1/kms/xks/v1/health", healthBody); r.status != http.StatusOK {
			t.Fatalf("during rotation, %s: %d %s", c.akid, r.status, r.raw)
		}
	}
	f.ks1 = []credential{next}
	f.load(3)
	expectError(t, f.call(old, "/ks1/kms/xks/v1/health", healthBody), 401, "AuthenticationFailedException")
	if r := f.call(next, "/ks1/kms/xks/v1/health", healthBody); r.status != http.StatusOK {
		t.Fatalf("after rotation: %d %s", r.status, r.raw)
	}
}

// TestReloadUnderLoad reloads the config five times while clients send
// Encrypt and Decrypt calls without pause: not one may fail, and the HSM
// login must survive every reload.
func TestReloadUnderLoad(t *testing.T) {
	f := newFixture(t)
	c := f.ks1[0]
	var (
		stop     atomic.Bool
		done     atomic.Int64
		failures atomic.Int64
		firstErr atomic.Value
		wg       sync.WaitGroup
	)
	for range 4 {
		wg.Go(func() {
			for !stop.Load() {
				if err := f.roundTrip(c); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
				done.Add(1)
			}
		})
	}
	defer func() { stop.Store(true); wg.Wait() }()
	awaitRoundTrips := func(n int64) { awaitCount(t, &done, n) }
	awaitRoundTrips(10)
	for i := range 5 {
		f.reload(10 + i) // not f.load: keep the connections the clients use
		if r := f.call(c, "/ks1/kms/xks/v1/health", healthBody); r.body["xksProxyFleetSize"] != float64(10+i) {
			t.Fatalf("reload %d not in effect: %s", i, r.raw)
		}
	}
	awaitRoundTrips(done.Load() + 10)
	stop.Store(true)
	wg.Wait()
	if failures.Load() > 0 {
		t.Fatalf("%d of %d round trips failed during reloads; first: %v", failures.Load(), done.Load(), firstErr.Load())
	}
	if done.Load() < 20 {
		t.Fatalf("only %d round trips ran", done.Load())
	}
	t.Logf("%d round trips, none failed, across 5 reloads", done.Load())
}

// awaitCount waits until done reaches n round trips of clients running in
// the background. Load is measured in round trips, not time: a slow machine
// runs fewer of them per second.
func awaitCount(t *testing.T, done *atomic.Int64, n int64) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for done.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("only %d round trips ran, want %d", done.Load(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// roundTrip encrypts and decrypts once; safe to call from any goroutine.
func (f *fixture) roundTrip(c credential) error {
	pt := make([]byte, 32)
	if _, err := rand.Read(pt); err != nil {
		return err
	}
	post := func(path, body string) (response, error) {
		r, err := f.try(c, path, body)
		if err == nil && r.status != http.StatusOK {
			err = fmt.Errorf("%s: %d %s", path, r.status, r.raw)
		}
		return r, err
	}
	enc, err := post("/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody(pt, nil, false))
	if err != nil {
		return err
	}
	body := fmt.Sprintf(`{%s,"ciphertext":%q,"initializationVector":%q,"authenticationTag":%q,"ciphertextMetadata":%q,"encryptionAlgorithm":"AES_GCM"}`,
		cryptoMeta, enc.str("ciphertext"), enc.str("initializationVector"), enc.str("authenticationTag"), enc.str("ciphertextMetadata"))
	dec, err := post("/ks1/kms/xks/v1/keys/"+keyBoth+"/decrypt", body)
	if err != nil {
		return err
	}
	if dec.str("plaintext") != base64.StdEncoding.EncodeToString(pt) {
		return errors.New("decrypt returned another plaintext")
	}
	return nil
}

// TestCurlSigV4 signs with curl's own SigV4 implementation (curl 7.75+),
// which signs content-type as well and keeps the port in the host header.
func TestCurlSigV4(t *testing.T) {
	curl := testenv.CurlWithSigV4(t)
	f := newFixture(t)
	c := f.ks1[0]
	run := func(path, body string) (int, string) {
		cmd := exec.Command(curl, "-sS", "--cacert", f.cert, "--aws-sigv4", "aws:amz:"+region+":kms-xks-proxy",
			"--user", c.akid+":"+c.secret, "-H", "Content-Type: application/json", "-d", body,
			"-w", "\n%{http_code}", f.origin+path)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("curl: %v\n%s", err, out)
		}
		body, code, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		n, _ := strconv.Atoi(code)
		return n, body
	}
	if code, body := run("/ks1/kms/xks/v1/health", healthBody); code != 200 || !strings.Contains(body, `"healthStatus":"ACTIVE"`) {
		t.Errorf("health via curl: %d %s", code, body)
	}
	pt := random(t, 64)
	if code, body := run("/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", encryptBody(pt, []byte("a"), true)); code != 200 || !strings.Contains(body, `"ciphertextDataIntegrityValue"`) {
		t.Errorf("encrypt via curl: %d %s", code, body)
	}
	c.secret = newCredential(t).secret
	if code, body := run("/ks1/kms/xks/v1/health", healthBody); code != 401 || !strings.Contains(body, "AuthenticationFailedException") {
		t.Errorf("curl with a wrong secret: %d %s", code, body)
	}
}

// TestBodyOfUndeclaredLength sends an Encrypt whose body has no declared
// length: chunked on HTTP/1.1, without content-length on HTTP/2. The
// handler reads a body of declared length as exactly that many bytes, and
// any other to its end, within max_request_body.
func TestBodyOfUndeclaredLength(t *testing.T) {
	f := newFixture(t)
	h2 := f.proxy.Client
	tr := h2.Transport.(*http.Transport).Clone()
	tr.ForceAttemptHTTP2 = false
	tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	tr.TLSClientConfig.NextProtos = []string{"http/1.1"}
	h1 := &http.Client{Timeout: h2.Timeout, Transport: tr}
	for _, tt := range []struct {
		name   string
		client *http.Client
		proto  int
	}{{"HTTP/2", h2, 2}, {"HTTP/1.1, chunked", h1, 1}} {
		t.Run(tt.name, func(t *testing.T) {
			send := func(body string) (int, string) {
				t.Helper()
				req, err := http.NewRequest(http.MethodPost, f.origin+"/ks1/kms/xks/v1/keys/"+keyBoth+"/encrypt", nil)
				if err != nil {
					t.Fatal(err)
				}
				req.Body, req.ContentLength = io.NopCloser(strings.NewReader(body)), -1
				req.Header.Set("Content-Type", "application/json")
				if err := signRequest(req, f.ks1[0], body, region, time.Now()); err != nil {
					t.Fatal(err)
				}
				f.remember([]byte(body))
				resp, err := tt.client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				if resp.ProtoMajor != tt.proto {
					t.Errorf("answered over HTTP/%d, want HTTP/%d", resp.ProtoMajor, tt.proto)
				}
				raw, err := io.ReadAll(resp.Body)
				if err != nil {
					t.Fatal(err)
				}
				return resp.StatusCode, string(raw)
			}
			if status, raw := send(encryptBody(random(t, 32), nil, false)); status != http.StatusOK || !strings.Contains(raw, `"ciphertext":`) {
				t.Errorf("encrypt with a body of undeclared length: %d %s", status, raw)
			}
			if status, raw := send(encryptBody(random(t, 50000), nil, false)); status != http.StatusNotImplemented || !strings.Contains(raw, `"UnsupportedOperationException"`) {
				t.Errorf("a body of undeclared length over the limit: %d %s", status, raw)
			}
		})
	}
}

// TestAuditLog checks the audit line of a call: who asked for what, how it
// ended and how long it took. (Every fixture also scans the whole log for
// the secrets, plaintexts and AADs its test used, at cleanup.)
func TestAuditLog(t *testing.T) {
	f := newFixture(t)
	pt, aad := random(t, 40), random(t, 40)
	f.encrypt(f.ks1[0], "/ks1", keyBoth, pt, aad)
	expectError(t, f.call(credential{f.ks1[0].akid, f.ks2.secret}, "/ks1/kms/xks/v1/health", healthBody), 401, "AuthenticationFailedException")
	logs, err := os.ReadFile(f.logFile)
	if err != nil {
		t.Fatal(err)
	}
	var encryptLine, authLine map[string]any
	for line := range bytes.SplitSeq(logs, []byte("\n")) {
		var entry map[string]any
		if json.Unmarshal(line, &entry) != nil || entry["logger"] != "http.handlers.xks.audit" {
			continue
		}
		switch {
		case entry["operation"] == "Encrypt" && entry["outcome"] == "ok":
			encryptLine = entry
		case entry["outcome"] == "AuthenticationFailedException":
			authLine = entry
		}
	}
	if encryptLine == nil || authLine == nil {
		t.Fatalf("audit lines missing from the log:\n%s", logs)
	}
	for field, want := range map[string]any{
		"kms_request_id": "req-crypto", "aws_principal_arn": "arn:aws:iam::111122223333:user/Alice",
		"kms_key_arn":   "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
		"kms_operation": "Encrypt", "kms_via_service": "ebs", "key_store": "/ks1/kms/xks/v1",
		"external_key_id": keyBoth, "access_key_id": f.ks1[0].akid,
	} {
		if encryptLine[field] != want {
			t.Errorf("audit %s = %v, want %v", field, encryptLine[field], want)
		}
	}
	for _, field := range []string{"hsm_time", "total_time"} {
		if _, ok := encryptLine[field].(float64); !ok {
			t.Errorf("audit line has no %s: %v", field, encryptLine)
		}
	}
	if authLine["access_key_id"] != f.ks1[0].akid || !strings.Contains(fmt.Sprint(authLine["reason"]), "signature") {
		t.Errorf("authentication failure line: %v", authLine)
	}
}
