package etcd

import (
	"net/netip"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet"
)

const dualStackConfig = `{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:1::/48"}`

func dualAttrs(v4, v6 string) subnet.LeaseAttrs {
	a := attrs(v4)
	a.PublicIPv6 = netip.MustParseAddr(v6)
	return a
}

// A restart finds the dual-stack key by its PublicIP and keeps both
// subnets, under flannel's key form and with PublicIPv6 in the value.
func TestRestartReusesBothSubnetsOfADualStackLease(t *testing.T) {
	t.Parallel()
	s, c, prefix := startEtcdWithConfig(t, dualStackConfig)
	r1 := newRegistry(t, s.Endpoint(), prefix, nil)
	first, err := r1.AcquireLease(ctx(t), mustConfig(t, r1), dualAttrs("192.0.2.1", "2001:db8:ffff::1"), subnet.Allocation{}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !first.Subnet.IsValid() || !first.IPv6Subnet.IsValid() || first.IPv6Subnet.Bits() != 64 || !netip.MustParsePrefix("2001:db8:1::/48").Contains(first.IPv6Subnet.Addr()) {
		t.Fatalf("first lease %v: want an IPv4 /24 and an IPv6 /64 in 2001:db8:1::/48", first)
	}
	r1.Close()

	r2 := newRegistry(t, s.Endpoint(), prefix, nil)
	again, err := r2.AcquireLease(ctx(t), mustConfig(t, r2), dualAttrs("192.0.2.1", "2001:db8:ffff::1"), subnet.Allocation{}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if again.Subnet != first.Subnet || again.IPv6Subnet != first.IPv6Subnet {
		t.Fatalf("restart got %v, had %v", again, first)
	}
	key := prefix + "/subnets/" + first.Subnet.Addr().String() + "-24&" + first.IPv6Subnet.Addr().String() + "-64"
	resp := getKV(t, c, key)
	if len(resp.Kvs) != 1 {
		t.Fatalf("no key %s", key)
	}
	if got, want := string(resp.Kvs[0].Value), `{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8:ffff::1"}`; got != want {
		t.Errorf("value\n got  %s\n want %s", got, want)
	}
	if n := leaseCount(t, c); n != 1 {
		t.Errorf("%d etcd leases, want 1", n)
	}
	assertNoOrphanLeases(t, c)
}

// After its key is gone, a host asks again for both subnets its
// subnet.env recorded, even an IPv6 subnet that is not the one paired
// with its IPv4 subnet (as flannel's random pick leaves them).
func TestPreviousIPv6SubnetIsReusedWithThePreviousSubnet(t *testing.T) {
	t.Parallel()
	s, _, prefix := startEtcdWithConfig(t, dualStackConfig)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	cfg := mustConfig(t, r)
	prev := subnet.Allocation{Subnet: netip.MustParsePrefix("198.18.222.0/24"), IPv6Subnet: netip.MustParsePrefix("2001:db8:1:77::/64")}
	if paired, _ := cfg.AllocationOf(prev.Subnet); paired.IPv6Subnet == prev.IPv6Subnet {
		t.Fatalf("test needs an unpaired IPv6 subnet; %s is paired with %s", prev.IPv6Subnet, prev.Subnet)
	}
	l, err := r.AcquireLease(ctx(t), cfg, attrs("192.0.2.1"), prev, time.Minute)
	if err != nil || l.Subnet != prev.Subnet || l.IPv6Subnet != prev.IPv6Subnet {
		t.Fatalf("got %v %v, want %v", l, err, prev)
	}

	// An IPv6 subnet that does not fit the network (another length) is
	// replaced by the one paired with the IPv4 subnet.
	bad := subnet.Allocation{Subnet: netip.MustParsePrefix("198.18.223.0/24"), IPv6Subnet: netip.MustParsePrefix("2001:db8:1:78::/80")}
	paired, _ := cfg.AllocationOf(bad.Subnet)
	l2, err := r.AcquireLease(ctx(t), cfg, attrs("192.0.2.2"), bad, time.Minute)
	if err != nil || l2.Subnet != bad.Subnet || l2.IPv6Subnet != paired.IPv6Subnet {
		t.Fatalf("got %v %v, want %v", l2, err, paired)
	}

	// A previous IPv6 subnet held by another host is not taken: the
	// previous allocation is given up as a whole.
	taken := subnet.Allocation{Subnet: netip.MustParsePrefix("198.18.224.0/24"), IPv6Subnet: prev.IPv6Subnet}
	l3, err := r.AcquireLease(ctx(t), cfg, attrs("192.0.2.3"), taken, time.Minute)
	if err != nil || l3.IPv6Subnet == prev.IPv6Subnet || l3.Subnet == taken.Subnet {
		t.Fatalf("got %v %v: took a subnet another host holds, or kept half the previous allocation", l3, err)
	}
}

// The lease manager advertises PublicIPv6 only in a dual-stack network
// (flannel writes null otherwise) and reads the previous IPv6 subnet from
// subnet.env after the key expired.
func TestManagerWritesPublicIPv6OnlyInADualStackNetworkAndReusesSubnetEnv(t *testing.T) {
	t.Parallel()
	s4, c4, prefix4 := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	r4 := newRegistry(t, s4.Endpoint(), prefix4, nil)
	_, _, l4 := startManager(t, r4, subnet.ManagerOptions{LeaseTTL: time.Minute, PublicIPv6: netip.MustParseAddr("2001:db8:ffff::1")})
	if got, want := string(getKV(t, c4, prefix4+"/subnets/"+l4.Key()).Kvs[0].Value), `{"PublicIP":"192.0.2.1","PublicIPv6":null}`; got != want {
		t.Errorf("IPv4-only network: value %s, want %s", got, want)
	}

	s, c, prefix := startEtcdWithConfig(t, dualStackConfig)
	first := subnet.Allocation{Subnet: netip.MustParsePrefix("198.18.222.0/24"), IPv6Subnet: netip.MustParsePrefix("2001:db8:1:77::/64")}
	r1 := newRegistry(t, s.Endpoint(), prefix, nil)
	_, cfg, l1 := startManager(t, r1, subnet.ManagerOptions{LeaseTTL: time.Second, PublicIPv6: netip.MustParseAddr("2001:db8:ffff::1"),
		PreviousSubnet: first.Subnet, PreviousIPv6Subnet: first.IPv6Subnet})
	if l1.Subnet != first.Subnet || l1.IPv6Subnet != first.IPv6Subnet {
		t.Fatalf("first start got %v, want %v", l1, first)
	}
	if got, want := string(getKV(t, c, prefix+"/subnets/"+l1.Key()).Kvs[0].Value), `{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8:ffff::1"}`; got != want {
		t.Errorf("dual-stack network: value %s, want %s", got, want)
	}
	l2 := restartFromSubnetEnv(t, s, c, prefix, r1, cfg, l1)
	if l2.Subnet != first.Subnet || l2.IPv6Subnet != first.IPv6Subnet {
		t.Errorf("restart got %v, want %v from subnet.env", l2, first)
	}
}
