package tests

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/tests/testbed"
)

// directConfig is the default network config with direct routing on.
const directConfig = `{"Network":"198.18.0.0/16","SubnetLen":24,"Backend":{"Type":"udp","DirectRouting":true}}`

// directRoute is how a host lists the direct route to lease via gw on its
// underlay link.
func directRoute(h *testbed.Host, lease netip.Prefix, gw netip.Addr) string {
	return fmt.Sprintf("%v via %v dev %s", lease, gw, h.Link)
}

// waitDirectRoutes waits until n's routes of Tulle's protocol are exactly
// want, and fails the test with what it has after timeout.
func waitDirectRoutes(t *testing.T, ctx context.Context, n *testbed.Node, timeout time.Duration, what string, want ...string) {
	t.Helper()
	slices.Sort(want)
	deadline := time.Now().Add(timeout)
	for {
		got, err := n.RoutesOfProtocol(int(udp.RouteProtocol))
		if err != nil {
			t.Fatal(err)
		}
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s's routes of protocol %d after %v:\n got  %q\n want %q", what, n.Name, udp.RouteProtocol, timeout, got, want)
		}
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// peerCounters is what host h counted to and from peer p (by its public IP).
type peerCounters struct{ txPackets, txBytes, rxPackets, rxBytes float64 }

func countersOf(t *testing.T, ctx context.Context, h *testbed.Host, p netip.Addr) peerCounters {
	t.Helper()
	m, err := h.Scrape(ctx)
	if err != nil {
		t.Fatal(err)
	}
	peer := p.String()
	return peerCounters{
		txPackets: m.Value("tulle_peer_transmit_packets_total", "peer", peer),
		txBytes:   m.Value("tulle_peer_transmit_bytes_total", "peer", peer),
		rxPackets: m.Value("tulle_peer_receive_packets_total", "peer", peer),
		rxBytes:   m.Value("tulle_peer_receive_bytes_total", "peer", peer),
	}
}

// directSegments gives bed b (hosts 1 and 2) a second segment behind the
// router with host 3 on it, both segments IPv6 too if ipv6, and a strict
// rp_filter on every host: direct routes are symmetric, so a packet from a
// direct peer's container arrives on the link its reverse route leaves by.
func directSegments(t *testing.T, ctx context.Context, b *testbed.Bed, ipv6 bool) {
	t.Helper()
	seg, err := b.AddSegment(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := seg.AddHost(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if ipv6 {
		if err := seg.AddIPv6(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range b.Hosts {
		if err := h.SetSysctl(ctx, "net/ipv4/conf/all/rp_filter", "1"); err != nil {
			t.Fatal(err)
		}
	}
}

// pathCase is traffic between containers a and b of hosts ha and hb.
type pathCase struct {
	ha, hb *testbed.Host
	a, b   *testbed.Node
	dst    netip.Addr // b's address to ping and send to: b.Addr or b.Addr6
	size   int64      // bytes of TCP from a to dst
	what   string     // names the transfer in the log
	direct bool       // ha and hb are direct peers: their tulleds count none of it
}

// pathTraffic pings a <-> b both ways over dst's family and sends size
// bytes of TCP from a to dst. Between direct peers neither tulled's
// counters for the other may move; otherwise ha must count at least size
// bytes sent to hb and hb at least size received from ha. It returns ha's
// counters for hb from before and after, for further checks.
func pathTraffic(t *testing.T, ctx context.Context, p pathCase) (before, after peerCounters) {
	t.Helper()
	ping := reach
	if p.dst.Is6() {
		ping = reach6
	}
	before, beforeB := countersOf(t, ctx, p.ha, p.hb.Addr), countersOf(t, ctx, p.hb, p.ha.Addr)
	ping(t, ctx, p.a, p.b, 3)
	ping(t, ctx, p.b, p.a, 3)
	tr, err := testbed.TransferTCPTo(ctx, p.a, p.b, p.dst, p.size)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %d bytes in %v (%s)", p.what, tr.Bytes, tr.Elapsed, testbed.FormatBits(tr.BitsPerSecond()))
	after, afterB := countersOf(t, ctx, p.ha, p.hb.Addr), countersOf(t, ctx, p.hb, p.ha.Addr)
	if p.direct {
		if after != before {
			t.Errorf("host %s's counters for direct peer %s moved: %+v -> %+v", p.ha.Name, p.hb.Addr, before, after)
		}
		if afterB != beforeB {
			t.Errorf("host %s's counters for direct peer %s moved: %+v -> %+v", p.hb.Name, p.ha.Addr, beforeB, afterB)
		}
		return before, after
	}
	if d := after.txBytes - before.txBytes; d < float64(p.size) {
		t.Errorf("host %s counted %v bytes sent to %s, want >= %d MiB", p.ha.Name, d, p.hb.Addr, p.size>>20)
	}
	if d := afterB.rxBytes - beforeB.rxBytes; d < float64(p.size) {
		t.Errorf("host %s counted %v bytes received from %s, want >= %d MiB", p.hb.Name, d, p.ha.Addr, p.size>>20)
	}
	return before, after
}

// TestDirectRoutingBypassesTulleOnlyBetweenOnLinkTulleHosts: hosts 1 and 2
// share a segment, host 3 is behind a router, a flannel host shares the
// segment of 1 and 2. Every host runs a strict rp_filter. Containers 1 and
// 2 talk through the kernel (tulled counts nothing), 1 and 3 through
// tulled, and the flannel host gets UDP.
func TestDirectRoutingBypassesTulleOnlyBetweenOnLinkTulleHosts(t *testing.T) {
	b := testbed.NewT(t, testbed.Options{Hosts: 2})
	ctx := testCtx(t, 3*time.Minute)
	directSegments(t, ctx, b, false)
	if err := b.WriteNetworkConfig(ctx, directConfig); err != nil {
		t.Fatal(err)
	}
	fl := addFlannelHost(t, ctx, b)
	h1, h2, h3 := b.Host(1), b.Host(2), b.Host(3)
	if err := b.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	l1, l2 := lease(t, h1), lease(t, h2)

	// Every Tulle host advertises direct routing; the flannel host cannot.
	for _, h := range b.Hosts {
		if v := leaseValue(t, ctx, b, lease(t, h)); !strings.Contains(v, `"`+udp.FeatureDirect+`"`) {
			t.Errorf("host %s's lease %s does not advertise %s", h.Name, v, udp.FeatureDirect)
		}
	}
	waitDirectRoutes(t, ctx, &h1.Node, 10*time.Second, "host 1", directRoute(h1, l2, h2.Addr))
	waitDirectRoutes(t, ctx, &h2.Node, 10*time.Second, "host 2", directRoute(h2, l1, h1.Addr))
	waitDirectRoutes(t, ctx, &h3.Node, 10*time.Second, "host 3 (no peer on its segment)")

	c1, c2, c3 := container(t, b, 1), container(t, b, 2), container(t, b, 3)
	if gw, dev, err := h1.RouteTo(c2.Addr); err != nil || gw != h2.Addr || dev != h1.Link {
		t.Errorf("host 1 routes %v via %v dev %s (%v), want via %v dev %s", c2.Addr, gw, dev, err, h2.Addr, h1.Link)
	}

	// 1 <-> 2: direct. tulled on either end sees none of it.
	pathTraffic(t, ctx, pathCase{ha: h1, hb: h2, a: c1, b: c2, dst: c2.Addr, size: 64 << 20, what: "c1 -> c2 (direct)", direct: true})

	// 1 <-> 3: through tulled, both ways.
	before13, after13 := pathTraffic(t, ctx, pathCase{ha: h1, hb: h3, a: c1, b: c3, dst: c3.Addr, size: 64 << 20, what: "c1 -> c3 (UDP, routed underlay)"})
	if d := after13.rxPackets - before13.rxPackets; d < 3 {
		t.Errorf("host 1 counted %v packets received from %s, want >= 3 (echo replies, ACKs)", d, h3.Addr)
	}

	// The flannel host on the same segment keeps the UDP path: a datagram
	// from container 1 to its subnet reaches its port 8285, encapsulated.
	if gw, dev, err := h1.RouteTo(flannelSubnet.Addr().Next().Next()); err != nil || gw.IsValid() || dev != "tulle0" {
		t.Errorf("host 1 routes the flannel subnet via %v dev %s (%v), want dev tulle0", gw, dev, err)
	}
	src := listener(t, c1)
	dst := netip.AddrPortFrom(flannelSubnet.Addr().Next().Next(), 9)
	if _, err := src.WriteToUDPAddrPort([]byte("to a flannel host"), dst); err != nil {
		t.Fatal(err)
	}
	inner, from := expectDatagram(t, fl.sock, 5*time.Second)
	if from.Addr() != h1.Addr || len(inner) < 20 || netip.AddrFrom4([4]byte(inner[16:20])) != dst.Addr() {
		t.Errorf("the flannel host got %d bytes from %v, want host 1's datagram carrying a packet to %v", len(inner), from, dst.Addr())
	}
}

// leaseValue reads the value of subnet's lease key from etcd.
func leaseValue(t *testing.T, ctx context.Context, b *testbed.Bed, subnet netip.Prefix) string {
	t.Helper()
	c, err := b.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get(ctx, testbed.FlannelLeaseKey(subnet))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get %s: %v (%d keys)", testbed.FlannelLeaseKey(subnet), err, len(resp.Kvs))
	}
	return string(resp.Kvs[0].Value)
}

// TestDirectRoutesFollowLeasesAndOutliveNoCrash: routes come and go with
// leases (expiry, deletion), a kill -9 leaves them, and the next start
// reconciles them with the leases: a route whose lease went while tulled
// was dead is removed, the others kept. A clean stop removes them all.
func TestDirectRoutesFollowLeasesAndOutliveNoCrash(t *testing.T) {
	const ttl = 4 * time.Second
	b := cluster(t, testbed.Options{Hosts: 2}, directConfig, "--subnet-lease-ttl", ttl.String())
	ctx := testCtx(t, 2*time.Minute)
	h1, h2 := b.Host(1), b.Host(2)
	l1, l2 := lease(t, h1), lease(t, h2)

	// A Tulle host that offers direct routing, its lease written by hand
	// (no etcd lease: it stays until deleted).
	other, otherAddr := netip.MustParsePrefix("198.18.241.0/24"), netip.MustParseAddr("192.0.2.202")
	value := fmt.Sprintf(`{"PublicIP":%q,"PublicIPv6":null,"BackendData":{"tulle":{"version":"test","features":[%q]}}}`, otherAddr, udp.FeatureDirect)
	if _, err := b.PutLease(ctx, other, value, 0); err != nil {
		t.Fatal(err)
	}
	waitDirectRoutes(t, ctx, &h1.Node, 10*time.Second, "host 1", directRoute(h1, l2, h2.Addr), directRoute(h1, other, otherAddr))
	waitDirectRoutes(t, ctx, &h2.Node, 10*time.Second, "host 2", directRoute(h2, l1, h1.Addr), directRoute(h2, other, otherAddr))

	// kill -9 leaves host 2's routes; its lease is no longer renewed and
	// expires, and host 1 drops its route to it.
	if err := h2.Tulled().Kill(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	waitDirectRoutes(t, ctx, &h2.Node, 0, "host 2 right after kill -9", directRoute(h2, l1, h1.Addr), directRoute(h2, other, otherAddr))
	waitDirectRoutes(t, ctx, &h1.Node, ttl+10*time.Second, "host 1 once host 2's lease expired", directRoute(h1, other, otherAddr))
	t.Logf("host 1 dropped its direct route to host 2 %v after the kill (lease TTL %v)", time.Since(killed).Round(100*time.Millisecond), ttl)

	// A lease deleted: host 1 drops the route at once; host 2, dead, keeps
	// its stale one until it starts again.
	if err := b.DeleteLease(ctx, other); err != nil {
		t.Fatal(err)
	}
	waitDirectRoutes(t, ctx, &h1.Node, 10*time.Second, "host 1 after the hand-written lease was deleted")
	waitDirectRoutes(t, ctx, &h2.Node, 0, "host 2 (dead) after the lease was deleted", directRoute(h2, l1, h1.Addr), directRoute(h2, other, otherAddr))

	// Restart: the stale route goes, host 1's stays; both ends route to
	// each other directly again and containers talk.
	if _, err := h2.StartTulled(ctx, "--subnet-lease-ttl", ttl.String()); err != nil {
		t.Fatal(err)
	}
	if _, err := h2.SetupContainer(ctx); err != nil {
		t.Fatal(err)
	}
	l2 = lease(t, h2)
	waitDirectRoutes(t, ctx, &h2.Node, 0, "host 2 once ready after the restart", directRoute(h2, l1, h1.Addr))
	waitDirectRoutes(t, ctx, &h1.Node, 10*time.Second, "host 1 after host 2 came back", directRoute(h1, l2, h2.Addr))
	reach(t, ctx, container(t, b, 1), container(t, b, 2), 3)

	// A clean stop takes its routes away (its lease stays for the restart,
	// so host 1 keeps its route to it).
	if err := h2.Tulled().Stop(); err != nil {
		t.Fatal(err)
	}
	waitDirectRoutes(t, ctx, &h2.Node, 0, "host 2 after a clean stop")
	waitDirectRoutes(t, ctx, &h1.Node, 0, "host 1 after host 2's clean stop", directRoute(h1, l2, h2.Addr))
}
