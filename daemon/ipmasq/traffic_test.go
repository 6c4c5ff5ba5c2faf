package ipmasq

import (
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/nstest"
)

// The masquerade test network; the rules run in "host":
//
//	[container] 198.18.79.2 --- 198.18.79.1 [host] 192.0.2.1 --- 192.0.2.2 [outside]
//	                                        [host] 198.18.80.1 --- 198.18.80.2 [peer]
//
// outside has no route back to 198.18.0.0/16, so only a masqueraded
// datagram can even be answered; peer stands for a container on another
// host of the overlay. The IPv6 one is the same:
//
//	[container] 2001:db8:1:4f::2 --- ::1 [host] 2001:db8:ffff::1 --- 2001:db8:ffff::2 [outside]
//	                                     [host] 2001:db8:1:50::1 --- 2001:db8:1:50::2 [peer]
type masqNet struct {
	env        string // "host,container,outside,peer" for the inner run
	forwarding string // the family's forwarding sysctl
	network    netip.Prefix
	lease      netip.Prefix
	// The veths from host to each namespace: host's end, the other end.
	container, outside, peer [2]netip.Prefix
}

func TestContainerTrafficIsMasqueradedOnlyWhenLeavingTheOverlay(t *testing.T) {
	p := netip.MustParsePrefix
	masqTraffic(t, masqNet{
		env: "TULLE_IPMASQ_TEST_NETNS", forwarding: "/proc/sys/net/ipv4/ip_forward",
		network: network, lease: lease,
		container: [2]netip.Prefix{p("198.18.79.1/24"), p("198.18.79.2/24")},
		outside:   [2]netip.Prefix{p("192.0.2.1/24"), p("192.0.2.2/24")},
		peer:      [2]netip.Prefix{p("198.18.80.1/24"), p("198.18.80.2/24")},
	})
}

func TestContainerIPv6TrafficIsMasqueradedOnlyWhenLeavingTheOverlay(t *testing.T) {
	p := netip.MustParsePrefix
	masqTraffic(t, masqNet{
		env: "TULLE_IPMASQ6_TEST_NETNS", forwarding: "/proc/sys/net/ipv6/conf/all/forwarding",
		network: network6, lease: lease6,
		container: [2]netip.Prefix{p("2001:db8:1:4f::1/64"), p("2001:db8:1:4f::2/64")},
		outside:   [2]netip.Prefix{p("2001:db8:ffff::1/64"), p("2001:db8:ffff::2/64")},
		peer:      [2]netip.Prefix{p("2001:db8:1:50::1/64"), p("2001:db8:1:50::2/64")},
	})
}

// masqTraffic builds n and, inside host, checks which datagrams the rules
// masquerade, and that none is after Remove.
func masqTraffic(t *testing.T, n masqNet) {
	if !nstest.InChild() {
		host := nstest.NewNetns(t)
		container, outside, peer := nstest.NewNetns(t), nstest.NewNetns(t), nstest.NewNetns(t)
		host.Veth(t, n.container[0].String(), container, n.container[1].String())
		host.Veth(t, n.outside[0].String(), outside, n.outside[1].String())
		host.Veth(t, n.peer[0].String(), peer, n.peer[1].String())
		container.DefaultRoute(t, n.container[0].Addr().String())
		peer.DefaultRoute(t, n.peer[0].Addr().String())
		t.Setenv(n.env, host.Name+","+container.Name+","+outside.Name+","+peer.Name)
		host.RunTestInNetns(t, t.Name())
		return
	}
	names := strings.Split(os.Getenv(n.env), ",")
	if len(names) != 4 {
		t.Fatalf("%s=%q", n.env, os.Getenv(n.env))
	}
	hostNS, containerNS, outsideNS, peerNS := names[0], names[1], names[2], names[3]
	if err := os.WriteFile(n.forwarding, []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := mustNew(t, n.network, n.lease)
	if _, err := r.Ensure(); err != nil {
		t.Fatal(err)
	}
	udp := "udp4"
	if n.network.Addr().Is6() {
		udp = "udp6"
	}

	// source sends one datagram from srcNS (bound to bind, if valid) to dst
	// in dstNS and returns the source address dstNS sees.
	source := func(srcNS string, bind netip.Addr, dstNS string, dst netip.AddrPort) netip.Addr {
		t.Helper()
		var rx *net.UDPConn
		if err := nstest.Do(dstNS, func() (err error) {
			rx, err = net.ListenUDP(udp, net.UDPAddrFromAddrPort(dst))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer rx.Close()
		var tx *net.UDPConn
		if err := nstest.Do(srcNS, func() (err error) {
			var laddr *net.UDPAddr
			if bind.IsValid() {
				laddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(bind, 0))
			}
			tx, err = net.ListenUDP(udp, laddr)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer tx.Close()
		if _, err := tx.WriteToUDPAddrPort([]byte("hello"), dst); err != nil {
			t.Fatal(err)
		}
		_ = rx.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 64)
		_, from, err := rx.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("%s -> %s: nothing arrived: %v", srcNS, dst, err)
		}
		return from.Addr()
	}

	ctr, hostOut, hostPeer := n.container[1].Addr(), n.outside[0].Addr(), n.peer[0].Addr()
	out := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(n.outside[1].Addr(), port) }
	peer := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(n.peer[1].Addr(), port) }
	for _, c := range []struct {
		what  string
		srcNS string
		bind  netip.Addr
		dstNS string
		dst   netip.AddrPort
		want  netip.Addr
		why   string
	}{
		{"container -> outside", containerNS, netip.Addr{}, outsideNS, out(5000), hostOut, "the host's, masqueraded"},
		{"container -> overlay peer", containerNS, netip.Addr{}, peerNS, peer(5001), ctr, "the container's own"},
		// The host itself, from its underlay address, to a remote
		// container: masqueraded to an overlay address the peer can answer.
		{"host (" + hostOut.String() + ") -> overlay peer", hostNS, hostOut, peerNS, peer(5002), hostPeer, "masqueraded"},
	} {
		if got := source(c.srcNS, c.bind, c.dstNS, c.dst); got != c.want {
			t.Errorf("%s arrived from %s, want %s (%s)", c.what, got, c.want, c.why)
		}
	}

	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	if got := source(containerNS, netip.Addr{}, outsideNS, out(5003)); got != ctr {
		t.Errorf("after Remove: container -> outside arrived from %s, want %s (no masquerade left)", got, ctr)
	}
}
