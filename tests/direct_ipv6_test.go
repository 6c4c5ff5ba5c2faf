package tests

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/tests/testbed"
)

// directDualStackConfig is the dual-stack network config with direct
// routing on (the IPv6 underlay switch stays off: direct routes do not
// need it).
const directDualStackConfig = `{"Network":"198.18.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"2001:db8:1::/48","IPv6SubnetLen":64,"Backend":{"Type":"udp","DirectRouting":true}}`

// directRoutes6 is how host h lists its direct routes to peer p (by its
// leases and underlay addresses): one per family.
func directRoutes6(t *testing.T, h, p *testbed.Host) []string {
	t.Helper()
	env, err := p.SubnetEnv()
	if err != nil {
		t.Fatal(err)
	}
	return []string{directRoute(h, env.Lease(), p.Addr), directRoute(h, env.IPv6Lease(), p.Addr6)}
}

// TestDirectRoutingIPv6: in a dual-stack network with IPv6 on both
// segments, hosts 1 and 2 (one segment) route each other's IPv4 and IPv6
// leases directly, via each other's PublicIP and PublicIPv6; host 3,
// behind the router, gets no direct route of either family. IPv6 between
// containers 1 and 2 passes tulled by (its counters stay still), between
// 1 and 3 goes through it. A lease that expires takes both routes with
// it; a kill -9 leaves both families' routes and the restart reconciles
// both.
func TestDirectRoutingIPv6(t *testing.T) {
	const ttl = 4 * time.Second
	b := testbed.NewT(t, testbed.Options{Hosts: 2})
	ctx := testCtx(t, 3*time.Minute)
	directSegments(t, ctx, b, true)
	if err := b.WriteNetworkConfig(ctx, directDualStackConfig); err != nil {
		t.Fatal(err)
	}
	h1, h2, h3 := b.Host(1), b.Host(2), b.Host(3)
	// A Tulle host on the segment that offers direct routing of both
	// families, its lease written by hand (no etcd lease: it stays until
	// deleted).
	other, other6 := netip.MustParsePrefix("198.18.241.0/24"), netip.MustParsePrefix("2001:db8:1:f1::/64")
	otherAddr, otherAddr6 := netip.MustParseAddr("192.0.2.202"), netip.MustParseAddr("2001:db8:ffff::202")
	etcd, err := b.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	otherKey := testbed.FlannelDualStackLeaseKey(other, other6)
	value := fmt.Sprintf(`{"PublicIP":%q,"PublicIPv6":%q,"BackendData":{"tulle":{"version":"test","features":[%q,%q,%q]}}}`,
		otherAddr, otherAddr6, udp.FeatureDirect, udp.FeatureDirectIPv6, udp.FeatureIPv6)
	if _, err := etcd.Put(ctx, otherKey, value); err != nil {
		t.Fatal(err)
	}
	otherRoutes := func(h *testbed.Host) []string {
		return []string{directRoute(h, other, otherAddr), directRoute(h, other6, otherAddr6)}
	}
	if err := b.StartAll(ctx, "--subnet-lease-ttl", ttl.String()); err != nil {
		t.Fatal(err)
	}
	for _, h := range b.Hosts {
		_, v := hostLease(t, ctx, b, h)
		if offers := strings.Contains(v, `"`+udp.FeatureDirectIPv6+`"`); !offers {
			t.Errorf("host %s's lease %s does not advertise %s", h.Name, v, udp.FeatureDirectIPv6)
		}
	}
	waitDirectRoutes(t, ctx, &h1.Node, 10*time.Second, "host 1", append(directRoutes6(t, h1, h2), otherRoutes(h1)...)...)
	waitDirectRoutes(t, ctx, &h2.Node, 10*time.Second, "host 2", append(directRoutes6(t, h2, h1), otherRoutes(h2)...)...)
	waitDirectRoutes(t, ctx, &h3.Node, 10*time.Second, "host 3 (no peer on its segment)")

	c1, c2, c3 := container(t, b, 1), container(t, b, 2), container(t, b, 3)
	if gw, dev, err := h1.RouteTo(c2.Addr6); err != nil || gw != h2.Addr6 || dev != h1.Link {
		t.Errorf("host 1 routes %v via %v dev %s (%v), want via %v dev %s", c2.Addr6, gw, dev, err, h2.Addr6, h1.Link)
	}
	if gw, dev, err := h1.RouteTo(c3.Addr6); err != nil || gw.IsValid() || dev != "tulle0" {
		t.Errorf("host 1 routes %v via %v dev %s (%v), want dev tulle0", c3.Addr6, gw, dev, err)
	}

	// 1 <-> 2 over IPv6: direct, tulled sees none of it.
	pathTraffic(t, ctx, pathCase{ha: h1, hb: h2, a: c1, b: c2, dst: c2.Addr6, size: 64 << 20, what: "c1 -> c2 over IPv6 (direct)", direct: true})

	// 1 <-> 3 over IPv6: through tulled, both ways.
	pathTraffic(t, ctx, pathCase{ha: h1, hb: h3, a: c1, b: c3, dst: c3.Addr6, size: 16 << 20, what: "c1 -> c3 over IPv6 (UDP, routed underlay)"})

	// kill -9 leaves host 2's routes of both families; its lease expires
	// and host 1 drops both its routes to it.
	if err := h2.Tulled().Kill(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	dead2 := append(directRoutes6(t, h2, h1), otherRoutes(h2)...)
	waitDirectRoutes(t, ctx, &h2.Node, 0, "host 2 right after kill -9", dead2...)
	waitDirectRoutes(t, ctx, &h1.Node, ttl+10*time.Second, "host 1 once host 2's lease expired", otherRoutes(h1)...)
	t.Logf("host 1 dropped both direct routes to host 2 %v after the kill (lease TTL %v)", time.Since(killed).Round(100*time.Millisecond), ttl)

	// The hand-written lease deleted while host 2 is dead: host 1 drops
	// both its routes at once, host 2 keeps them until it starts again.
	if _, err := etcd.Delete(ctx, otherKey); err != nil {
		t.Fatal(err)
	}
	waitDirectRoutes(t, ctx, &h1.Node, 10*time.Second, "host 1 after the hand-written lease was deleted")
	waitDirectRoutes(t, ctx, &h2.Node, 0, "host 2 (dead) after the lease was deleted", dead2...)

	// Restart: the stale routes of both families go, host 1's stay; both
	// ends route to each other directly again and IPv6 flows.
	if _, err := h2.StartTulled(ctx, "--subnet-lease-ttl", ttl.String()); err != nil {
		t.Fatal(err)
	}
	if _, err := h2.SetupContainer(ctx); err != nil {
		t.Fatal(err)
	}
	waitDirectRoutes(t, ctx, &h2.Node, 0, "host 2 once ready after the restart", directRoutes6(t, h2, h1)...)
	waitDirectRoutes(t, ctx, &h1.Node, 10*time.Second, "host 1 after host 2 came back", directRoutes6(t, h1, h2)...)
	reach6(t, ctx, container(t, b, 1), container(t, b, 2), 3)
}
