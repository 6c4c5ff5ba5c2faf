package etcd

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// restartFromSubnetEnv writes subnet.env for the lease l1 that r1 holds
// (in network cfg), lets the host go without renewing until its key
// expired, and starts a new host from that subnet.env; it returns the new
// host's lease.
func restartFromSubnetEnv(t *testing.T, s *etcdtest.Server, c *clientv3.Client, prefix string, r1 *Registry, cfg *subnet.Config, l1 subnet.Lease) subnet.Lease {
	t.Helper()
	envPath := filepath.Join(t.TempDir(), "subnet.env")
	if err := subnet.WriteEnv(envPath, subnet.Env{Network: cfg.Network, Subnet: l1.Subnet, IPv6Network: cfg.IPv6Network, IPv6Subnet: l1.IPv6Subnet, MTU: 1472}); err != nil {
		t.Fatal(err)
	}
	r1.Close() // the host goes away without renewing
	eventually(t, 10*time.Second, "the key to expire", func() bool {
		return len(getKV(t, c, prefix+"/subnets/"+l1.Key()).Kvs) == 0
	})

	env, err := subnet.ReadEnv(envPath)
	if err != nil {
		t.Fatal(err)
	}
	r2 := newRegistry(t, s.Endpoint(), prefix, nil)
	_, _, l2 := startManager(t, r2, subnet.ManagerOptions{LeaseTTL: time.Minute, PreviousSubnet: env.Subnet, PreviousIPv6Subnet: env.IPv6Subnet})
	return l2
}

// wantRunning fails the test if Run, whose result arrives on done, has
// returned.
func wantRunning(t *testing.T, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		t.Fatalf("Run returned %v", err)
	default:
	}
}

// runManager runs m.Run until the end of the test; its result arrives on
// the returned channel.
func runManager(t *testing.T, m *subnet.Manager) (*collector, <-chan error) {
	ch := make(chan []subnet.Event)
	w := collect(t, ch)
	cx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		done <- m.Run(cx, ch)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(30 * time.Second):
			t.Errorf("Run did not return after its ctx was cancelled")
		}
	})
	return w, done
}

func startManager(t *testing.T, r subnet.Registry, opts subnet.ManagerOptions) (*subnet.Manager, *subnet.Config, subnet.Lease) {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger, _ = testLogger(t)
	}
	if !opts.PublicIP.IsValid() {
		opts.PublicIP = netip.MustParseAddr("192.0.2.1")
	}
	m := subnet.NewManager(r, opts)
	cfg, l, err := m.Start(ctx(t))
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	return m, cfg, l
}

func TestRenewalExtendsTTLOnTheSameEtcdLeaseWithoutOrphans(t *testing.T) {
	t.Parallel()
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	const ttl = 2 * time.Second
	m, _, l := startManager(t, r, subnet.ManagerOptions{LeaseTTL: ttl}) // renews every second
	w, _ := runManager(t, m)
	// Renewed past twice the TTL: the key now outlives its first lease
	// time twice over only if renewals kept it.
	eventually(t, 20*time.Second, "renewals past twice the TTL", func() bool {
		return m.Status().Lease.Expiration.After(l.Expiration.Add(2 * ttl))
	})

	resp := getKV(t, c, prefix+"/subnets/"+l.Key())
	if len(resp.Kvs) != 1 {
		t.Fatal("the lease key expired: it was not renewed")
	}
	if resp.Kvs[0].Lease != l.LeaseID {
		t.Errorf("key moved to etcd lease %x, want the same %x (KeepAliveOnce)", resp.Kvs[0].Lease, l.LeaseID)
	}
	left, err := c.TimeToLive(ctx(t), clientv3.LeaseID(l.LeaseID))
	if err != nil || left.TTL <= 0 || left.GrantedTTL != 2 {
		t.Errorf("TimeToLive = %+v %v", left, err)
	}
	st := m.Status()
	if !st.LeaseHeld || st.RenewFailures != 0 || st.Phase != subnet.PhaseHolding || !st.Lease.Expiration.After(l.Expiration.Add(2*time.Second)) {
		t.Errorf("status %+v; first expiration %v", st, l.Expiration)
	}
	if n := leaseCount(t, c); n != 1 {
		t.Errorf("%d etcd leases, want 1", n)
	}
	assertNoOrphanLeases(t, c)
	if n := w.count(subnet.EventAdded, l.Subnet.String()); n != 1 {
		t.Errorf("own lease added %d times, want once (renewal does not rewrite the key)", n)
	}
	// The idle watch was probed for progress several times and kept going.
	if n := r.Status().WatchAttempts; n != 1 {
		t.Errorf("an idle, healthy watch was restarted: %d attempts", n)
	}
}

func TestReservationStaysAReservation(t *testing.T) {
	t.Parallel()
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	putLease(t, c, prefix, "198.18.5.0-24", `{"PublicIP":"192.0.2.1"}`, 0)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	m, _, l := startManager(t, r, subnet.ManagerOptions{LeaseTTL: time.Second})
	if !l.Reservation || l.LeaseID != 0 || l.Subnet != netip.MustParsePrefix("198.18.5.0/24") || !l.Expiration.IsZero() {
		t.Fatalf("got %+v, want our reservation 198.18.5.0/24", l)
	}
	runManager(t, m)
	time.Sleep(3 * time.Second) // several TTLs
	kv := getKV(t, c, prefix+"/subnets/198.18.5.0-24").Kvs[0]
	if kv.Lease != 0 || kv.Version != 1 || string(kv.Value) != `{"PublicIP":"192.0.2.1"}` {
		t.Errorf("reservation changed: lease %x version %d value %s", kv.Lease, kv.Version, kv.Value)
	}
	if n := leaseCount(t, c); n != 0 {
		t.Errorf("%d etcd leases granted for a reservation", n)
	}
	if st := m.Status(); !st.LeaseHeld || st.Phase != subnet.PhaseHolding || st.RenewFailures != 0 {
		t.Errorf("status %+v", st)
	}
}

func TestRestartReusesSubnetFromSubnetEnvAfterTheKeyExpired(t *testing.T) {
	t.Parallel()
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	// 198.18.222.0/24 is beyond the first 100 free subnets, so only the
	// previous subnet can bring a host there.
	first := netip.MustParsePrefix("198.18.222.0/24")
	r1 := newRegistry(t, s.Endpoint(), prefix, nil)
	_, cfg, l1 := startManager(t, r1, subnet.ManagerOptions{LeaseTTL: time.Second, PreviousSubnet: first})
	if l1.Subnet != first {
		t.Fatalf("first start got %s", l1.Subnet)
	}
	l2 := restartFromSubnetEnv(t, s, c, prefix, r1, cfg, l1)
	if l2.Subnet != first {
		t.Errorf("restart got %s, want %s from subnet.env", l2.Subnet, first)
	}
}

func TestOwnKeyDeletedByAnotherClientIsReacquired(t *testing.T) {
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	m, _, l := startManager(t, r, subnet.ManagerOptions{LeaseTTL: time.Minute})
	w, done := runManager(t, m)
	eventually(t, 10*time.Second, "snapshot", func() bool { return w.nbatches() >= 1 })
	if _, err := c.Delete(ctx(t), prefix+"/subnets/"+l.Key()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the key to be re-created", func() bool {
		resp := getKV(t, c, prefix+"/subnets/"+l.Key())
		return len(resp.Kvs) == 1 && resp.Kvs[0].Lease != 0 && string(resp.Kvs[0].Value) == `{"PublicIP":"192.0.2.1","PublicIPv6":null}`
	})
	eventually(t, 10*time.Second, "lease held again", func() bool { st := m.Status(); return st.LeaseHeld && st.Lease.Subnet == l.Subnet })
	eventually(t, 10*time.Second, "removed then added", func() bool {
		return w.count(subnet.EventRemoved, l.Subnet.String()) == 1 && w.count(subnet.EventAdded, l.Subnet.String()) == 2
	})
	if st := m.Status(); st.Lease.LeaseID == l.LeaseID {
		t.Error("re-acquired on the old etcd lease")
	}
	wantRunning(t, done)
	assertNoOrphanLeases(t, c)
}

func TestOwnSubnetTakenByAnotherHostEndsRunWithErrLeaseLost(t *testing.T) {
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	m, _, l := startManager(t, r, subnet.ManagerOptions{LeaseTTL: time.Minute})
	w, done := runManager(t, m)
	eventually(t, 10*time.Second, "snapshot", func() bool { return w.nbatches() >= 1 })
	putLease(t, c, prefix, l.Key(), `{"PublicIP":"192.0.2.9","PublicIPv6":null}`, 60)
	select {
	case err := <-done:
		if !errors.Is(err, subnet.ErrLeaseLost) || !strings.Contains(err.Error(), l.Subnet.String()) || !strings.Contains(err.Error(), "192.0.2.9") {
			t.Errorf("Run: %v, want ErrLeaseLost naming %s and 192.0.2.9", err, l.Subnet)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	if st := m.Status(); st.Phase != subnet.PhaseLeaseLost {
		t.Errorf("phase %q", st.Phase)
	}
}

func TestStartWaitsForEtcdAndSaysWhy(t *testing.T) {
	t.Parallel()
	s := etcdtest.New(t, etcdtest.Options{}) // not running yet
	prefix := testPrefix(t)
	lg, logs := testLogger(t)
	r := newRegistry(t, s.Endpoint(), prefix, lg)
	m := subnet.NewManager(r, subnet.ManagerOptions{PublicIP: netip.MustParseAddr("192.0.2.1"), LeaseTTL: time.Minute, StartTimeout: time.Minute, Logger: lg})
	type result struct {
		l   subnet.Lease
		err error
	}
	res := make(chan result, 1)
	go func() {
		_, l, err := m.Start(ctx(t))
		res <- result{l, err}
	}()
	want := "waiting for etcd at " + s.Endpoint() + ": connection refused"
	eventually(t, 5*time.Second, "status: "+want, func() bool {
		st := m.Status()
		return st.Phase == subnet.PhaseWaitingEtcd && st.Registry.Detail == want && !st.Registry.Connected
	})
	eventually(t, 10*time.Second, "every attempt logged", func() bool { return strings.Count(logs.String(), want) >= 2 })
	s.Start()
	eventually(t, 10*time.Second, "waiting for the config", func() bool { return m.Status().Phase == subnet.PhaseWaitingConfig })
	putConfig(t, s.Client(), prefix, `{"Network":"198.18.0.0/16"}`)
	select {
	case r := <-res:
		if r.err != nil || !r.l.Subnet.IsValid() {
			t.Fatalf("Start: %+v %v", r.l, r.err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Start did not return after etcd came up")
	}
	if st := m.Status(); !st.Registry.Connected || !st.LeaseHeld {
		t.Errorf("status %+v", st)
	}
}

func TestStartGivesUpAfterStartTimeoutWithTheCause(t *testing.T) {
	t.Parallel()
	s := etcdtest.New(t, etcdtest.Options{}) // never started
	lg, logs := testLogger(t)
	r := newRegistry(t, s.Endpoint(), testPrefix(t), lg)
	m := subnet.NewManager(r, subnet.ManagerOptions{PublicIP: netip.MustParseAddr("192.0.2.1"), StartTimeout: 1500 * time.Millisecond, Logger: lg})
	t0 := time.Now()
	_, _, err := m.Start(ctx(t))
	took := time.Since(t0)
	want := "start: gave up after 1.5s: read network config " + testPrefix(t) + "/config: waiting for etcd at " + s.Endpoint() + ": connection refused"
	if err == nil || err.Error() != want {
		t.Fatalf("Start: %v\nwant %s", err, want)
	}
	if took > 3*time.Second {
		t.Errorf("took %s for a 1.5s StartTimeout", took)
	}
	if n := strings.Count(logs.String(), "connection refused"); n < 2 || n > 12 {
		t.Errorf("%d attempts logged in 1.5s, want a few (capped backoff)", n)
	}
	if st := m.Status(); st.Phase != subnet.PhaseStartFailed {
		t.Errorf("phase %q", st.Phase)
	}
}

func TestNewDoesNotContactEtcd(t *testing.T) {
	t0 := time.Now()
	r, err := New(Config{Endpoints: []string{"http://127.0.0.1:1"}, Username: "u", Password: "p"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if d := time.Since(t0); d > 100*time.Millisecond {
		t.Errorf("New took %s", d)
	}
	if st := r.Status(); st.Connected || st.Detail == "" {
		t.Errorf("status %+v", st)
	}
	for _, bad := range []Config{
		{Endpoints: []string{"ftp://x:1"}},
		{Endpoints: []string{"http://nohost"}},
		{Prefix: "relative"},
		{Username: "u"},
		{CertFile: "/nonexistent.pem", KeyFile: "/nonexistent-key.pem"},
		{CertFile: "/only-cert.pem"},
		{CAFile: "/nonexistent-ca.pem"},
	} {
		if _, err := New(bad, nil); err == nil {
			t.Errorf("New(%+v) accepted", bad)
		}
	}
}
