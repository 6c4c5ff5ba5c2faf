package tests

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
	"github.com/tulle-net/tulle/tests/testcert"
)

// TestTulledRidesOutAnEtcdLeaderKillWithTLSAndPassword is issue 9 §5 on
// real tulleds: a 3-member etcd cluster that wants client certificates and
// a password; two tulleds carry traffic, one renewing a short lease. The
// leader is killed (SIGKILL): pings go on, the lease is renewed by the
// other members, changes keep arriving, a host that joins afterwards is
// reachable. A tulled given a wrong CA or password says so and exits 2.
func TestTulledRidesOutAnEtcdLeaderKillWithTLSAndPassword(t *testing.T) {
	const ttl = 6 * time.Second // renewed every 3s
	b := authBed(t, testbed.Options{Hosts: 2, Etcd: testbed.EtcdOptions{Members: 3, TLS: true}})
	ctx := testCtx(t, 3*time.Minute)
	if err := b.WriteNetworkConfig(ctx, testbed.DefaultNetworkConfig); err != nil {
		t.Fatal(err)
	}
	auth := authArgs(t)
	h1, h2 := b.Host(1), b.Host(2)
	for _, h := range []*testbed.Host{h1, h2} {
		args := auth
		if h == h1 {
			args = append(append([]string{}, auth...), "--subnet-lease-ttl", ttl.String())
		}
		if _, err := h.StartTulled(ctx, args...); err != nil {
			t.Fatal(err)
		}
		if _, err := h.SetupContainer(ctx); err != nil {
			t.Fatal(err)
		}
	}
	c1, c2 := container(t, b, 1), container(t, b, 2)
	reach(t, ctx, c1, c2, 1)
	pids := []int{h1.Tulled().Pid(), h2.Tulled().Pid()}

	// 120 pings, 0.1s apart, across the kill.
	pinged := make(chan testbed.PingResult, 1)
	go func() {
		r, _ := c1.Ping(ctx, c2.Addr, 120, "-i", "0.1")
		pinged <- r
	}()
	time.Sleep(3 * time.Second) // the kill falls inside the pings
	leader, err := b.EtcdLeader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.KillEtcdMember(leader); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()

	// A change made now reaches host 1's watch; its lease is renewed.
	put := make(chan error, 1)
	var written time.Duration
	go func() {
		// A write proposed during the election can time out ("request
		// timed out, possibly due to previous leader failure", after about
		// 7s): a writer tries again, as tulled does.
		var err error
		for try := 0; try < 5; try++ {
			if _, err = b.PutFlannelLease(ctx, netip.MustParsePrefix("198.18.250.0/24"), netip.MustParseAddr("192.0.2.240"), 0); err == nil {
				break
			}
		}
		written = time.Since(killed)
		put <- err
	}()
	var watched, renewed time.Duration
	for watched == 0 || renewed == 0 {
		if time.Since(killed) > 30*time.Second {
			t.Fatalf("%s after the leader was killed: host 1 watched a new lease after %s, renewed its %s lease after %s (0: not yet)",
				time.Since(killed).Round(time.Millisecond), watched, ttl, renewed)
		}
		if m, err := h1.Scrape(ctx); err == nil {
			if watched == 0 && m.Value("tulle_peers") == 2 {
				watched = time.Since(killed)
			}
			if renewed == 0 && m.Value("tulle_lease_expiry_timestamp_seconds") > float64(killed.Add(ttl).UnixNano())/1e9 {
				renewed = time.Since(killed)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := <-put; err != nil {
		t.Fatal(err)
	}
	r := <-pinged
	t.Logf("leader e%d killed: host 1 renewed its lease %s after; a lease etcd confirmed %s after was watched at %s; pings: %d of %d answered",
		leader, renewed.Round(time.Millisecond), written.Round(time.Millisecond), watched.Round(time.Millisecond), r.Received, r.Sent)
	if renewed > ttl {
		t.Errorf("host 1 renewed its %s lease only %s after the leader was killed", ttl, renewed.Round(time.Millisecond))
	}
	if r.Sent < 100 || r.Received != r.Sent {
		t.Errorf("pings across the leader kill: %d of %d answered, want all:\n%s", r.Received, r.Sent, r.Output)
	}

	// A host that joins now is reachable from both.
	joinHost(t, ctx, b, "the leader kill", []*testbed.Node{c1, c2}, auth...)
	for i, h := range []*testbed.Host{h1, h2} {
		if h.Tulled().Pid() != pids[i] {
			t.Errorf("tulled on %s was restarted", h.Name)
		}
		if code, body, err := h.Tulled().Get(ctx, "/readyz"); err != nil || code != 200 {
			t.Errorf("host %s not ready after the leader kill: %d %q %v", h.Name, code, body, err)
		}
	}
	if err := b.StartEtcdMember(ctx, leader); err != nil {
		t.Fatal(err)
	}

	// Wrong CA, wrong password: said, and exit 2 (the unit does not
	// restart it).
	other, err := testcert.Write(t.TempDir(), "another CA")
	if err != nil {
		t.Fatal(err)
	}
	h4, err := b.AddHost(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--etcd-username", etcdUser, "--etcd-password-file", passwordFile(t, "wrong")}, "etcd refused the password for user tulle"},
		{append([]string{"--etcd-cafile", other.CA}, auth...), "etcd's certificate is not signed by a CA in " + other.CA},
	} {
		tl, err := h4.LaunchTulled(ctx, tc.args...)
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-tl.Exited():
		case <-time.After(20 * time.Second):
			t.Fatalf("tulled with %v still runs after 20s; log:\n%s", tc.args, tl.LogTail(20))
		}
		if log := tl.LogTail(5); tl.ExitCode() != 2 || !strings.Contains(log, tc.want) {
			t.Errorf("tulled with %v: exit %d, want 2 saying %q; log:\n%s", tc.args, tl.ExitCode(), tc.want, log)
		}
	}
}
