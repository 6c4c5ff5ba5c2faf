package udp

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
)

// dualLease is the lease event of a dual-stack Tulle host: IPv4 lease s,
// IPv6 lease s6, PublicIP pub, PublicIPv6 pub6 (may be zero), features.
func dualLease(s, s6 netip.Prefix, pub, pub6 netip.Addr, feats ...string) subnet.Event {
	return subnet.Event{Type: subnet.EventAdded, Lease: subnet.Lease{Subnet: s, IPv6Subnet: s6, Attrs: subnet.LeaseAttrs{
		PublicIP: pub, PublicIPv6: pub6, BackendData: HostInfo{Version: "test", Features: feats}.BackendData(),
	}}}
}

// tulleFeatures are what a dual-stack Tulle host advertises on an IPv4
// underlay.
var tulleFeatures = []string{FeaturePartialChecksum, FeatureIPv6}

// forwarding turns IP forwarding on in ns for both families, as Docker and
// CNI's bridge plugin do on a real host.
func forwarding(t testing.TB, ns netns.NsHandle) {
	t.Helper()
	err := nstest.In(ns, func() error {
		for _, f := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(f, []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// listenUDP6 opens a UDP socket of either family on addr inside ns.
func listenUDPAny(t testing.TB, ns netns.NsHandle, addr netip.AddrPort) *net.UDPConn {
	t.Helper()
	network := "udp4"
	if addr.Addr().Is6() {
		network = "udp6"
	}
	var c *net.UDPConn
	err := nstest.In(ns, func() error {
		var err error
		c, err = net.ListenUDP(network, net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		t.Fatalf("listen %v: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitLocal waits until the kernel delivers to addr in ns: it adds an
// address's local route from a work queue, after the address is added.
func waitLocal(t testing.TB, ns netns.NsHandle, addr netip.Addr) {
	t.Helper()
	waitFor(t, 5*time.Second, fmt.Sprintf("%v to be a local address", addr), func() bool {
		local := false
		nstest.In(ns, func() error {
			routes, err := netlink.RouteGet(addr.AsSlice())
			local = err == nil && len(routes) > 0 && routes[0].Type == unix.RTN_LOCAL
			return nil
		})
		return local
	})
}

var (
	leaseA6Addr = leaseA6.Addr() // A's TUN address: the first address of its IPv6 lease
	leaseB6Addr = leaseB6.Addr()
)

// dualPair starts a dual-stack backend on A and on B of h (IPv4 underlay
// unless mods say otherwise), each advertising featsA/featsB, and returns
// them with their TUN's IPv6 addresses, once these are local.
func dualPair(t *testing.T, h *twoHosts, driverB string, featsA, featsB []string, mods []func(*Options)) (a, b *Backend, addrA, addrB netip.Addr) {
	t.Helper()
	evA := dualLease(leaseA, leaseA6, hostA, netip.Addr{}, featsA...)
	evB := dualLease(leaseB, leaseB6, hostB, netip.Addr{}, featsB...)
	a = startBackendWith(t, h.a, h.tunName("a"), evA.Lease, "offload", 2, append([]func(*Options){dualStack}, mods...), evB)
	b = startBackendWith(t, h.b, h.tunName("b"), evB.Lease, driverB, 2,
		append([]func(*Options){dualStack, func(o *Options) { o.Lease.IPv6Subnet = leaseB6 }}, mods...), evA)
	waitLocal(t, h.a, leaseA6Addr)
	waitLocal(t, h.b, leaseB6Addr)
	return a, b, leaseA6Addr, leaseB6Addr
}

// dualHosts starts a dual-stack backend on A and on B (IPv4 underlay,
// both forwarding), each advertising featsA/featsB, and a container on B
// at 198.18.2.2 and 2001:db8:1:2::2.
func dualHosts(t *testing.T, driverB string, featsA, featsB []string) (h *twoHosts, a, b *Backend, ctr netns.NsHandle) {
	t.Helper()
	h = newTwoHosts(t)
	forwarding(t, h.a)
	forwarding(t, h.b)
	a, b, _, _ = dualPair(t, h, driverB, featsA, featsB, nil)
	ctr = h.container(t, h.b, netip.MustParseAddr("198.18.2.2"), netip.MustParseAddr("2001:db8:1:2::2"))
	return h, a, b, ctr
}

// TestIPv6TCPThroughPeersIsIntact carries TCP over IPv6 both ways between
// host A's TUN address and a container behind host B (whose veth has its
// transmit checksum offload off, so B's kernel computes what the tunnel
// left partial and the container verifies it), and IPv4 beside it: with
// both hosts on partial checksums, with B without them (complete
// checksums both ways), and with B on the water driver (it completes a
// partial checksum itself before writing).
func TestIPv6TCPThroughPeersIsIntact(t *testing.T) {
	for _, c := range []struct {
		name           string
		featsB         []string
		driverB        string
		alsoIPv4       bool
		partialReached bool
	}{
		{"both-tulle", tulleFeatures, "offload", true, true},
		{"b-without-partial-checksums", []string{FeatureIPv6}, "offload", false, false},
		{"b-water", tulleFeatures, "water", false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, a, b, ctr := dualHosts(t, c.driverB, tulleFeatures, c.featsB)
			transferBothWays(t, h.a, ctr, leaseA6Addr, netip.MustParseAddr("2001:db8:1:2::2"), 4<<20)
			if c.alsoIPv4 {
				transferBothWays(t, h.a, ctr, leaseA.Addr(), netip.MustParseAddr("198.18.2.2"), 1<<20)
			}
			for _, be := range []*Backend{a, b} {
				for f := range numFamilies {
					for _, r := range []dropReason{dropMalformed, dropSpoofedSource, dropForeignDestination, dropUnknownSender} {
						if n := droppedOf(be, "receive", f, r); n != 0 {
							t.Errorf("receive/%v/%v drops: %d", f, r, n)
						}
					}
				}
			}
			if got := a.partialWith(lookup6(a.table.Load(), "2001:db8:1:2::1")); got != c.partialReached {
				t.Errorf("A takes partial checksums with B: %v, want %v", got, c.partialReached)
			}
		})
	}
}

// TestIPv6UDPDatagramsAreDeliveredIntact sends UDP datagrams of many sizes
// over IPv6 from host A to a container behind host B; those above the TUN
// MTU leave A's kernel as IPv6 fragments (a fragment header between the
// fixed header and UDP), which travel as they are and are reassembled by
// the container.
func TestIPv6UDPDatagramsAreDeliveredIntact(t *testing.T) {
	h, _, b, ctr := dualHosts(t, "offload", tulleFeatures, tulleFeatures)
	dst := netip.MustParseAddrPort("[2001:db8:1:2::2]:6000")
	rcv := listenUDPAny(t, ctr, dst)
	snd := listenUDPAny(t, h.a, netip.AddrPortFrom(leaseA6Addr, 0))
	for i, size := range []int{1, 100, 1400, 1424, 1425, 5000, 60000} {
		msg := bytes.Repeat([]byte{byte('a' + i)}, size)
		copy(msg, fmt.Sprintf("%d:", size))
		if _, err := snd.WriteToUDPAddrPort(msg, dst); err != nil {
			t.Fatalf("send %d bytes: %v", size, err)
		}
		got, from := readUDP(t, rcv, 5*time.Second)
		if !bytes.Equal(got, msg) || from.Addr() != leaseA6Addr {
			t.Fatalf("datagram of %d bytes arrived as %d bytes from %v", size, len(got), from)
		}
	}
	if n := dropped(b, "receive", dropMalformed); n != 0 {
		t.Errorf("B dropped %d datagrams as malformed", n)
	}
}

// TestIPv6SpoofedSourceAndForeignDestinationAreDroppedAndCounted injects
// datagrams into A's data plane from B's underlay address (a peer that
// carries IPv6), from C's (a peer whose lease does not advertise IPv6) and
// from a stranger's: only a valid one reaches the application; the others
// are counted as receive drops of family ipv6 by reason.
func TestIPv6SpoofedSourceAndForeignDestinationAreDroppedAndCounted(t *testing.T) {
	h := newTwoHosts(t)
	leaseC := netip.MustParsePrefix("198.18.3.0/24")
	a := startBackendWith(t, h.a, h.tunName("a"), dualLease(leaseA, leaseA6, hostA, netip.Addr{}, tulleFeatures...).Lease, "offload", 2,
		[]func(*Options){dualStack},
		dualLease(leaseB, leaseB6, hostB, netip.Addr{}, tulleFeatures...),
		dualLease(leaseC, leaseC6, stranger, netip.Addr{}, FeaturePartialChecksum)) // 192.0.2.3: no FeatureIPv6
	waitLocal(t, h.a, leaseA6Addr)
	local := netip.AddrPortFrom(leaseA6Addr, 9999)
	app := listenUDPAny(t, h.a, local)
	peerSock := listenUDP(t, h.b, netip.AddrPortFrom(hostB, 0))
	cSock := listenUDP(t, h.b, netip.AddrPortFrom(stranger, 0))
	var strangerSock *net.UDPConn
	if err := nstest.In(h.b, func() error {
		return setupLink(h.prefix+"vb", netip.MustParsePrefix("192.0.2.4/24"))
	}); err != nil {
		t.Fatal(err)
	}
	strangerSock = listenUDP(t, h.b, netip.MustParseAddrPort("192.0.2.4:0"))
	to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(hostA, subnet.DefaultPort))
	send := func(c *net.UDPConn, pkt []byte) {
		t.Helper()
		if _, err := c.WriteToUDP(pkt, to); err != nil {
			t.Fatal(err)
		}
	}
	inner := func(src, dst string) []byte {
		p := ipv6(src, dst, 48+5, 64)
		copy(p[48:], "hello")
		binary := p[40:]
		binary[2], binary[3] = 0x27, 0x0f // destination port 9999
		binary[6], binary[7] = 0, 0
		c := proto.Checksum(binary, uint64(proto.PseudoHeaderSumIPv6(proto.IPv6Src(p), proto.IPv6Dst(p), proto.ProtoUDP, len(binary))))
		binary[6], binary[7] = byte(c>>8), byte(c)
		return p
	}

	send(peerSock, inner("2001:db8:1:2::5", leaseA6Addr.String()))
	got, from := readUDP(t, app, 5*time.Second)
	if string(got) != "hello" || from.Addr() != netip.MustParseAddr("2001:db8:1:2::5") {
		t.Fatalf("app got %q from %v", got, from)
	}
	cases := []sentDrop{
		{"from a stranger", strangerSock, inner("2001:db8:1:2::5", leaseA6Addr.String()), dropUnknownSender},
		{"spoofed inner source (C's IPv6 lease, from B)", peerSock, inner("2001:db8:1:3::5", leaseA6Addr.String()), dropSpoofedSource},
		{"from C, which does not carry IPv6", cSock, inner("2001:db8:1:3::5", leaseA6Addr.String()), dropSpoofedSource},
		{"foreign destination", peerSock, inner("2001:db8:1:2::5", "2001:db8:1:3::1"), dropForeignDestination},
		{"truncated", peerSock, inner("2001:db8:1:2::5", leaseA6Addr.String())[:50], dropTruncated},
	}
	wantReceiveDrops(t, a, famIPv6, send, cases)
	expectNothing(t, app, 200*time.Millisecond)
	text := collectText(t, a)
	wantScrapeLines(t, text,
		`tulle_dropped_packets_total{direction="receive",family="ipv6",reason="spoofed_source"} 2`,
		`tulle_dropped_packets_total{direction="receive",family="ipv6",reason="unknown_sender"} 1`,
		`tulle_dropped_packets_total{direction="receive",family="ipv4",reason="spoofed_source"} 0`,
		`tulle_peer_receive_packets_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 1`,
	)
}

// TestIPv6PacketTooBigAndPathMTUDiscovery lowers the underlay route MTU
// to B (as an ICMP from the underlay would), on an IPv4 and on an IPv6
// underlay: a packet that no longer fits is answered with ICMPv6 Packet
// Too Big carrying the inner path MTU (the path's less 28, or 48), which
// the sending kernel learns; and a TCP transfer over IPv6 completes across
// the smaller path.
func TestIPv6PacketTooBigAndPathMTUDiscovery(t *testing.T) {
	for _, six := range []bool{false, true} {
		t.Run(map[bool]string{false: "ipv4-underlay", true: "ipv6-underlay"}[six], func(t *testing.T) {
			testPacketTooBig(t, six)
		})
	}
}

func testPacketTooBig(t *testing.T, six bool) {
	h := newTwoHosts(t)
	const pathMTU = 1400 // inner 1372 or 1352: above the IPv6 minimum
	overhead, peerAddr := proto.EncapOverhead, hostB
	evA := dualLease(leaseA, leaseA6, hostA, netip.Addr{}, tulleFeatures...)
	evB := dualLease(leaseB, leaseB6, hostB, netip.Addr{}, tulleFeatures...)
	modsA := []func(*Options){dualStack}
	modsB := []func(*Options){dualStack, func(o *Options) { o.Lease.IPv6Subnet = leaseB6 }}
	if six {
		h.addUnderlay6(t)
		overhead, peerAddr = proto.EncapOverheadIPv6, hostB6
		evA = dualLease(leaseA, leaseA6, hostA, hostA6, features6u...)
		evB = dualLease(leaseB, leaseB6, hostB, hostB6, features6u...)
		modsA, modsB = append(modsA, underlay6Of(hostA6)), append(modsB, underlay6Of(hostB6))
	}
	err := nstest.In(h.a, func() error {
		l, err := netlink.LinkByName(h.vethA)
		if err != nil {
			return err
		}
		return netlink.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(netip.PrefixFrom(peerAddr, peerAddr.BitLen())), MTU: pathMTU, MTULock: true})
	})
	if err != nil {
		t.Fatal(err)
	}
	forwarding(t, h.b)
	a := startBackendWith(t, h.a, h.tunName("a"), evA.Lease, "offload", 1, modsA, evB)
	startBackendWith(t, h.b, h.tunName("b"), evB.Lease, "offload", 1, modsB, evA)
	ctr := h.container(t, h.b, netip.MustParseAddr("2001:db8:1:2::2"))
	waitLocal(t, h.a, leaseA6Addr)
	dst := netip.MustParseAddrPort("[2001:db8:1:2::5]:7777")
	inner := pathMTU - overhead

	fd := connectedDgram(t, h.a, leaseA6Addr, dst, unix.IPPROTO_IPV6, unix.IPV6_DONTFRAG, 1)

	// A first small packet makes B an active peer; the prober learns the path.
	if _, err := unix.Write(fd, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	p := lookup6(a.table.Load(), "2001:db8:1:2::5")
	waitFor(t, 3*time.Second, "the path MTU to B to be learned", func() bool {
		return int(p.innerMTU.Load()) == inner
	})
	// 1430 bytes fit the TUN MTU (1472 or 1452) but not the path.
	if _, err := unix.Write(fd, make([]byte, 1430-48)); err != nil {
		t.Fatalf("first large send: %v", err)
	}
	waitFor(t, 3*time.Second, fmt.Sprintf("the kernel to learn PMTU %d from our ICMPv6 Packet Too Big", inner), func() bool {
		mtu, err := unix.GetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MTU)
		return err == nil && mtu == inner
	})
	if got := droppedOf(a, "transmit", famIPv6, dropOversize); got != 1 {
		t.Errorf("transmit ipv6/oversize drops = %d, want 1", got)
	}
	if _, err := unix.Write(fd, make([]byte, 1430-48)); err != syscall.EMSGSIZE {
		t.Errorf("second large send: %v, want EMSGSIZE from the learned PMTU", err)
	}
	// TCP learns the path the same way and completes.
	transferBothWays(t, h.a, ctr, leaseA6Addr, netip.MustParseAddr("2001:db8:1:2::2"), 1<<20)
}

// TestPeerWithoutTheIPv6FeatureIsNeverSentIPv6: B's lease has an IPv6
// subnet but does not advertise FeatureIPv6 (a Tulle host with IPv6 off,
// or one that predates it; a flannel host has no IPv6 subnet at all): A
// sends it IPv4 as always, never IPv6, which it counts as transmit
// ipv6/no_route and answers with ICMPv6 address unreachable.
func TestPeerWithoutTheIPv6FeatureIsNeverSentIPv6(t *testing.T) {
	h := newTwoHosts(t)
	a := startBackendWith(t, h.a, h.tunName("a"), dualLease(leaseA, leaseA6, hostA, netip.Addr{}, tulleFeatures...).Lease, "offload", 2,
		[]func(*Options){dualStack}, dualLease(leaseB, leaseB6, hostB, netip.Addr{}, FeaturePartialChecksum))
	waitLocal(t, h.a, leaseA6Addr)
	bSock := listenUDP(t, h.b, netip.AddrPortFrom(hostB, subnet.DefaultPort)) // B's port, as a plain socket sees it
	// A connected socket that takes ICMPv6 errors (IPV6_RECVERR: without
	// it the kernel reports only hard errors, and address unreachable is
	// a soft one).
	fd := connectedDgram(t, h.a, leaseA6Addr, netip.MustParseAddrPort("[2001:db8:1:2::5]:7777"), unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1)
	if _, err := unix.Write(fd, []byte("v6")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the ICMPv6 error to reach the sending socket", func() bool {
		soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR) // reads and clears it
		if err != nil {
			t.Fatal(err)
		}
		if soErr != 0 && syscall.Errno(soErr) != syscall.EHOSTUNREACH {
			t.Fatalf("socket error after the send to a peer without IPv6: %v, want EHOSTUNREACH (ICMPv6 address unreachable)", syscall.Errno(soErr))
		}
		return soErr != 0
	})
	if n := droppedOf(a, "transmit", famIPv6, dropNoRoute); n != 1 {
		t.Errorf("transmit ipv6/no_route drops = %d, want 1", n)
	}
	expectNothing(t, bSock, 300*time.Millisecond)
	// IPv4 still goes.
	src := listenUDP(t, h.a, netip.AddrPortFrom(leaseA.Addr(), 0))
	if _, err := src.WriteToUDPAddrPort([]byte("v4"), netip.MustParseAddrPort("198.18.2.5:7777")); err != nil {
		t.Fatal(err)
	}
	pkt, _ := readUDP(t, bSock, 5*time.Second)
	if proto.Version(pkt) != 4 || !bytes.HasSuffix(pkt, []byte("v4")) {
		t.Fatalf("B's port got % x, want the IPv4 packet", pkt)
	}
}

// TestNoDropAtStartWithIPv6On: tulle0 with IPv6 on has no link-local
// address, so the kernel sends nothing into it by itself (no router or
// neighbour solicitations, no MLD reports) even on a forwarding host: no
// drop is counted and the TUN carries no packet while no application
// sends.
func TestNoDropAtStartWithIPv6On(t *testing.T) {
	h := newTwoHosts(t)
	forwarding(t, h.a)
	forwarding(t, h.b)
	evA := dualLease(leaseA, leaseA6, hostA, netip.Addr{}, tulleFeatures...)
	evB := dualLease(leaseB, leaseB6, hostB, netip.Addr{}, tulleFeatures...)
	a := startBackendWith(t, h.a, h.tunName("a"), evA.Lease, "offload", 2, []func(*Options){dualStack}, evB)
	b := startBackendWith(t, h.b, h.tunName("b"), evB.Lease, "offload", 2,
		[]func(*Options){func(o *Options) { dualStack(o); o.Lease.IPv6Subnet = leaseB6 }}, evA)
	// The kernel sends its first solicitations and reports at once when a
	// link comes up and repeats them within about a second (MLD's
	// unsolicited report interval, RFC 4861's RTR_SOLICITATION_INTERVAL is
	// 4 s but the first goes at once): watch for 2.5 s.
	deadline := time.Now().Add(2500 * time.Millisecond)
	for time.Now().Before(deadline) {
		for _, c := range []struct {
			name string
			ns   netns.NsHandle
			be   *Backend
			tun  string
		}{{"A", h.a, a, h.tunName("a")}, {"B", h.b, b, h.tunName("b")}} {
			for _, dir := range []string{"transmit", "receive"} {
				for f := range numFamilies {
					for r := range numDropReasons {
						if n := droppedOf(c.be, dir, f, r); n != 0 {
							t.Fatalf("host %s counted %d %s/%v/%v drops with no traffic", c.name, n, dir, f, r)
						}
					}
				}
			}
			if tx, _ := tunStats(t, c.ns, c.tun); tx != 0 {
				t.Fatalf("host %s's kernel sent %d packets into its TUN by itself", c.name, tx)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The TUN has its lease's address and no link-local one.
	err := nstest.In(h.a, func() error {
		l, err := netlink.LinkByName(h.tunName("a"))
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			return err
		}
		if len(addrs) != 1 || addrs[0].IPNet.String() != "2001:db8:1:1::/128" {
			return fmt.Errorf("IPv6 addresses of the TUN: %v, want only 2001:db8:1:1::/128", addrs)
		}
		routes, err := netlink.RouteList(l, netlink.FAMILY_V6)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Dst != nil && r.Dst.String() == network6.String() {
				return nil
			}
		}
		return fmt.Errorf("no route %v dev %s: %v", network6, h.tunName("a"), routes)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// The IPv6 underlay of the two hosts (2001:db8:ffff::/64).
var (
	hostA6     = netip.MustParseAddr("2001:db8:ffff::1")
	hostB6     = netip.MustParseAddr("2001:db8:ffff::2")
	stranger6  = netip.MustParseAddr("2001:db8:ffff::3")
	features6u = []string{FeaturePartialChecksum, FeatureIPv6, FeatureIPv6Underlay}
)

// addUnderlay6 gives the hosts' veths IPv6 addresses: A hostA6, B hostB6
// and stranger6 (no duplicate address detection).
func (h *twoHosts) addUnderlay6(t testing.TB) {
	t.Helper()
	for _, c := range []struct {
		ns    netns.NsHandle
		link  string
		addrs []netip.Addr
	}{{h.a, h.vethA, []netip.Addr{hostA6}}, {h.b, h.prefix + "vb", []netip.Addr{hostB6, stranger6}}} {
		err := nstest.In(c.ns, func() error {
			if err := enableIPv6(c.link); err != nil {
				return err
			}
			l, err := netlink.LinkByName(c.link)
			if err != nil {
				return err
			}
			for _, a := range c.addrs {
				if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(a, 64)), Flags: unix.IFA_F_NODAD}); err != nil {
					return fmt.Errorf("%s: add %v: %w", c.link, a, err)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range c.addrs {
			waitLocal(t, c.ns, a)
		}
	}
}

// underlay6Of makes a backend's options use the IPv6 underlay with
// PublicIPv6 pub6 (TUN MTU 1500 - 48, as the daemon computes it).
func underlay6Of(pub6 netip.Addr) func(*Options) {
	return func(o *Options) {
		o.PublicIPv6, o.IPv6Underlay = pub6, true
		o.MTU = 1500 - proto.EncapOverheadIPv6
	}
}

// rxFrom sums the packets the RX loops of be's sockets of one family
// (underlay6: the IPv6 ones) accepted from peer p.
func rxFrom(be *Backend, p *peer, six bool) uint64 {
	var n uint64
	for _, w := range be.workers {
		rx := &w.rx
		if six {
			if w.conn6 == nil {
				continue
			}
			rx = &w.rx6
		}
		if c := rx.stats.peerOrNil(p.index); c != nil {
			n += c.packets.Load()
		}
	}
	return n
}

// TestIPv6UnderlayCarriesBothFamilies: two hosts with the IPv6 underlay
// switch on and PublicIPv6 addresses talk over IPv6 only, and carry TCP
// over IPv4 and IPv6 intact; the mixed pair (B on an IPv4-only underlay)
// talks over IPv4 and carries both as well.
func TestIPv6UnderlayCarriesBothFamilies(t *testing.T) {
	for _, c := range []struct {
		name  string
		bSix  bool // B has the IPv6 underlay too
		over6 bool // so they talk over IPv6
	}{{"both-ipv6-underlay", true, true}, {"mixed-pair", false, false}} {
		t.Run(c.name, func(t *testing.T) {
			h := newTwoHosts(t)
			h.addUnderlay6(t)
			forwarding(t, h.b)
			evA := dualLease(leaseA, leaseA6, hostA, hostA6, features6u...)
			evB := dualLease(leaseB, leaseB6, hostB, netip.Addr{}, tulleFeatures...)
			modsB := []func(*Options){dualStack, func(o *Options) { o.Lease.IPv6Subnet = leaseB6 }}
			if c.bSix {
				evB = dualLease(leaseB, leaseB6, hostB, hostB6, features6u...)
				modsB = append(modsB, underlay6Of(hostB6))
			}
			a := startBackendWith(t, h.a, h.tunName("a"), evA.Lease, "offload", 2, []func(*Options){dualStack, underlay6Of(hostA6)}, evB)
			b := startBackendWith(t, h.b, h.tunName("b"), evB.Lease, "offload", 2, modsB, evA)
			ctr := h.container(t, h.b, netip.MustParseAddr("198.18.2.2"), netip.MustParseAddr("2001:db8:1:2::2"))
			waitLocal(t, h.a, leaseA6Addr)
			pa := a.table.Load().lookup(addr32("198.18.2.1")) // B, as A sees it
			pb := b.table.Load().lookup(addr32("198.18.1.1"))
			wantA := netip.AddrPortFrom(hostB, subnet.DefaultPort)
			if c.over6 {
				wantA = netip.AddrPortFrom(hostB6, subnet.DefaultPort)
			}
			if pa.addr != wantA {
				t.Fatalf("A sends to B at %v, want %v", pa.addr, wantA)
			}
			transferBothWays(t, h.a, ctr, leaseA6Addr, netip.MustParseAddr("2001:db8:1:2::2"), 2<<20)
			transferBothWays(t, h.a, ctr, leaseA.Addr(), netip.MustParseAddr("198.18.2.2"), 1<<20)
			// Which sockets carried it: B received from A on its IPv6
			// sockets only, or on its IPv4 ones only.
			if six, four := rxFrom(b, pb, true), rxFrom(b, pb, false); (six > 0) != c.over6 || (four > 0) == c.over6 {
				t.Errorf("B received %d packets from A on its IPv6 sockets and %d on its IPv4 ones", six, four)
			}
			if six, four := rxFrom(a, pa, true), rxFrom(a, pa, false); (six > 0) != c.over6 || (four > 0) == c.over6 {
				t.Errorf("A received %d packets from B on its IPv6 sockets and %d on its IPv4 ones", six, four)
			}
		})
	}
}

// TestIPv6UnderlayPeerIsAcceptedFromEitherAddress: a peer's datagrams are
// taken from its PublicIP and from its PublicIPv6; a stranger's IPv6
// address is an unknown sender.
func TestIPv6UnderlayPeerIsAcceptedFromEitherAddress(t *testing.T) {
	h := newTwoHosts(t)
	h.addUnderlay6(t)
	a := startBackendWith(t, h.a, h.tunName("a"), dualLease(leaseA, leaseA6, hostA, hostA6, features6u...).Lease, "offload", 2,
		[]func(*Options){dualStack, underlay6Of(hostA6)}, dualLease(leaseB, leaseB6, hostB, hostB6, features6u...))
	local := netip.AddrPortFrom(leaseA.Addr(), 9999)
	app := listenUDP(t, h.a, local)
	fromB := netip.MustParseAddrPort("198.18.2.5:4444")
	for _, src := range []netip.Addr{hostB, hostB6} {
		sock := listenUDPAny(t, h.b, netip.AddrPortFrom(src, 0))
		to := netip.AddrPortFrom(hostA, subnet.DefaultPort)
		if src.Is6() {
			to = netip.AddrPortFrom(hostA6, subnet.DefaultPort)
		}
		if _, err := sock.WriteToUDPAddrPort(innerUDP(fromB, local, []byte(src.String())), to); err != nil {
			t.Fatal(err)
		}
		got, _ := readUDP(t, app, 5*time.Second)
		if string(got) != src.String() {
			t.Fatalf("app got %q, want the datagram from %v", got, src)
		}
	}
	sock := listenUDPAny(t, h.b, netip.AddrPortFrom(stranger6, 0))
	if _, err := sock.WriteToUDPAddrPort(innerUDP(fromB, local, []byte("x")), netip.AddrPortFrom(hostA6, subnet.DefaultPort)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "a stranger's IPv6 datagram counted as unknown_sender", func() bool {
		return droppedOf(a, "receive", famIPv4, dropUnknownSender) == 1
	})
	expectNothing(t, app, 200*time.Millisecond)
}

// TestIPv6UnderlaySocketsAreBoundToThePublicIPv6: the IPv6 sockets are
// bound to our PublicIPv6, so that our datagrams leave from the address
// peers know (the test hosts' B side has two on one prefix); one that is
// not on this host (a 1:1 NAT) falls back to [::].
func TestIPv6UnderlaySocketsAreBoundToThePublicIPv6(t *testing.T) {
	h := newTwoHosts(t)
	h.addUnderlay6(t)
	b := startBackendWith(t, h.b, h.tunName("b"), dualLease(leaseB, leaseB6, hostB, hostB6, features6u...).Lease, "offload", 2,
		[]func(*Options){dualStack, func(o *Options) { o.Lease.IPv6Subnet = leaseB6 }, underlay6Of(hostB6)})
	nat := netip.MustParseAddr("2001:db8:ffff::99")
	a := startBackendWith(t, h.a, h.tunName("a"), dualLease(leaseA, leaseA6, hostA, nat, features6u...).Lease, "offload", 2,
		[]func(*Options){dualStack, underlay6Of(nat)})
	for _, c := range []struct {
		be   *Backend
		want netip.Addr
	}{{b, hostB6}, {a, netip.IPv6Unspecified()}} {
		for _, w := range c.be.workers {
			if got := w.conn6.LocalAddr(); got != netip.AddrPortFrom(c.want, subnet.DefaultPort) {
				t.Errorf("worker %d's IPv6 socket is bound to %v, want %v", w.id, got, netip.AddrPortFrom(c.want, subnet.DefaultPort))
			}
		}
	}
}
