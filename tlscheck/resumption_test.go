package tlscheck

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-xks/caddy-xks/internal/proxytest"
)

// Go does not call VerifyPeerCertificate on a resumed TLS session. Were the
// xks_subject check run from there, a client could skip it with a session
// ticket that another connection policy of the same server issued (one
// with client authentication of another CN, or none). Caddy closes that
// twice: a connection policy with client authentication issues and accepts
// no session tickets, and it runs its verifiers from VerifyConnection, which
// Go calls on resumed sessions too. These tests hold Caddy to both.

// resumptionSites are two sites on one port with one certificate: the mTLS
// site localhost (KMS's CN required) and plain.localhost, which asks for no
// client certificate and so issues session tickets.
const resumptionSites = `
localhost:%[1]d {
	tls %[2]s %[3]s {
		client_auth {
			mode require_and_verify
			trust_pool file %[4]s
			verifier xks_subject %[5]s
		}
	}
	respond "mtls" 200
}

plain.localhost:%[1]d {
	tls %[2]s %[3]s
	respond "plain" 200
}
`

// anySession is a client session cache that offers its one session to any
// server name: what an attacker's client would do.
type anySession struct {
	mu sync.Mutex
	cs *tls.ClientSessionState
}

func (c *anySession) Get(string) (*tls.ClientSessionState, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cs, c.cs != nil
}

func (c *anySession) Put(_ string, cs *tls.ClientSessionState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cs != nil {
		c.cs = cs
	}
}

func TestSessionTicketCannotSkipTheSubjectCheck(t *testing.T) {
	dir := t.TempDir()
	serverCA := newRootCA(t, "XKS test server CA")
	serverCert, serverKey := serverCA.leaf(t, leafSpec{cn: "localhost", dnsNames: []string{"localhost", "plain.localhost"}, usage: x509.ExtKeyUsageServerAuth})
	certFile := writePEM(t, dir, "server.pem", []*x509.Certificate{serverCert}, nil)
	keyFile := writePEM(t, dir, "server-key.pem", nil, serverKey)
	clientCA := newRootCA(t, "Amazon Root CA test")
	clientCAFile := writePEM(t, dir, "client-ca.pem", []*x509.Certificate{clientCA.cert}, nil)
	p := proxytest.New(t)
	p.Load(p.Global("") + fmt.Sprintf(resumptionSites, p.HTTPSPort, certFile, keyFile, clientCAFile, kmsUSEast1))
	roots := x509.NewCertPool()
	roots.AddCert(serverCA.cert)
	otherCN, otherKey := clientCA.leaf(t, leafSpec{cn: "cks.kms.eu-west-1.amazonaws.com", usage: x509.ExtKeyUsageClientAuth})
	kms, kmsKey := clientCA.leaf(t, leafSpec{cn: kmsUSEast1, usage: x509.ExtKeyUsageClientAuth})

	// get makes a request on a new connection; the session cache carries
	// tickets between connections.
	get := func(version uint16, serverName string, cache tls.ClientSessionCache, cert *x509.Certificate, key any) (string, bool, error) {
		cfg := &tls.Config{ServerName: serverName, RootCAs: roots, MinVersion: version, MaxVersion: version, ClientSessionCache: cache}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}
		}
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: time.Minute}, "tcp", fmt.Sprintf("127.0.0.1:%d", p.HTTPSPort), cfg)
		if err != nil {
			return "", false, err
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(time.Minute))
		if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", serverName); err != nil {
			return "", false, err
		}
		body, err := io.ReadAll(conn) // also reads the TLS 1.3 session tickets
		return string(body), conn.ConnectionState().DidResume, err
	}

	for _, version := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			// The mTLS site issues no ticket, even to KMS.
			own := &anySession{}
			if _, _, err := get(version, "localhost", own, kms, kmsKey); err != nil {
				t.Fatalf("KMS's certificate: %v", err)
			}
			if own.cs != nil {
				t.Error("the mTLS site issued a session ticket")
			}
			// A ticket from the other site, for a client with another CN or
			// none, does not open the mTLS site.
			for _, cert := range []*x509.Certificate{otherCN, nil} {
				stolen := &anySession{}
				var key any
				if cert != nil {
					key = otherKey
				}
				if _, _, err := get(version, "plain.localhost", stolen, cert, key); err != nil {
					t.Fatalf("the plain site: %v", err)
				}
				if stolen.cs == nil {
					t.Fatal("the plain site issued no session ticket: the test proves nothing")
				}
				body, resumed, err := get(version, "localhost", stolen, nil, nil)
				if err == nil && (resumed || strings.HasSuffix(body, "mtls")) {
					t.Fatalf("a session ticket of the plain site opened the mTLS site (resumed %v): %q", resumed, body)
				}
			}
		})
	}
}
