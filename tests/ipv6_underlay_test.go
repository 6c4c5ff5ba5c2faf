package tests

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/tulle-net/tulle/tests/testbed"
)

// The IPv6 underlay: hosts 1 and 2 have IPv6 underlay addresses and the
// switch is on, so they talk over IPv6 (both families inside); host 3 has
// only IPv4 on its underlay, and 1 and 3 talk over IPv4.
func TestIPv6Underlay(t *testing.T) {
	b := testbed.NewT(t, testbed.Options{})
	ctx := testCtx(t, 2*time.Minute)
	h1, h2, h3 := b.Host(1), b.Host(2), b.Host(3)
	for _, h := range []*testbed.Host{h1, h2} {
		if _, err := h.AddIPv6Underlay(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.WriteNetworkConfig(ctx, testbed.DualStackIPv6UnderlayConfig); err != nil {
		t.Fatal(err)
	}
	if err := b.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	c1, c2, c3 := container(t, b, 1), container(t, b, 2), container(t, b, 3)
	for _, tc := range []struct {
		h      *testbed.Host
		mtu    int
		public string
	}{{h1, 1500 - 48, `"2001:db8:ffff::1"`}, {h2, 1500 - 48, `"2001:db8:ffff::2"`}, {h3, 1500 - 28, "null"}} {
		env, err := tc.h.SubnetEnv()
		if err != nil {
			t.Fatal(err)
		}
		if env.MTU != tc.mtu {
			t.Errorf("host %s: FLANNEL_MTU=%d, want %d", tc.h.Name, env.MTU, tc.mtu)
		}
		key, value := hostLease(t, ctx, b, tc.h)
		if !strings.Contains(value, `"PublicIPv6":`+tc.public) {
			t.Errorf("host %s: %s = %s, want PublicIPv6 %s", tc.h.Name, key, value, tc.public)
		}
	}

	// Host 2's underlay link sees host 1's datagrams in IPv6, and host
	// 3's link host 1's datagrams in IPv4.
	outer := func(n *testbed.Node, run func()) (v4, v6 int) {
		t.Helper()
		capture, err := n.Capture()
		if err != nil {
			t.Fatal(err)
		}
		defer capture.Close()
		run()
		for {
			frame, err := capture.Next(500 * time.Millisecond)
			if err != nil {
				return v4, v6
			}
			p := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
			udp, _ := p.Layer(layers.LayerTypeUDP).(*layers.UDP)
			if udp == nil || udp.DstPort != flannelPort {
				continue
			}
			if ip6, ok := p.Layer(layers.LayerTypeIPv6).(*layers.IPv6); ok && ip6.SrcIP.Equal(h1.Addr6.AsSlice()) {
				v6++
			} else if ip4, ok := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ok && ip4.SrcIP.Equal(h1.Addr.AsSlice()) {
				v4++
			}
		}
	}
	v4, v6 := outer(&h2.Node, func() {
		reach6(t, ctx, c1, c2, 3)
		reach(t, ctx, c1, c2, 3)
	})
	if v6 < 6 || v4 != 0 {
		t.Errorf("host 1 -> host 2: %d datagrams over IPv6, %d over IPv4; want all over IPv6", v6, v4)
	}
	v4, v6 = outer(&h3.Node, func() {
		reach6(t, ctx, c1, c3, 3)
		reach(t, ctx, c1, c3, 3)
	})
	if v4 < 6 || v6 != 0 {
		t.Errorf("host 1 -> host 3: %d datagrams over IPv4, %d over IPv6; want all over IPv4 (host 3 has no IPv6 underlay)", v4, v6)
	}
	for _, p := range []struct {
		from, to *testbed.Node
		dst      netip.Addr
	}{{c1, c2, c2.Addr6}, {c2, c1, c1.Addr}, {c3, c1, c1.Addr6}} {
		tr, err := testbed.TransferTCPTo(ctx, p.from, p.to, p.dst, 16<<20)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s -> %s (%s): %d bytes in %v (%s)", p.from.Name, p.to.Name, p.dst, tr.Bytes, tr.Elapsed, testbed.FormatBits(tr.BitsPerSecond()))
	}
}
