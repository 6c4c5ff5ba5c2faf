package etcd

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func TestConcurrentAcquirersGetDistinctSubnetsAndTheNextGetsNoFreeSubnet(t *testing.T) {
	// 50 subnets: 198.18.1.0/24 .. 198.18.50.0/24.
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16","SubnetMin":"198.18.1.0","SubnetMax":"198.18.50.0"}`)
	const n = 50
	leases := make([]subnet.Lease, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		r := newRegistry(t, s.Endpoint(), prefix, nil) // one client per host
		cfg := mustConfig(t, r)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			leases[i], errs[i] = r.AcquireLease(ctx(t), cfg, attrs(hostIP(i+1)), subnet.Allocation{}, time.Minute)
		}()
	}
	close(start)
	wg.Wait()
	seen := map[netip.Prefix]int{}
	for i, l := range leases {
		if errs[i] != nil {
			t.Fatalf("acquirer %d: %v", i, errs[i])
		}
		if j, dup := seen[l.Subnet]; dup {
			t.Fatalf("acquirers %d and %d both got %s", j, i, l.Subnet)
		}
		seen[l.Subnet] = i
		if l.Reservation || l.LeaseID == 0 || time.Until(l.Expiration) < 50*time.Second {
			t.Errorf("acquirer %d: lease %+v", i, l)
		}
	}
	all, err := c.Get(ctx(t), prefix+"/subnets/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(all.Kvs) != n {
		t.Fatalf("%d keys in etcd, want %d", len(all.Kvs), n)
	}
	for _, kv := range all.Kvs {
		v4, _, err := subnet.ParseLeaseKey(strings.TrimPrefix(string(kv.Key), prefix+"/subnets/"))
		if err != nil {
			t.Fatal(err)
		}
		var a subnet.LeaseAttrs
		if err := json.Unmarshal(kv.Value, &a); err != nil {
			t.Fatal(err)
		}
		if i, ok := seen[v4]; !ok || a.PublicIP.String() != hostIP(i+1) {
			t.Errorf("key %s holds %s, not the acquirer's", kv.Key, kv.Value)
		}
	}
	// Races lost on the way revoked what they granted.
	if got := leaseCount(t, c); got != n {
		t.Errorf("%d etcd leases, want %d (one per key)", got, n)
	}
	assertNoOrphanLeases(t, c)

	r := newRegistry(t, s.Endpoint(), prefix, nil)
	_, err = r.AcquireLease(ctx(t), mustConfig(t, r), attrs(hostIP(51)), subnet.Allocation{}, time.Minute)
	if !errors.Is(err, subnet.ErrNoFreeSubnet) {
		t.Fatalf("51st acquirer: %v, want ErrNoFreeSubnet", err)
	}
	want := "acquire lease in network 198.18.0.0/16: no free subnet: all 50 subnets from 198.18.1.0/24 to 198.18.50.0/24 are held"
	if err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	assertNoOrphanLeases(t, c)
}

func TestRestartReusesSubnetByPublicIPWithoutOrphanedLeases(t *testing.T) {
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	r1 := newRegistry(t, s.Endpoint(), prefix, nil)
	first, err := r1.AcquireLease(ctx(t), mustConfig(t, r1), attrs("192.0.2.1"), subnet.Allocation{}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	r1.Close() // the daemon stops; the key stays

	r2 := newRegistry(t, s.Endpoint(), prefix, nil)
	again, err := r2.AcquireLease(ctx(t), mustConfig(t, r2), attrs("192.0.2.1"), subnet.Allocation{}, 30*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if again.Subnet != first.Subnet {
		t.Fatalf("restart got %s, had %s", again.Subnet, first.Subnet)
	}
	// The key moved to a new etcd lease with the new TTL; the old one is revoked.
	if again.LeaseID == first.LeaseID {
		t.Error("the key was not moved to a new etcd lease")
	}
	kv := getKV(t, c, prefix+"/subnets/"+again.Key()).Kvs[0]
	if kv.Lease != again.LeaseID {
		t.Errorf("key on etcd lease %x, want %x", kv.Lease, again.LeaseID)
	}
	ttl, err := c.TimeToLive(ctx(t), clientv3.LeaseID(again.LeaseID))
	if err != nil || ttl.GrantedTTL != 1800 {
		t.Errorf("granted TTL %v %v, want 1800", ttl, err)
	}
	if n := leaseCount(t, c); n != 1 {
		t.Errorf("%d etcd leases, want 1", n)
	}
	assertNoOrphanLeases(t, c)
}

func TestPreviousSubnetIsReusedIfFreeElseIgnored(t *testing.T) {
	s, _, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	cfg := mustConfig(t, r)
	prev := netip.MustParsePrefix("198.18.222.0/24") // beyond the 100 a random pick chooses from
	l, err := r.AcquireLease(ctx(t), cfg, attrs("192.0.2.1"), subnet.Allocation{Subnet: prev}, time.Minute)
	if err != nil || l.Subnet != prev {
		t.Fatalf("got %v %v, want %s", l.Subnet, err, prev)
	}
	// Held by 192.0.2.1 now: 192.0.2.2 must not take it.
	l2, err := r.AcquireLease(ctx(t), cfg, attrs("192.0.2.2"), subnet.Allocation{Subnet: prev}, time.Minute)
	if err != nil || l2.Subnet == prev {
		t.Fatalf("second host got %v %v", l2.Subnet, err)
	}
	if l2.Subnet.Addr().Compare(netip.MustParseAddr("198.18.100.0")) > 0 {
		t.Errorf("random pick %s is not among the first 100 free subnets", l2.Subnet)
	}
	// A previous subnet that does not fit the network is ignored.
	l3, err := r.AcquireLease(ctx(t), cfg, attrs("192.0.2.3"), subnet.Allocation{Subnet: netip.MustParsePrefix("198.19.5.0/24")}, time.Minute)
	if err != nil || !cfg.Fits(l3) {
		t.Fatalf("got %v %v", l3.Subnet, err)
	}
}

func TestLeaseKeyAndValueBytesAreWhatFlannelWrites(t *testing.T) {
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16","Backend":{"Type":"udp"}}`)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	l, err := r.AcquireLease(ctx(t), mustConfig(t, r), attrs("192.0.2.1"), subnet.Allocation{Subnet: netip.MustParsePrefix("198.18.79.0/24")}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	resp := getKV(t, c, prefix+"/subnets/198.18.79.0-24")
	if len(resp.Kvs) != 1 {
		t.Fatalf("no key %s/subnets/198.18.79.0-24", prefix)
	}
	if got, want := string(resp.Kvs[0].Value), `{"PublicIP":"192.0.2.1","PublicIPv6":null}`; got != want {
		t.Errorf("value\n got  %s\n want %s", got, want)
	}
	if resp.Kvs[0].Lease == 0 || resp.Kvs[0].Lease != l.LeaseID {
		t.Errorf("key on etcd lease %x, want %x", resp.Kvs[0].Lease, l.LeaseID)
	}

	// Dual stack: flannel's key form and PublicIPv6.
	prefix6 := prefix + "-v6"
	putConfig(t, c, prefix6, `{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/48"}`)
	r6 := newRegistry(t, s.Endpoint(), prefix6, nil)
	a := attrs("192.0.2.1")
	a.PublicIPv6 = netip.MustParseAddr("2001:db8::1")
	if _, err := r6.AcquireLease(ctx(t), mustConfig(t, r6), a, subnet.Allocation{Subnet: netip.MustParsePrefix("198.18.79.0/24")}, time.Minute); err != nil {
		t.Fatal(err)
	}
	resp = getKV(t, c, prefix6+"/subnets/198.18.79.0-24&2001:db8:0:4f::-64")
	if len(resp.Kvs) != 1 {
		t.Fatalf("no dual-stack key")
	}
	if got, want := string(resp.Kvs[0].Value), `{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8::1"}`; got != want {
		t.Errorf("value\n got  %s\n want %s", got, want)
	}
}

func TestOthersReservationsAreNeverAllocated(t *testing.T) {
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16","SubnetMin":"198.18.1.0","SubnetMax":"198.18.3.0"}`)
	putLease(t, c, prefix, "198.18.1.0-24", `{"PublicIP":"192.0.2.101","PublicIPv6":null}`, 0)
	putLease(t, c, prefix, "198.18.3.0-24", `{"PublicIP":"192.0.2.103","PublicIPv6":null}`, 0)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	cfg := mustConfig(t, r)
	for try := 0; try < 5; try++ { // a random pick would hit a reserved subnet sometimes
		l, err := r.AcquireLease(ctx(t), cfg, attrs("192.0.2.1"), subnet.Allocation{Subnet: netip.MustParsePrefix("198.18.1.0/24")}, time.Minute)
		if err != nil || l.Subnet != netip.MustParsePrefix("198.18.2.0/24") {
			t.Fatalf("got %v %v, want 198.18.2.0/24", l.Subnet, err)
		}
	}
	if _, err := r.AcquireLease(ctx(t), cfg, attrs("192.0.2.2"), subnet.Allocation{}, time.Minute); !errors.Is(err, subnet.ErrNoFreeSubnet) {
		t.Fatalf("got %v, want ErrNoFreeSubnet", err)
	}
	for _, k := range []string{"198.18.1.0-24", "198.18.3.0-24"} {
		kv := getKV(t, c, prefix+"/subnets/"+k).Kvs[0]
		if kv.Lease != 0 || kv.Version != 1 {
			t.Errorf("reservation %s was touched: lease %x version %d", k, kv.Lease, kv.Version)
		}
	}
}

func TestOwnLeaseThatNoLongerFitsIsDeletedAndItsEtcdLeaseRevoked(t *testing.T) {
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16","SubnetMax":"198.18.100.0"}`)
	putLease(t, c, prefix, "198.18.200.0-24", `{"PublicIP":"192.0.2.1","PublicIPv6":null}`, 600)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	l, err := r.AcquireLease(ctx(t), mustConfig(t, r), attrs("192.0.2.1"), subnet.Allocation{}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if l.Subnet == netip.MustParsePrefix("198.18.200.0/24") {
		t.Fatal("reused a lease outside SubnetMax")
	}
	if n := len(getKV(t, c, prefix+"/subnets/198.18.200.0-24").Kvs); n != 0 {
		t.Error("the lease that does not fit is still there")
	}
	if n := leaseCount(t, c); n != 1 {
		t.Errorf("%d etcd leases, want 1", n)
	}
	assertNoOrphanLeases(t, c)
}

func TestServerMayGrantMoreThanTheTTLAsked(t *testing.T) {
	s := etcdtest.New(t, etcdtest.Options{TickMs: 100, ElectionMs: 1000}) // etcd's minimum TTL: 2s
	s.Start()
	c := s.Client()
	prefix := testPrefix(t)
	putConfig(t, c, prefix, `{"Network":"198.18.0.0/16"}`)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	before := time.Now()
	l, err := r.AcquireLease(ctx(t), mustConfig(t, r), attrs("192.0.2.1"), subnet.Allocation{}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := l.Expiration.Sub(before); got < 1900*time.Millisecond || got > 3*time.Second {
		t.Errorf("Expiration %s after acquiring, want the granted 2s", got)
	}
	renewed, err := r.RenewLease(ctx(t), l, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := time.Until(renewed.Expiration); got < 1500*time.Millisecond {
		t.Errorf("renewed Expiration in %s, want about 2s", got)
	}
}

func TestMalformedLeasesAreSkippedCountedAndNeverAllocated(t *testing.T) {
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16","SubnetMin":"198.18.9.0","SubnetMax":"198.18.11.0"}`)
	putLease(t, c, prefix, "garbage", `x`, 0)
	putLease(t, c, prefix, "198.18.9.0-24", `not json`, 0)
	putLease(t, c, prefix, "198.18.10.0-24", `{"PublicIP":"nope"}`, 0)
	putLease(t, c, prefix, "198.18.20.0-24", `{"PublicIP":"192.0.2.20","PublicIPv6":null}`, 0)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	w := watch(t, r)
	eventually(t, 10*time.Second, "snapshot", func() bool { return w.nbatches() >= 1 })
	if st := w.state(); len(st) != 1 || st["198.18.20.0/24"].Attrs.PublicIP.String() != "192.0.2.20" {
		t.Errorf("snapshot %v, want only 198.18.20.0/24", st)
	}
	if n := r.Status().MalformedLeases; n != 3 {
		t.Errorf("MalformedLeases %d, want 3", n)
	}
	// More garbage while watching: skipped, the watch goes on.
	putLease(t, c, prefix, "198.18.20.0-24", `{"PublicIP":`, 0) // a good lease turns bad: removed
	putLease(t, c, prefix, "198.18.30.0-24", `{"PublicIP":"192.0.2.30","PublicIPv6":null}`, 0)
	eventually(t, 10*time.Second, "198.18.30.0/24 after the garbage", func() bool { _, ok := w.state()["198.18.30.0/24"]; return ok })
	if _, ok := w.state()["198.18.20.0/24"]; ok {
		t.Error("a lease overwritten with garbage is still reported")
	}
	if n := r.Status().MalformedLeases; n != 4 {
		t.Errorf("MalformedLeases %d, want 4", n)
	}
	// A key with a malformed value still holds its subnet.
	l, err := r.AcquireLease(ctx(t), mustConfig(t, r), attrs("192.0.2.1"), subnet.Allocation{Subnet: netip.MustParsePrefix("198.18.9.0/24")}, time.Minute)
	if err != nil || l.Subnet != netip.MustParsePrefix("198.18.11.0/24") {
		t.Errorf("got %v %v, want 198.18.11.0/24", l.Subnet, err)
	}
}

func TestContentsShowConfigLeasesWithExpirationAndMalformedKeys(t *testing.T) {
	s := etcdtest.Start(t)
	c := s.Client()
	prefix := testPrefix(t)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	got, err := r.Contents(ctx(t))
	if err != nil || got.ConfigKey != prefix+"/config" || got.Config != nil || len(got.Leases) != 0 || len(got.Malformed) != 0 {
		t.Fatalf("empty etcd: %+v %v", got, err)
	}

	cfg := `{"Network":"198.18.0.0/16","Backend":{"Type":"udp"}}`
	putConfig(t, c, prefix, cfg)
	putLease(t, c, prefix, "198.18.2.0-24", `{"PublicIP":"192.0.2.2","PublicIPv6":null}`, 0)
	putLease(t, c, prefix, "198.18.1.0-24", `{"PublicIP":"192.0.2.1","PublicIPv6":null}`, 600)
	putLease(t, c, prefix, "198.18.3.0-24", `{"PublicIP":`, 600)
	putLease(t, c, prefix, "garbage", `{"PublicIP":"192.0.2.9"}`, 0)
	before := time.Now()
	got, err = r.Contents(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if string(got.Config) != cfg {
		t.Errorf("Config %q, want %q", got.Config, cfg)
	}
	if len(got.Leases) != 2 {
		t.Fatalf("leases %v, want 198.18.1.0/24 and 198.18.2.0/24", got.Leases)
	}
	// Leases: the same leases in the same order, in one read, without expirations.
	plain, err := r.Leases(ctx(t))
	if err != nil || len(plain) != len(got.Leases) {
		t.Fatalf("Leases: %v %v, want the %d of Contents", plain, err, len(got.Leases))
	}
	for i, l := range plain {
		want := got.Leases[i]
		want.Expiration = time.Time{}
		if !l.Expiration.IsZero() || l.Subnet != want.Subnet || l.LeaseID != want.LeaseID || l.Attrs.PublicIP != want.Attrs.PublicIP {
			t.Errorf("Leases[%d] = %+v, want %+v", i, l, want)
		}
	}
	leased, reserved := got.Leases[0], got.Leases[1]
	if leased.Subnet != netip.MustParsePrefix("198.18.1.0/24") || leased.Reservation || leased.LeaseID == 0 ||
		leased.Attrs.PublicIP != netip.MustParseAddr("192.0.2.1") {
		t.Errorf("leased key: %+v", leased)
	}
	if until := leased.Expiration.Sub(before); until < 590*time.Second || until > 601*time.Second {
		t.Errorf("leased key expires in %v, want about 10m", until)
	}
	if reserved.Subnet != netip.MustParsePrefix("198.18.2.0/24") || !reserved.Reservation || !reserved.Expiration.IsZero() {
		t.Errorf("reservation: %+v", reserved)
	}
	if len(got.Malformed) != 2 ||
		got.Malformed[0].Key != prefix+"/subnets/198.18.3.0-24" || got.Malformed[0].Err == nil ||
		got.Malformed[1].Key != prefix+"/subnets/garbage" || got.Malformed[1].Err == nil {
		t.Errorf("malformed %v, want the bad value at 198.18.3.0-24 and the key garbage", got.Malformed)
	}
}

func TestReacquireTakesTheSameSubnetOrFailsIfTaken(t *testing.T) {
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	l, err := r.AcquireLease(ctx(t), mustConfig(t, r), attrs("192.0.2.1"), subnet.Allocation{}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	key := prefix + "/subnets/" + l.Key()
	if _, err := c.Delete(ctx(t), key); err != nil {
		t.Fatal(err)
	}
	if _, err := r.RenewLease(ctx(t), l, time.Minute); !errors.Is(err, subnet.ErrLeaseGone) {
		t.Fatalf("renew after delete: %v, want ErrLeaseGone", err)
	}
	back, err := r.ReacquireLease(ctx(t), l, time.Minute)
	if err != nil || back.Subnet != l.Subnet || back.LeaseID == l.LeaseID {
		t.Fatalf("re-acquire: %+v %v", back, err)
	}
	assertNoOrphanLeases(t, c)

	// Deleted and taken by another host before we come back: ErrSubnetTaken.
	if _, err := c.Delete(ctx(t), key); err != nil {
		t.Fatal(err)
	}
	putLease(t, c, prefix, back.Key(), `{"PublicIP":"192.0.2.9","PublicIPv6":null}`, 60)
	if _, err := r.ReacquireLease(ctx(t), back, time.Minute); !errors.Is(err, subnet.ErrSubnetTaken) || !strings.Contains(err.Error(), "192.0.2.9") {
		t.Fatalf("re-acquire a taken subnet: %v, want ErrSubnetTaken naming 192.0.2.9", err)
	}
}
