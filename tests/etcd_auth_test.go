package tests

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
	"github.com/tulle-net/tulle/tests/testbed"
)

const (
	etcdUser     = "tulle"
	etcdPassword = "tulle-secret"
)

// passwordFile writes password alone into a root-only file, as the
// systemd unit's setup does, and returns its path.
func passwordFile(t *testing.T, password string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "etcd-password")
	if err := os.WriteFile(p, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// authArgs are tulled's flags to log in as the user tulle, with the
// password in a file.
func authArgs(t *testing.T) []string {
	return []string{"--etcd-username", etcdUser, "--etcd-password-file", passwordFile(t, etcdPassword)}
}

// authBed is a bed whose etcd has authentication on, with the user tulle
// allowed to read and write flannel's prefix only.
func authBed(t *testing.T, opts testbed.Options) *testbed.Bed {
	t.Helper()
	opts.Etcd.Users = []testbed.EtcdUser{{Name: etcdUser, Password: etcdPassword, ReadWrite: []string{testbed.DefaultEtcdPrefix + "/"}}}
	return testbed.NewT(t, opts)
}

// TestPasswordAuthSurvivesAnEtcdRestart is issue 13's report on Debian's
// etcd 3.4: two tulleds with a password, a third host comes and goes, etcd
// restarts. The first two must keep renewing and see a host that joins
// afterwards, without a restart of their own.
func TestPasswordAuthSurvivesAnEtcdRestart(t *testing.T) {
	const ttl = 20 * time.Second
	b := authBed(t, testbed.Options{Hosts: 2, Etcd: testbed.EtcdOptions{Binary: etcdtest.Executable(t)}})
	ctx := testCtx(t, 3*time.Minute)
	if err := b.WriteNetworkConfig(ctx, testbed.DefaultNetworkConfig); err != nil {
		t.Fatal(err)
	}
	auth := append(authArgs(t), "--subnet-lease-ttl", ttl.String())
	if err := b.StartAll(ctx, auth...); err != nil {
		t.Fatal(err)
	}
	h1, h2 := b.Host(1), b.Host(2)
	pids := []int{h1.Tulled().Pid(), h2.Tulled().Pid()}
	reach(t, ctx, container(t, b, 1), container(t, b, 2), 1)

	// A third host starts and stops: ordinary writes.
	h3, err := b.AddHost(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h3.StartTulled(ctx, auth...); err != nil {
		t.Fatal(err)
	}
	if err := h3.Tulled().Stop(); err != nil {
		t.Fatal(err)
	}

	if err := b.StopEtcd(); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	if err := b.StartEtcd(ctx); err != nil {
		t.Fatal(err)
	}

	// Renewals go on: each host's lease expiry moves past what a renewal
	// before the stop could give (they renew every TTL/2).
	for _, h := range []*testbed.Host{h1, h2} {
		if _, took, err := waitMetric(t, ctx, h, ttl, func(v float64) bool { return v > float64(stopped.Add(ttl).UnixNano())/1e9 },
			"tulle_lease_expiry_timestamp_seconds"); err != nil {
			t.Errorf("host %s did not renew its lease after the etcd restart: %v", h.Name, err)
		} else {
			t.Logf("host %s renewed within %v of etcd being back", h.Name, took.Round(100*time.Millisecond))
		}
	}

	// A host that joins later is reachable from both.
	took := joinHost(t, ctx, b, "the etcd restart", []*testbed.Node{container(t, b, 1), container(t, b, 2)}, auth...)
	t.Logf("the host that joined after the restart was reachable from both %v after it was ready", took.Round(time.Millisecond))
	for i, h := range []*testbed.Host{h1, h2} {
		if got := h.Tulled().Pid(); got != pids[i] {
			t.Errorf("tulled on %s was restarted (pid %d, was %d)", h.Name, got, pids[i])
		}
		select {
		case <-h.Tulled().Exited():
			t.Errorf("tulled on %s exited: %s", h.Name, h.Tulled().LogTail(20))
		default:
		}
	}
}
