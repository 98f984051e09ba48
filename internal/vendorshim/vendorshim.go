// Package vendorshim builds a PKCS#11 module for tests that takes on the
// documented AES-GCM behaviour of a production HSM (nShield, CloudHSM, two
// Luna firmware generations) or of a module that answers the length query
// the way NSS softokn does, over a real module underneath (SoftHSM2). The
// cryptography stays real, so every ciphertext can be checked against Go's
// crypto/cipher. See csrc/vendorshim.c for each behaviour and its source;
// where no vendor source gives a behaviour, the file marks it ASSUMPTION,
// and an option (NShieldLoginRefusal, NShieldPrivateRefusal) lets a test
// show that the proxy does not depend on the assumed answer.
//
// The fault shim (package faultshim) stacks in front of it:
// faultshim.New(t, shim.Path).
package vendorshim

import (
	_ "embed"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/internal/testenv"
)

//go:embed csrc/vendorshim.c
var source []byte

// Source is the module's C source, for a program that builds it itself.
func Source() []byte { return source }

// Personality is a vendor behaviour and what the proxy must make of it.
type Personality struct {
	// Name is the VENDORSHIM_PERSONALITY value.
	Name string
	// IVMode is the iv mode that `iv auto` must pick.
	IVMode string
	// WrongIVMode is an explicit iv mode the start-up self-test must refuse.
	WrongIVMode string
	// Token is the label the module shows for the token, "" when it shows
	// the real token's own label.
	Token string
	// FakeLogin says the module needs CKNFAST_FAKE_ACCELERATOR_LOGIN for a
	// backend that logs in; such a module takes no_login too.
	FakeLogin bool
	// PrivateKeys is the private_keys setting the module needs.
	PrivateKeys bool
	// IVLen is the length of the IVs the module makes (12 or 16).
	IVLen int
	// MaxSessions is the session limit the module reports, or 0.
	MaxSessions int
}

// The personalities, as csrc/vendorshim.c describes them.
var (
	NShield = Personality{Name: "nshield", IVMode: "hsm", WrongIVMode: "caller", //nolint:gosec // G101: Token is a token label
		Token: "loadshared accelerator", FakeLogin: true, IVLen: 12}
	CloudHSM = Personality{Name: "cloudhsm", IVMode: "hsm", WrongIVMode: "caller",
		PrivateKeys: true, IVLen: 12, MaxSessions: DefaultCloudHSMSessions}
	LunaIgnoresIV = Personality{Name: "luna-ignores-iv", IVMode: "hsm_appended", WrongIVMode: "hsm",
		PrivateKeys: true, IVLen: 16}
	LunaRefusesIV = Personality{Name: "luna-refuses-iv", IVMode: "hsm_appended", WrongIVMode: "caller",
		PrivateKeys: true, IVLen: 16}
	StrictLength = Personality{Name: "strict-length", IVMode: "caller", WrongIVMode: "hsm",
		PrivateKeys: true, IVLen: 12}
)

// DefaultCloudHSMSessions is the cloudhsm personality's session limit.
const DefaultCloudHSMSessions = 16

// All lists every personality.
var All = []Personality{NShield, CloudHSM, LunaIgnoresIV, LunaRefusesIV, StrictLength}

// Shim is one built copy of the module. Each copy is its own library path,
// and so its own library in the hsm package's registry.
type Shim struct {
	Personality
	// Path is the module to open.
	Path string
}

// Option changes how New sets the module up.
type Option func(env map[string]string)

// Latency adds d to every C_Encrypt and C_Decrypt that produces output.
func Latency(d time.Duration) Option {
	return func(env map[string]string) { env["VENDORSHIM_LATENCY_US"] = strconv.FormatInt(d.Microseconds(), 10) }
}

// LatencyLog has the module keep a histogram of the delays Latency adds, as
// slept, in the file at path (VENDORSHIM_LATENCY_LOG in csrc/vendorshim.c
// says its layout; scripts/capacity.sh reads it).
func LatencyLog(path string) Option {
	return func(env map[string]string) { env["VENDORSHIM_LATENCY_LOG"] = path }
}

// NShieldLoginRefusal makes the nshield personality refuse C_Login
// without CKNFAST_FAKE_ACCELERATOR_LOGIN with code instead of
// CKR_USER_PIN_NOT_INITIALIZED, which is an assumption: nShield's own code
// is not documented.
func NShieldLoginRefusal(code uint) Option {
	return func(env map[string]string) {
		env["VENDORSHIM_NSHIELD_LOGIN_CKR"] = "0x" + strconv.FormatUint(uint64(code), 16)
	}
}

// NShieldPrivateRefusal makes the nshield personality refuse a template
// with CKA_PRIVATE true with code instead of CKR_ATTRIBUTE_VALUE_INVALID,
// which is an assumption: Entrust documents the refusal, not its code.
func NShieldPrivateRefusal(code uint) Option {
	return func(env map[string]string) {
		env["VENDORSHIM_NSHIELD_PRIVATE_CKR"] = "0x" + strconv.FormatUint(uint64(code), 16)
	}
}

// Build compiles the module into dir with cc and returns its path.
func Build(t testing.TB, dir string) string {
	t.Helper()
	cc := testenv.CC(t)
	src := filepath.Join(dir, "vendorshim.c")
	if err := os.WriteFile(src, source, 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "vendorshim.so")
	out, err := exec.Command(cc, "-shared", "-fPIC", "-O1", "-Wall", "-o", path, src, "-ldl", "-lpthread").CombinedOutput()
	if err != nil {
		t.Fatalf("building vendor shim: %v\n%s", err, out)
	}
	return path
}

// New builds a copy of the module with personality p over target (the real
// module), showing only the token labelled token, and sets the environment
// it reads when it is loaded: open it only after New. With FakeLogin it also
// sets CKNFAST_FAKE_ACCELERATOR_LOGIN, as an nShield deployment whose
// backend keeps a pin line does.
func New(t testing.TB, p Personality, target, token string, opts ...Option) *Shim {
	t.Helper()
	s := &Shim{Personality: p, Path: Build(t, t.TempDir())}
	env := map[string]string{
		"VENDORSHIM_PERSONALITY":  p.Name,
		"VENDORSHIM_TARGET":       target,
		"VENDORSHIM_TOKEN":        token,
		"VENDORSHIM_LATENCY_US":   "0",
		"VENDORSHIM_LATENCY_LOG":  "",
		"VENDORSHIM_MAX_SESSIONS": strconv.Itoa(DefaultCloudHSMSessions),
		// The assumed codes, unless an option sets others.
		"VENDORSHIM_NSHIELD_LOGIN_CKR":   "",
		"VENDORSHIM_NSHIELD_PRIVATE_CKR": "",
	}
	if p.FakeLogin {
		env["CKNFAST_FAKE_ACCELERATOR_LOGIN"] = "1"
	}
	for _, o := range opts {
		o(env)
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
	return s
}

// TokenLabel is the label a backend names: the module's own, or the real
// token's.
func (s *Shim) TokenLabel(real string) string {
	if s.Token != "" {
		return s.Token
	}
	return real
}
