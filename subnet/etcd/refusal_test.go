package etcd

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
)

// refused reads the network config with cfg and checks that etcd's refusal
// is an ErrRefused whose message, and the registry's status, say want.
func refused(t *testing.T, what string, cfg Config, want string) {
	t.Helper()
	lg, _ := testLogger(t)
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = time.Second
	}
	r, err := New(cfg, lg)
	if err != nil {
		t.Fatalf("%s: New: %v", what, err)
	}
	defer r.Close()
	_, err = r.GetNetworkConfig(ctx(t))
	if err == nil || !errors.Is(err, subnet.ErrRefused) || !strings.Contains(err.Error(), want) {
		t.Errorf("%s: %v\nwant a refusal saying %q", what, err, want)
	}
	if st := r.Status(); st.Connected || !strings.Contains(st.Detail, want) {
		t.Errorf("%s: status %+v", what, st)
	}
}

func TestTLSRefusalsSayWhatWasRefused(t *testing.T) {
	t.Parallel()
	files := etcdtest.NewTLSFiles(t)
	other := etcdtest.NewTLSFiles(t) // another CA, with its own client certificate
	s := etcdtest.New(t, etcdtest.Options{TLS: files.ServerTLS()})
	s.Start()
	prefix := testPrefix(t)
	putConfig(t, s.Client(), prefix, `{"Network":"198.18.0.0/16"}`)
	good := Config{Endpoints: []string{s.Endpoint()}, Prefix: prefix, CAFile: files.CA, CertFile: files.ClientCert, KeyFile: files.ClientKey, DialTimeout: time.Second}
	lg, _ := testLogger(t)
	r, err := New(good, lg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cfg, err := r.GetNetworkConfig(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.AcquireLease(ctx(t), cfg, attrs("192.0.2.1"), subnet.Allocation{}, time.Minute); err != nil {
		t.Fatal(err)
	}

	addr := strings.TrimPrefix(s.Endpoint(), "https://")
	noCert := good
	noCert.CertFile, noCert.KeyFile = "", ""
	refused(t, "no client certificate", noCert, "TLS with "+addr+": etcd requires a client certificate and none was given (--etcd-certfile and --etcd-keyfile)")
	wrongCA := good
	wrongCA.CAFile = other.CA
	refused(t, "server certificate from another CA", wrongCA, "TLS with "+addr+": etcd's certificate is not signed by a CA in "+other.CA+" (x509: certificate signed by unknown authority")
	foreignCert := good
	foreignCert.CertFile, foreignCert.KeyFile = other.ClientCert, other.ClientKey
	refused(t, "client certificate from another CA", foreignCert, "TLS with "+addr+": etcd refused the client certificate "+other.ClientCert+": remote error: tls: ")
	plain := Config{Endpoints: []string{"http://" + addr}, Prefix: prefix}
	refused(t, "plain http to a TLS server", plain, "etcd at http://"+addr+" speaks TLS: use https://")

	// TLS files with a plain endpoint would be ignored by the etcd client:
	// refused before any connection, naming the endpoint.
	mixed := good
	mixed.Endpoints = []string{s.Endpoint(), "http://" + addr}
	if _, err := New(mixed, lg); err == nil || !strings.Contains(err.Error(), "etcd endpoint http://"+addr+" is plain text, but TLS files are given") {
		t.Errorf("TLS files with an http:// endpoint: %v", err)
	}

	plainServer := etcdtest.Start(t)
	tlsToPlain := good
	tlsToPlain.Endpoints = []string{strings.Replace(plainServer.Endpoint(), "http://", "https://", 1)}
	refused(t, "https to a plain server", tlsToPlain, "etcd at "+tlsToPlain.Endpoints[0]+" does not speak TLS")
}

func TestAuthRefusalsSayWhatWasRefused(t *testing.T) {
	t.Parallel()
	prefix := testPrefix(t)
	s := etcdtest.New(t, etcdtest.Options{Auth: &etcdtest.Auth{Users: []etcdtest.User{
		{Name: tulleUser, Password: tullePassword, ReadWrite: []string{prefix + "/"}},
		{Name: "stranger", Password: "stranger-secret", ReadWrite: []string{"/elsewhere/"}},
	}}})
	s.Start()
	putConfig(t, s.Client(), prefix, `{"Network":"198.18.0.0/16"}`)
	base := Config{Endpoints: []string{s.Endpoint()}, Prefix: prefix}

	wrong := base
	wrong.Username, wrong.Password = tulleUser, "wrong"
	refused(t, "wrong password", wrong, "etcd refused the password for user tulle")
	stranger := base
	stranger.Username, stranger.Password = "stranger", "stranger-secret"
	refused(t, "user without permission", stranger, "permission denied for user stranger on "+prefix+"/config")
	refused(t, "no user", base, "etcd requires authentication and no user was given")

	// Start gives up after a few refusals, not after its start timeout.
	lg, logs := testLogger(t)
	r, err := New(wrong, lg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	m := subnet.NewManager(r, subnet.ManagerOptions{PublicIP: netip.MustParseAddr("192.0.2.1"), StartTimeout: time.Minute, Logger: lg})
	t0 := time.Now()
	_, _, err = m.Start(ctx(t))
	if !errors.Is(err, subnet.ErrRefused) || !strings.Contains(err.Error(), "start: refused 3 times: read network config "+prefix+"/config: etcd refused the password for user tulle") {
		t.Errorf("Start: %v", err)
	}
	if took := time.Since(t0); took > 5*time.Second {
		t.Errorf("Start took %s to give up on a wrong password", took)
	}
	if st := m.Status(); st.Phase != subnet.PhaseStartFailed {
		t.Errorf("phase %q", st.Phase)
	}
	if n := strings.Count(logs.String(), "etcd refused the password"); n < 2 || n > 3 {
		t.Errorf("%d refusals logged, want the attempts before giving up", n)
	}
}
