package etcdtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/pem"
	"net"
	"os"
	"testing"

	"github.com/tulle-net/tulle/tests/testcert"
	"go.etcd.io/etcd/client/pkg/v3/transport"
)

// TLSFiles are PEM files of a test CA, a server certificate for 127.0.0.1
// and a client certificate, all signed by the CA.
type TLSFiles struct {
	CA                    string
	ServerCert, ServerKey string
	ClientCert, ClientKey string
}

// ServerTLS is the TLSInfo for Options.TLS: https with client
// certificates required.
func (f TLSFiles) ServerTLS() *transport.TLSInfo {
	return &transport.TLSInfo{
		CertFile:       f.ServerCert,
		KeyFile:        f.ServerKey,
		TrustedCAFile:  f.CA,
		ClientCertAuth: true,
		ClientCertFile: f.ClientCert,
		ClientKeyFile:  f.ClientKey,
	}
}

// NewTLSFiles writes a fresh CA, server and client certificate into a
// temporary directory.
func NewTLSFiles(t testing.TB) TLSFiles {
	t.Helper()
	f, err := testcert.Write(t.TempDir(), "tulle test CA", net.IPv4(127, 0, 0, 1))
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	return TLSFiles(f)
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("etcdtest: key: %v", err)
	}
	return k
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
}
