package natsconn

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/internal/testnats"
)

// testPKI writes a CA, a server certificate for 127.0.0.1 and a client
// certificate, all signed by the CA, and returns their paths.
type testPKI struct{ ca, srvCert, srvKey, cliCert, cliKey string }

func newTestPKI(t *testing.T) testPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "nexd test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	leaf := func(name string, serial int64, usage x509.ExtKeyUsage) (string, string) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalECPrivateKey(k)
		return write(name+".pem", "CERTIFICATE", der), write(name+"-key.pem", "EC PRIVATE KEY", kder)
	}
	p := testPKI{ca: write("ca.pem", "CERTIFICATE", caDER)}
	p.srvCert, p.srvKey = leaf("server", 2, x509.ExtKeyUsageServerAuth)
	p.cliCert, p.cliKey = leaf("client", 3, x509.ExtKeyUsageClientAuth)
	return p
}

func TestTLS(t *testing.T) {
	pki := newTestPKI(t)
	for _, first := range []bool{false, true} {
		name := "info first"
		if first {
			name = "handshake first"
		}
		t.Run(name, func(t *testing.T) {
			s := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) {
				tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: pki.srvCert, KeyFile: pki.srvKey, CaFile: pki.ca, Verify: true})
				if err != nil {
					t.Fatal(err)
				}
				o.TLSConfig = tc
				o.TLSVerify = true
				o.TLSHandshakeFirst = first
			}})
			c := connect(t, Options{Servers: []string{s.ClientURL()}, TLSCert: pki.cliCert, TLSKey: pki.cliKey, TLSCA: pki.ca, TLSFirst: first})
			roundTrip(t, c.NC)
			if !c.NC.TLSRequired() {
				t.Error("connection is not TLS")
			}
			// Without a client certificate the server refuses us, at once.
			_, err := Connect(ctxT(t), Options{Servers: []string{s.ClientURL()}, TLSCA: pki.ca, TLSFirst: first}, nil)
			if err == nil || strings.Contains(err.Error(), "gave up") || !strings.Contains(err.Error(), "certificate required") {
				t.Errorf("without a client certificate: error %v, want an immediate TLS refusal", err)
			}
			// A server certificate from an unknown CA is refused at once too.
			_, err = Connect(ctxT(t), Options{Servers: []string{s.ClientURL()}, TLSCert: pki.cliCert, TLSKey: pki.cliKey, TLSFirst: first}, nil)
			if err == nil || strings.Contains(err.Error(), "gave up") {
				t.Errorf("unknown server CA: error %v, want an immediate TLS error", err)
			}
		})
	}
}
