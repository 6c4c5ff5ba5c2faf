package daemon

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
)

// TestDaemonExitsWith2WhenEtcdRefusesIt: a refusal (password, permission,
// certificates, TLS flags with a plain endpoint) is a configuration error:
// said as such, after a few attempts at most, exit status 2, which the
// systemd unit does not restart.
func TestDaemonExitsWith2WhenEtcdRefusesIt(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	authEtcd := etcdtest.New(t, etcdtest.Options{Auth: &etcdtest.Auth{Users: []etcdtest.User{
		{Name: "tulle", Password: "tulle-secret", ReadWrite: []string{subnet.DefaultPrefix + "/"}},
		{Name: "stranger", Password: "stranger-secret", ReadWrite: []string{"/elsewhere/"}},
	}}})
	authEtcd.Start()
	putConfig(t, authEtcd.Client(), networkJSON)
	files, other := etcdtest.NewTLSFiles(t), etcdtest.NewTLSFiles(t)
	tlsEtcd := etcdtest.New(t, etcdtest.Options{TLS: files.ServerTLS()})
	tlsEtcd.Start()
	putConfig(t, tlsEtcd.Client(), networkJSON)
	plainTLS := "http://" + strings.TrimPrefix(tlsEtcd.Endpoint(), "https://")

	for _, tc := range []struct {
		name, endpoint string
		args           []string
		want           string
	}{
		{"wrong password", authEtcd.Endpoint(), []string{"--etcd-username=tulle", "--etcd-password=wrong"},
			"etcd refused the password for user tulle"},
		{"user without permission", authEtcd.Endpoint(), []string{"--etcd-username=stranger", "--etcd-password=stranger-secret"},
			"permission denied for user stranger on /coreos.com/network/config"},
		{"server certificate from another CA", tlsEtcd.Endpoint(), []string{"--etcd-cafile=" + other.CA, "--etcd-certfile=" + files.ClientCert, "--etcd-keyfile=" + files.ClientKey},
			"etcd's certificate is not signed by a CA in " + other.CA},
		{"no client certificate", tlsEtcd.Endpoint(), []string{"--etcd-cafile=" + files.CA},
			"etcd requires a client certificate and none was given"},
		{"TLS files with an http endpoint", plainTLS, []string{"--etcd-cafile=" + files.CA},
			"etcd endpoint " + plainTLS + " is plain text, but TLS files are given"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t0 := time.Now()
			r := startDaemon(t, tc.endpoint, filepath.Join(t.TempDir(), "subnet.env"), tc.args...)
			err := r.wait(t, 20*time.Second)
			took := time.Since(t0)
			if ExitCode(err) != ExitUsage || !strings.Contains(fmt.Sprint(err), tc.want) {
				t.Fatalf("Run gave %v (exit %d), want exit 2 saying %q", err, ExitCode(err), tc.want)
			}
			if took > 10*time.Second {
				t.Errorf("gave up after %s: a refusal must not be waited out like an unreachable etcd", took.Round(time.Millisecond))
			}
			t.Logf("exit 2 after %s: %v", took.Round(time.Millisecond), err)
		})
	}
}
