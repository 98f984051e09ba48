package tlscheck

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// The mTLS tests run a real Caddy in this process (internal/proxytest) with
// a client_auth policy that uses the xks_subject verifier, and make real TLS
// handshakes from Go clients on loopback, on ports the kernel picked.

const mtlsSite = `
localhost:%[1]d {
	tls %[2]s %[3]s {
		client_auth {
			mode %[6]s
			trust_pool file %[4]s
			verifier xks_subject %[5]s
		}
	}
	respond "xks ok" 200
}
`

// mtlsServer is a running Caddy that asks for client certificates, in a
// client_auth mode, from clientCA with CN kmsUSEast1.
type mtlsServer struct {
	port        int
	serverRoots *x509.CertPool
	clientCA    *testCA
}

func startMTLSServer(t *testing.T, mode string) *mtlsServer {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a Caddy server")
	}
	dir := t.TempDir()
	serverCA := newRootCA(t, "XKS test server CA")
	serverCert, serverKey := serverCA.leaf(t, leafSpec{cn: "localhost", dnsNames: []string{"localhost"}, usage: x509.ExtKeyUsageServerAuth})
	certFile := writePEM(t, dir, "server.pem", []*x509.Certificate{serverCert}, nil)
	keyFile := writePEM(t, dir, "server-key.pem", nil, serverKey)
	clientCA := newRootCA(t, "Amazon Root CA test")
	clientCAFile := writePEM(t, dir, "client-ca.pem", []*x509.Certificate{clientCA.cert}, nil)

	p := proxytest.New(t)
	p.Load(p.Global("") + fmt.Sprintf(mtlsSite, p.HTTPSPort, certFile, keyFile, clientCAFile, kmsUSEast1, mode))

	roots := x509.NewCertPool()
	roots.AddCert(serverCA.cert)
	return &mtlsServer{port: p.HTTPSPort, serverRoots: roots, clientCA: clientCA}
}

// get makes one HTTPS request on a fresh connection with the given client
// certificate (none if cert is nil) and TLS version. It returns the response
// body, or the error of the handshake or of reading the response.
func (s *mtlsServer) get(cert *x509.Certificate, key crypto.Signer, version uint16) (string, error) {
	cfg := &tls.Config{
		ServerName: "localhost",
		RootCAs:    s.serverRoots,
		MinVersion: version,
		MaxVersion: version,
	}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}
	}
	dialer := &net.Dialer{Timeout: time.Minute}
	conn, err := tls.DialWithDialer(dialer, "tcp", fmt.Sprintf("127.0.0.1:%d", s.port), cfg)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Minute))
	// In TLS 1.3 the client's handshake is over before the server has
	// looked at the client certificate: the server's verdict arrives as an
	// alert on the first read.
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"); err != nil {
		return "", err
	}
	resp, err := io.ReadAll(conn)
	if err != nil {
		return "", err
	}
	if i := strings.Index(string(resp), "\r\n\r\n"); i >= 0 {
		return strings.SplitN(string(resp), "\r\n", 2)[0] + " " + string(resp[i+4:]), nil
	}
	return string(resp), nil
}

func TestMTLSHandshake(t *testing.T) {
	s := startMTLSServer(t, "require_and_verify")
	otherCA := newRootCA(t, "Amazon Root CA test") // same name, different key
	client := func(ca *testCA, spec leafSpec) (*x509.Certificate, crypto.Signer) {
		spec.usage = x509.ExtKeyUsageClientAuth
		return ca.leaf(t, spec)
	}
	good, goodKey := client(s.clientCA, leafSpec{cn: kmsUSEast1})
	wrongCN, wrongCNKey := client(s.clientCA, leafSpec{cn: "cks.kms.us-west-2.amazonaws.com"})
	sanOnly, sanOnlyKey := client(s.clientCA, leafSpec{cn: "client.example.com", dnsNames: []string{kmsUSEast1}})
	wrongCA, wrongCAKey := client(otherCA, leafSpec{cn: kmsUSEast1})
	expired, expiredKey := client(s.clientCA, leafSpec{cn: kmsUSEast1, expired: true})

	tests := []struct {
		name string
		cert *x509.Certificate
		key  crypto.Signer
		// alert is the TLS alert the server must end the handshake with,
		// per TLS version; empty means the request must succeed.
		alert13, alert12 string
	}{
		{name: "KMS's CN from the configured CA is served", cert: good, key: goodKey},
		{name: "another CN from the configured CA is refused", cert: wrongCN, key: wrongCNKey,
			alert13: "bad certificate", alert12: "bad certificate"},
		{name: "KMS's name in a SAN only is refused", cert: sanOnly, key: sanOnlyKey,
			alert13: "bad certificate", alert12: "bad certificate"},
		{name: "KMS's CN from another CA is refused", cert: wrongCA, key: wrongCAKey,
			alert13: "unknown certificate authority", alert12: "unknown certificate authority"},
		{name: "an expired certificate is refused", cert: expired, key: expiredKey,
			alert13: "expired certificate", alert12: "expired certificate"},
		{name: "no certificate is refused",
			alert13: "certificate required", alert12: "handshake failure"},
	}
	for _, tt := range tests {
		for _, v := range []struct {
			name    string
			version uint16
			alert   string
		}{{"TLS 1.3", tls.VersionTLS13, tt.alert13}, {"TLS 1.2", tls.VersionTLS12, tt.alert12}} {
			t.Run(tt.name+"/"+v.name, func(t *testing.T) {
				body, err := s.get(tt.cert, tt.key, v.version)
				if v.alert == "" {
					if err != nil {
						t.Fatalf("refused: %v", err)
					}
					if want := "HTTP/1.1 200 OK xks ok"; body != want {
						t.Fatalf("response %q, want %q", body, want)
					}
					return
				}
				if err == nil {
					t.Fatalf("the handshake succeeded and the server answered %q", body)
				}
				if want := "remote error: tls: " + v.alert; !strings.Contains(err.Error(), want) {
					t.Fatalf("error %q, want the server's alert %q", err, want)
				}
			})
		}
	}
}

// TestMTLSHTTPClient checks the good case the way an HTTP client sees it,
// including connection reuse.
func TestMTLSHTTPClient(t *testing.T) {
	s := startMTLSServer(t, "require_and_verify")
	cert, key := s.clientCA.leaf(t, leafSpec{cn: kmsUSEast1, usage: x509.ExtKeyUsageClientAuth})
	client := &http.Client{
		Timeout: time.Minute,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{
				RootCAs:      s.serverRoots,
				Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}},
			},
		},
	}
	defer client.CloseIdleConnections()
	for i := range 2 {
		resp, err := client.Get(fmt.Sprintf("https://localhost:%d/", s.port))
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(body) != "xks ok" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
		}
	}
}

// TestMTLSWithoutChainVerification configures the verifier where Caddy does
// not verify the chain (mode require): it must refuse even KMS's
// certificate, since the name alone proves nothing.
func TestMTLSWithoutChainVerification(t *testing.T) {
	s := startMTLSServer(t, "require")
	cert, key := s.clientCA.leaf(t, leafSpec{cn: kmsUSEast1, usage: x509.ExtKeyUsageClientAuth})
	body, err := s.get(cert, key, tls.VersionTLS13)
	if err == nil {
		t.Fatalf("the handshake succeeded and the server answered %q", body)
	}
	if want := "remote error: tls: "; !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q, want a TLS alert from the server", err)
	}
}
