package tests

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/tulle-net/tulle/tests/testbed"
	"github.com/tulle-net/tulle/tests/tools"
)

// Dual stack end to end: real tulled on testbed hosts, IPv6 containers
// behind each host's IPv6 lease (testbed.DualStackNetworkConfig:
// 2001:db8:1::/48 in /64s), the underlay IPv4 unless a test turns the
// IPv6 underlay on.

// innerUDP6 is a bare IPv6+UDP packet, as a host's kernel hands it to
// tulled.
func innerUDP6(t *testing.T, src, dst netip.AddrPort, hopLimit uint8, payload []byte) []byte {
	t.Helper()
	ip := &layers.IPv6{Version: 6, NextHeader: layers.IPProtocolUDP, HopLimit: hopLimit, SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}
	udp := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		t.Fatal(err)
	}
	return serialize(t, ip, udp, gopacket.Payload(payload))
}

// reach6 is reach over IPv6: container (or host) from to to.Addr6.
func reach6(t *testing.T, ctx context.Context, from, to *testbed.Node, count int) testbed.PingResult {
	t.Helper()
	if !to.Addr6.IsValid() {
		t.Fatalf("%s has no IPv6 address", to.Name)
	}
	if _, err := from.WaitReachable(ctx, to.Addr6, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	r, err := from.Ping(ctx, to.Addr6, count)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// hostLease is the etcd key and value of host h's lease (from its subnet.env's
// subnets, under flannel's dual-stack key).
func hostLease(t *testing.T, ctx context.Context, b *testbed.Bed, h *testbed.Host) (key, value string) {
	t.Helper()
	env, err := h.SubnetEnv()
	if err != nil {
		t.Fatal(err)
	}
	key = testbed.FlannelLeaseKey(env.Lease())
	if env.IPv6Subnet.IsValid() {
		key = testbed.FlannelDualStackLeaseKey(env.Lease(), env.IPv6Lease())
	}
	c, err := b.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 {
		t.Fatalf("host %s: no key %s in etcd", h.Name, key)
	}
	return key, string(resp.Kvs[0].Value)
}

// dualStackCluster is a 3-host dual-stack cluster on an IPv4 underlay;
// host 3's underlay MTU is 1400 (its overlay MTU 1372, the others' 1472).
func dualStackCluster(t *testing.T) *testbed.Bed {
	t.Helper()
	return cluster(t, testbed.Options{HostMTU: map[int]int{3: 1400}}, testbed.DualStackNetworkConfig)
}

func TestDualStackContainers(t *testing.T) {
	b := dualStackCluster(t)
	ctx := testCtx(t, 3*time.Minute)
	h1, h2, h3 := b.Host(1), b.Host(2), b.Host(3)
	c1, c2, c3 := container(t, b, 1), container(t, b, 2), container(t, b, 3)

	t.Run("every host holds both subnets and says so in subnet.env", func(t *testing.T) {
		seen := map[netip.Prefix]string{}
		for _, h := range b.Hosts {
			env, err := h.SubnetEnv()
			if err != nil {
				t.Fatal(err)
			}
			l6 := env.IPv6Lease()
			if env.IPv6Network != testbed.IPv6Network || l6.Bits() != 64 || !testbed.IPv6Network.Contains(l6.Addr()) || env.IPv6Subnet.Addr() != l6.Addr().Next() {
				t.Errorf("host %s: FLANNEL_IPV6_NETWORK=%s FLANNEL_IPV6_SUBNET=%s; want %s and <a /64 of it>::1/64", h.Name, env.IPv6Network, env.IPv6Subnet, testbed.IPv6Network)
			}
			if other, dup := seen[l6]; dup {
				t.Errorf("hosts %s and %s hold the same IPv6 lease %s", other, h.Name, l6)
			}
			seen[l6] = h.Name
			key, value := hostLease(t, ctx, b, h)
			if want := `{"PublicIP":"` + h.Addr.String() + `","PublicIPv6":null,`; !strings.HasPrefix(value, want) {
				t.Errorf("host %s: %s = %s, want it to start %s (no IPv6 underlay address)", h.Name, key, value, want)
			}
			if !strings.Contains(value, `"ipv6"`) {
				t.Errorf("host %s: %s = %s: Tulle's features lack ipv6", h.Name, key, value)
			}
			// tulle0 has the lease's first address and routes the IPv6 network.
			addrs, _ := h.Exec(ctx, "ip", "-6", "-o", "addr", "show", "dev", "tulle0")
			routes, _ := h.Exec(ctx, "ip", "-6", "route", "show", "dev", "tulle0")
			if !strings.Contains(addrs, " "+l6.Addr().String()+"/") || !strings.Contains(routes, testbed.IPv6Network.String()) {
				t.Errorf("host %s: tulle0 IPv6 addresses %q, routes %q; want %s and a route for %s", h.Name, addrs, routes, l6.Addr(), testbed.IPv6Network)
			}
		}
		if env, _ := h3.SubnetEnv(); env.MTU != 1400-28 {
			t.Errorf("host 3 FLANNEL_MTU=%d, want %d (an IPv4 underlay)", env.MTU, 1400-28)
		}
	})

	t.Run("containers on three hosts ping each other over IPv6 and IPv4", func(t *testing.T) {
		for _, from := range []*testbed.Node{c1, c2, c3} {
			for _, to := range []*testbed.Node{c1, c2, c3} {
				if from != to {
					r6 := reach6(t, ctx, from, to, 2)
					r4 := reach(t, ctx, from, to, 2)
					t.Logf("%s -> %s: IPv6 avg %v, IPv4 avg %v", from.Name, to.Name, r6.AvgRTT, r4.AvgRTT)
				}
			}
		}
		// An echo larger than the MTU, fragmented by the container, arrives whole.
		if _, err := c1.Ping(ctx, c2.Addr6, 2, "-s", "8000"); err != nil {
			t.Error(err)
		}
	})

	t.Run("64 MiB over TCP/IPv6 arrive intact", func(t *testing.T) {
		reach6(t, ctx, c1, c2, 1)
		tr, err := testbed.TransferTCPTo(ctx, c1, c2, c2.Addr6, 64<<20)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("c1 -> c2 over IPv6: %d bytes in %v (%s), SHA-256 %x", tr.Bytes, tr.Elapsed, testbed.FormatBits(tr.BitsPerSecond()), tr.SHA256[:8])
		// Both directions with the host whose underlay MTU is smaller: the
		// MSS each side announces fits its own MTU, PMTU does the rest.
		for _, p := range [][2]*testbed.Node{{c1, c3}, {c3, c2}} {
			tr, err := testbed.TransferTCPTo(ctx, p[0], p[1], p[1].Addr6, 16<<20)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s -> %s over IPv6: %d bytes in %v (%s)", p[0].Name, p[1].Name, tr.Bytes, tr.Elapsed, testbed.FormatBits(tr.BitsPerSecond()))
		}
	})

	t.Run("UDP datagrams over IPv6 arrive intact", func(t *testing.T) {
		reach6(t, ctx, c1, c2, 1)
		rx := listener6(t, c2)
		_ = rx.SetReadBuffer(8 << 20)
		tx := listener6(t, c1)
		// From tiny to the largest unfragmented (MTU - 40 - 8) and beyond
		// (IPv6 fragments, each carried on its own and reassembled).
		mtu := h1.Container().MTU
		sendIntact(t, tx, rx, c1.Addr6, []int{40, 100, 512, 1000, mtu - 48, mtu - 47, 4000, 9000}, 20)
	})

	t.Run("spoofed inner IPv6 source and foreign IPv6 destination are dropped and counted", func(t *testing.T) {
		rx := listener6(t, c1)
		dstC1 := netip.AddrPortFrom(c1.Addr6, port(rx))
		h2sock, err := h2.ListenUDP(netip.AddrPortFrom(h2.Addr, 0))
		if err != nil {
			t.Fatal(err)
		}
		defer h2sock.Close()

		want := []byte("genuine IPv6, from container 2")
		sendTo(t, h2sock, h1, innerUDP6(t, netip.AddrPortFrom(c2.Addr6, 4001), dstC1, 62, want), 1)
		if got, from := expectDatagram(t, rx, 5*time.Second); !bytes.Equal(got, want) || from != netip.AddrPortFrom(c2.Addr6, 4001) {
			t.Fatalf("received %q from %s, want %q from [%s]:4001", got, from, want, c2.Addr6)
		}

		for _, tc := range []struct {
			reason string
			pkt    []byte
		}{
			{"spoofed_source", innerUDP6(t, netip.AddrPortFrom(c3.Addr6, 4002), dstC1, 62, []byte("host 2 pretending to be container 3"))},
			{"foreign_destination", innerUDP6(t, netip.AddrPortFrom(c2.Addr6, 4003), netip.AddrPortFrom(c3.Addr6, 9), 62, []byte("relay me"))},
		} {
			before := dropped6(t, ctx, h1, tc.reason)
			const n = 5
			sendTo(t, h2sock, h1, tc.pkt, n)
			if v, _, err := waitMetric(t, ctx, h1, 5*time.Second, func(v float64) bool { return v >= before+n },
				"tulle_dropped_packets_total", "direction", "receive", "reason", tc.reason, "family", "ipv6"); err != nil {
				t.Errorf("IPv6 %s drops %v -> %v, want +%d: %v", tc.reason, before, v, n, err)
			}
		}
		expectNothing(t, rx, time.Second, "spoofed IPv6 source")
	})

	t.Run("docker-opts gives Docker both families", func(t *testing.T) {
		env, err := h1.SubnetEnv()
		if err != nil {
			t.Fatal(err)
		}
		bin, err := testbed.BuildTulled(ctx)
		if err != nil {
			t.Fatal(err)
		}
		out, err := tools.Command(ctx, bin, "docker-opts", "-c", "-f", h1.SubnetFile).CombinedOutput()
		want := fmt.Sprintf("DOCKER_OPTS=\" --bip=%s --ip-masq=true --ipv6 --fixed-cidr-v6=%s --mtu=%d\"\n", env.Subnet, env.IPv6Lease(), env.MTU)
		if err != nil || string(out) != want {
			t.Errorf("tulled docker-opts: %v\n got  %q\n want %q", err, out, want)
		}
	})

	t.Run("restart keeps both subnets", func(t *testing.T) {
		before, err := h3.SubnetEnv()
		if err != nil {
			t.Fatal(err)
		}
		if err := h3.Tulled().Stop(); err != nil {
			t.Fatal(err)
		}
		if _, err := h3.StartTulled(ctx); err != nil {
			t.Fatal(err)
		}
		after, err := h3.SubnetEnv()
		if err != nil {
			t.Fatal(err)
		}
		if after.Subnet != before.Subnet || after.IPv6Subnet != before.IPv6Subnet {
			t.Fatalf("host 3 had %s and %s, has %s and %s after a restart", before.Subnet, before.IPv6Subnet, after.Subnet, after.IPv6Subnet)
		}
		reach6(t, ctx, c1, c3, 2)
		reach(t, ctx, c3, c2, 2)
	})

	// Last: it narrows host 1's path to host 2.
	t.Run("an IPv6 packet above the path MTU gets Packet Too Big and TCP completes", func(t *testing.T) {
		reach6(t, ctx, c1, c2, 1)
		// Above IPv6's 1280, which every path must carry (tulled fragments
		// the outer datagram of a packet up to 1280 rather than ask for less).
		const routeMTU = 1400
		const pathMTU = routeMTU - 28 // inside the outer IPv4 + UDP headers
		if _, err := h1.Exec(ctx, "ip", "route", "add", h2.Addr.String()+"/32", "dev", h1.Link, "mtu", "lock", strconv.Itoa(routeMTU)); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = h1.Exec(context.Background(), "ip", "route", "del", h2.Addr.String()+"/32") })
		// 1400 bytes of echo + 48 of headers: tulled on host 1 answers
		// ICMPv6 Packet Too Big, mtu 1372; ping prints it, or once the
		// container's kernel has learned the path MTU, refuses locally.
		out := pingUntilTooBig(t, ctx, c1, c2.Addr6, 1400, pathMTU, "ICMPv6 Packet Too Big")
		t.Logf("ping -6 -M do -s 1400: %s", out)
		if v := metric(t, ctx, h1, "tulle_dropped_packets_total", "direction", "transmit", "reason", "oversize", "family", "ipv6"); v < 1 {
			t.Errorf("host 1 counted %v IPv6 oversize drops, though it answered an oversize packet", v)
		}
		if _, err := c1.Ping(ctx, c2.Addr6, 2, "-M", "do", "-s", strconv.Itoa(pathMTU-48)); err != nil {
			t.Error(err)
		}
		tr, err := testbed.TransferTCPTo(ctx, c1, c2, c2.Addr6, 8<<20)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("TCP/IPv6 c1 -> c2 over the %d-byte path: %d bytes in %v", routeMTU, tr.Bytes, tr.Elapsed)
	})
}

// listener6 opens a UDP socket on node n's IPv6 address, ephemeral port.
func listener6(t *testing.T, n *testbed.Node) *net.UDPConn {
	t.Helper()
	return listenerOn(t, n, n.Addr6)
}

func dropped6(t *testing.T, ctx context.Context, h *testbed.Host, reason string) float64 {
	t.Helper()
	return metric(t, ctx, h, "tulle_dropped_packets_total", "direction", "receive", "reason", reason, "family", "ipv6")
}

// A flannel udp host in a dual-stack network: its IPv4 datagrams are
// delivered as always, and it is never sent IPv6, whether its lease has
// no IPv6 subnet or has one (flannel allocates it) without Tulle's ipv6
// feature.
func TestFlannelHostInADualStackNetwork(t *testing.T) {
	b := testbed.NewT(t, testbed.Options{Hosts: 2})
	ctx := testCtx(t, 2*time.Minute)
	if err := b.WriteNetworkConfig(ctx, testbed.DualStackNetworkConfig); err != nil {
		t.Fatal(err)
	}
	flannel4, err := b.AddNode(ctx) // a lease without an IPv6 subnet
	if err != nil {
		t.Fatal(err)
	}
	flannel6, err := b.AddNode(ctx) // a dual-stack lease, flannel's, no features
	if err != nil {
		t.Fatal(err)
	}
	subnet6 := netip.MustParsePrefix("198.18.251.0/24")
	ipv6Subnet6 := netip.MustParsePrefix("2001:db8:1:fb::/64")
	if _, err := b.PutFlannelLease(ctx, flannelSubnet, flannel4.Addr, 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := b.PutFlannelDualStackLease(ctx, subnet6, ipv6Subnet6, flannel6.Addr, netip.Addr{}, 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	socks := map[*testbed.Node]*net.UDPConn{}
	for _, n := range []*testbed.Node{flannel4, flannel6} {
		s, err := n.ListenUDP(netip.AddrPortFrom(n.Addr, flannelPort))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		socks[n] = s
	}
	if err := b.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	h1 := b.Host(1)
	if _, _, err := waitMetric(t, ctx, h1, 5*time.Second, func(v float64) bool { return v == 3 }, "tulle_peers"); err != nil {
		t.Fatalf("host 1 does not count both flannel hosts as peers: %v", err)
	}
	c1, c2 := container(t, b, 1), container(t, b, 2)
	reach6(t, ctx, c1, c2, 1)

	// What flanneld sends for a container of its host is delivered.
	for n, sn := range map[*testbed.Node]netip.Prefix{flannel4: flannelSubnet, flannel6: subnet6} {
		rx := listener(t, c1)
		src := netip.AddrPortFrom(sn.Addr().Next().Next(), 40000)
		want := []byte("hello from a flannel host in a dual-stack network")
		sendTo(t, socks[n], h1, innerUDP(t, src, netip.AddrPortFrom(c1.Addr, port(rx)), 62, want), 1)
		if got, from := expectDatagram(t, rx, 5*time.Second); !bytes.Equal(got, want) || from != src {
			t.Errorf("container 1 received %q from %s, want %q from %s", got, from, want, src)
		}
	}

	// Container 1 sends IPv6 into the flannel host's IPv6 subnet: nothing
	// reaches it (it carries no IPv6); IPv4 to it still does.
	tx6 := listener6(t, c1)
	before := metric(t, ctx, h1, "tulle_dropped_packets_total", "direction", "transmit", "family", "ipv6")
	for i := 0; i < 5; i++ {
		if _, err := tx6.WriteToUDPAddrPort([]byte("IPv6 for a flannel host"), netip.AddrPortFrom(ipv6Subnet6.Addr().Next().Next(), 9)); err != nil {
			t.Fatal(err)
		}
	}
	if v, _, err := waitMetric(t, ctx, h1, 5*time.Second, func(v float64) bool { return v >= before+5 },
		"tulle_dropped_packets_total", "direction", "transmit", "family", "ipv6"); err != nil {
		t.Errorf("host 1 IPv6 transmit drops %v -> %v, want +5 (no IPv6 route to a flannel host): %v", before, v, err)
	}
	tx4 := listener(t, c1)
	dst4 := netip.AddrPortFrom(subnet6.Addr().Next().Next(), 9)
	if _, err := tx4.WriteToUDPAddrPort([]byte("IPv4 for a flannel host"), dst4); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	_ = socks[flannel6].SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		n, _, err := socks[flannel6].ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("the flannel host got no IPv4 datagram: %v", err)
		}
		if buf[0]>>4 == 6 {
			t.Fatalf("the flannel host was sent an IPv6 packet: %x", buf[:min(n, 64)])
		}
		if p := gopacket.NewPacket(buf[:n], layers.LayerTypeIPv4, gopacket.Default); p.ApplicationLayer() != nil &&
			string(p.ApplicationLayer().Payload()) == "IPv4 for a flannel host" {
			break // everything before it was IPv4 too
		}
	}
}
