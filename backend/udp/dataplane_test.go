package udp

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend/internal/fdpoll"
	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
)

var drivers = []string{"offload", "water"}

// tunName is the per-run name of a test's TUN device (one per namespace).
func (h *twoHosts) tunName(host string) string { return h.prefix + "t" + host }

func TestPacketFromTUNReachesPeerAsBareIPv4WithTTLDecremented(t *testing.T) {
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			h := newTwoHosts(t)
			b := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, driver, 2, lease(leaseB, hostB))
			// B is a plain socket on the peer's port, as a flannel host's would be.
			flannel := listenUDP(t, h.b, netip.AddrPortFrom(hostB, subnet.DefaultPort))
			src := listenUDP(t, h.a, netip.AddrPortFrom(leaseA.Addr(), 0))
			dst := netip.MustParseAddrPort("198.18.2.5:7777")
			if _, err := src.WriteToUDPAddrPort([]byte("hello over the overlay"), dst); err != nil {
				t.Fatal(err)
			}
			pkt, from := readUDP(t, flannel, 5*time.Second)
			if from != netip.AddrPortFrom(hostA, subnet.DefaultPort) {
				t.Errorf("datagram from %v, want %v:%d", from, hostA, subnet.DefaultPort)
			}
			total, err := proto.CheckIPv4(pkt)
			if err != nil || total != len(pkt) {
				t.Fatalf("payload is not a bare IPv4 packet: %v (total %d, %d bytes)", err, total, len(pkt))
			}
			if proto.IPv4SrcAddr(pkt) != leaseA.Addr() || proto.IPv4DstAddr(pkt) != dst.Addr() {
				t.Errorf("inner %v -> %v", proto.IPv4SrcAddr(pkt), proto.IPv4DstAddr(pkt))
			}
			if proto.IPv4TTL(pkt) != 63 || !proto.IPv4HeaderChecksumValid(pkt) {
				t.Errorf("inner TTL %d (want 63: 64 less our decrement), checksum valid %v", proto.IPv4TTL(pkt), proto.IPv4HeaderChecksumValid(pkt))
			}
			if !bytes.HasSuffix(pkt, []byte("hello over the overlay")) {
				t.Errorf("payload lost: % x", pkt)
			}
			waitFor(t, 2*time.Second, "transmit counters", func() bool {
				return strings.Contains(collectText(t, b), `tulle_peer_transmit_packets_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 1`+"\n")
			})
		})
	}
}

// TestReceiveDeliversValidAndDropsUntrusted sends datagrams to A's port
// from B (a peer, from an arbitrary source port) and from a stranger.
func TestReceiveDeliversValidAndDropsUntrusted(t *testing.T) {
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			h := newTwoHosts(t)
			b := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, driver, 2, lease(leaseB, hostB))
			local := netip.AddrPortFrom(leaseA.Addr(), 9999)
			app := listenUDP(t, h.a, local) // an application on host A
			peerSock := listenUDP(t, h.b, netip.AddrPortFrom(hostB, 0))
			strangerSock := listenUDP(t, h.b, netip.AddrPortFrom(stranger, 0))
			to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(hostA, subnet.DefaultPort))
			send := func(c *net.UDPConn, pkt []byte) {
				t.Helper()
				if _, err := c.WriteToUDP(pkt, to); err != nil {
					t.Fatal(err)
				}
			}
			fromB := netip.MustParseAddrPort("198.18.2.5:4444")

			// A valid datagram is written to the TUN and reaches the socket.
			send(peerSock, innerUDP(fromB, local, []byte("valid")))
			got, from := readUDP(t, app, 5*time.Second)
			if string(got) != "valid" || from != fromB {
				t.Fatalf("app got %q from %v", got, from)
			}

			// A datagram of 60,000 bytes is delivered whole, not truncated to the MTU.
			big := bytes.Repeat([]byte("0123456789"), 6000)
			send(peerSock, innerUDP(fromB, local, big))
			got, _ = readUDP(t, app, 5*time.Second)
			if !bytes.Equal(got, big) {
				t.Fatalf("large datagram arrived with %d bytes, want %d", len(got), len(big))
			}

			cases := []sentDrop{
				{"from a non-peer", strangerSock, innerUDP(fromB, local, []byte("x")), dropUnknownSender},
				{"spoofed inner source", peerSock, innerUDP(netip.MustParseAddrPort("198.18.3.5:4444"), local, []byte("x")), dropSpoofedSource},
				{"foreign destination", peerSock, innerUDP(fromB, netip.MustParseAddrPort("198.18.3.1:9999"), []byte("x")), dropForeignDestination},
				{"truncated inner packet", peerSock, innerUDP(fromB, local, []byte("0123456789"))[:30], dropTruncated},
				{"malformed inner packet", peerSock, []byte("not an IP packet at all"), dropMalformed},
			}
			wantReceiveDrops(t, b, numFamilies, send, cases)
			expectNothing(t, app, 200*time.Millisecond)
			text := collectText(t, b)
			wantScrapeLines(t, text,
				`tulle_dropped_packets_total{direction="receive",family="ipv4",reason="unknown_sender"} 1`,
				`tulle_dropped_packets_total{direction="receive",family="ipv4",reason="spoofed_source"} 1`,
				`tulle_peer_receive_packets_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 2`,
			)
		})
	}
}

// TestTwoHostsCarryTrafficBothWays runs a backend on each host and sends
// UDP between their TUN addresses, while Apply rebuilds A's table over and
// over (run with -race).
func TestTwoHostsCarryTrafficBothWays(t *testing.T) {
	h := newTwoHosts(t)
	a := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, "offload", 2, lease(leaseB, hostB))
	startBackend(t, h.b, h.tunName("b"), leaseB, hostB, "offload", 2, lease(leaseA, hostA))
	sa := listenUDP(t, h.a, netip.AddrPortFrom(leaseA.Addr(), 5000))
	sb := listenUDP(t, h.b, netip.AddrPortFrom(leaseB.Addr(), 5000))

	stop := make(chan struct{})
	applied := make(chan int)
	go func() {
		n := 0
		defer func() { applied <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			s := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(10 + n%200), 0}), 24)
			a.Apply([]subnet.Event{lease(s, netip.AddrFrom4([4]byte{198, 51, 100, byte(1 + n%250)}))})
			a.Apply([]subnet.Event{{Type: subnet.EventRemoved, Lease: subnet.Lease{Subnet: s}}})
			n++
		}
	}()
	for i := 0; i < 200; i++ {
		msg := []byte(fmt.Sprintf("a->b %d", i))
		if _, err := sa.WriteToUDPAddrPort(msg, netip.AddrPortFrom(leaseB.Addr(), 5000)); err != nil {
			t.Fatal(err)
		}
		got, _ := readUDP(t, sb, 5*time.Second)
		if !bytes.Equal(got, msg) {
			t.Fatalf("b got %q, want %q", got, msg)
		}
		reply := []byte(fmt.Sprintf("b->a %d", i))
		if _, err := sb.WriteToUDPAddrPort(reply, netip.AddrPortFrom(leaseA.Addr(), 5000)); err != nil {
			t.Fatal(err)
		}
		got, _ = readUDP(t, sa, 5*time.Second)
		if !bytes.Equal(got, reply) {
			t.Fatalf("a got %q, want %q", got, reply)
		}
	}
	close(stop)
	t.Logf("%d table rebuilds while forwarding", <-applied)
}

// TestDFPacketAbovePathMTUGetsFragmentationNeeded lowers the underlay
// route MTU to B (as an ICMP from the underlay would) and checks that a DF
// packet that no longer fits is answered with ICMP "fragmentation needed"
// carrying the inner path MTU, which the sending kernel then learns.
func TestDFPacketAbovePathMTUGetsFragmentationNeeded(t *testing.T) {
	h := newTwoHosts(t)
	const pathMTU = 1200
	err := nstest.In(h.a, func() error {
		l, err := netlink.LinkByName(h.vethA)
		if err != nil {
			return err
		}
		return netlink.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(netip.PrefixFrom(hostB, 32)), MTU: pathMTU, MTULock: true})
	})
	if err != nil {
		t.Fatal(err)
	}
	b := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, "offload", 1, lease(leaseB, hostB))
	dst := netip.MustParseAddrPort("198.18.2.5:7777")

	fd := connectedDgram(t, h.a, netip.Addr{}, dst, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)

	// A first small packet makes B an active peer; the prober learns the path.
	if _, err := unix.Write(fd, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	p := b.table.Load().lookup(addr32("198.18.2.5"))
	waitFor(t, 3*time.Second, "the path MTU to B to be learned", func() bool {
		return p.innerMTU.Load() == pathMTU-proto.EncapOverhead
	})

	// 1300 bytes fit the TUN MTU (1472) but not the path (1200 - 28).
	if _, err := unix.Write(fd, make([]byte, 1300)); err != nil {
		t.Fatalf("first large DF send: %v", err)
	}
	waitFor(t, 3*time.Second, "the kernel to learn PMTU 1172 from our ICMP", func() bool {
		mtu, err := unix.GetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU)
		return err == nil && mtu == pathMTU-proto.EncapOverhead
	})
	if got := dropped(b, "transmit", dropOversize); got != 1 {
		t.Errorf("transmit oversize drops = %d, want 1", got)
	}
	if _, err := unix.Write(fd, make([]byte, 1300)); err != syscall.EMSGSIZE {
		t.Errorf("second large DF send: %v, want EMSGSIZE from the learned PMTU", err)
	}
}

func TestTruncatedDatagramIsDroppedAndCounted(t *testing.T) {
	// A 64 KiB receive buffer holds any UDP datagram, so the kernel cannot
	// be made to truncate one; exercise the path with what ReadBatch
	// reports for one that did not fit.
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")})
	rx := &b.workers[0].rx
	rx.msgs[0].N = len(rx.msgs[0].Buf)
	rx.msgs[0].Truncated = true
	rx.msgs[0].Addr = netip.MustParseAddrPort("192.0.2.2:8285")
	if err := rx.deliver(b.table.Load(), 1); err != nil {
		t.Fatal(err)
	}
	if got := dropped(b, "receive", dropTruncated); got != 1 {
		t.Errorf("truncated drops = %d, want 1", got)
	}
}

func TestCloseRemovesDeviceAndRoute(t *testing.T) {
	h := newTwoHosts(t)
	var b *Backend
	name := h.tunName("a")
	err := nstest.In(h.a, func() error {
		// New links get IPv6 here, as on a host; New must turn it off.
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/default/disable_ipv6", []byte("0"), 0o644); err != nil {
			return err
		}
		var err error
		b, err = New(Options{TunName: name, Workers: 2, PublicIP: hostA, MTU: 1472, Network: network, SubnetLen: 24,
			Lease: subnet.Lease{Subnet: leaseA}, Logger: discardLogger()})
		if err != nil {
			return err
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		if l.Attrs().MTU != 1472 || l.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("link MTU %d flags %v", l.Attrs().MTU, l.Attrs().Flags)
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V4)
		if err != nil || len(addrs) != 1 || addrs[0].IPNet.String() != "198.18.1.0/32" {
			return fmt.Errorf("addresses %v %v, want 198.18.1.0/32", addrs, err)
		}
		if v6, err := netlink.AddrList(l, netlink.FAMILY_V6); err != nil || len(v6) != 0 {
			return fmt.Errorf("IPv6 addresses %v %v on the IPv4-only TUN, want none", v6, err)
		}
		routes, err := netlink.RouteList(l, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		found := false
		for _, r := range routes {
			found = found || (r.Dst != nil && r.Dst.String() == network.String() && r.Scope == netlink.SCOPE_LINK)
		}
		if !found {
			return fmt.Errorf("no route %v dev %s scope link in %v", network, name, routes)
		}
		// A second backend on the same port is refused with a clear error.
		_, err = New(Options{TunName: name + "x", PublicIP: hostA, MTU: 1472, Network: network, SubnetLen: 24,
			Lease: subnet.Lease{Subnet: leaseA}, Logger: discardLogger()})
		if err == nil || !strings.Contains(err.Error(), "already in use") {
			return fmt.Errorf("second backend on port 8285: %v, want 'already in use'", err)
		}
		if _, err := netlink.LinkByName(name + "x"); err == nil {
			return fmt.Errorf("failed New left device %sx behind", name)
		}
		return nil
	})
	if err != nil {
		if b != nil {
			b.Close()
		}
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	err = nstest.In(h.a, func() error {
		if _, err := netlink.LinkByName(name); err == nil {
			return fmt.Errorf("device %s still there after Close", name)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestRunReturnsNilWhenClosedAndAliveStaysTrue(t *testing.T) {
	h := newTwoHosts(t)
	var b *Backend
	err := nstest.In(h.a, func() error {
		var err error
		b, err = New(Options{TunName: h.tunName("a"), Workers: 2, PublicIP: hostA, MTU: 1472, Network: network,
			SubnetLen: 24, Lease: subnet.Lease{Subnet: leaseA}, Logger: discardLogger()})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	done := runBlocked(t, b)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run after Close: %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after Close")
	}
	if !b.Alive() {
		t.Error("Alive() = false after a clean stop")
	}
	if err := b.Run(t.Context()); err == nil {
		t.Error("second Run succeeded")
	}
}

func TestDeletedDeviceFailsRunAndAlive(t *testing.T) {
	h := newTwoHosts(t)
	var b *Backend
	name := h.tunName("a")
	err := nstest.In(h.a, func() error {
		var err error
		b, err = New(Options{TunName: name, Workers: 2, PublicIP: hostA, MTU: 1472, Network: network,
			SubnetLen: 24, Lease: subnet.Lease{Subnet: leaseA}, Logger: discardLogger()})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	done := runBlocked(t, b)
	if !b.Alive() {
		t.Fatal("not alive while running")
	}
	err = nstest.In(h.a, func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "removed") {
			t.Errorf("Run = %v, want the device-removed error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the device was deleted")
	}
	if b.Alive() {
		t.Error("Alive() = true after a worker failed")
	}
}

// runBlocked runs b and returns, once every loop waits for traffic (blocked
// in ppoll), the channel Run's result arrives on.
func runBlocked(t *testing.T, b *Backend) <-chan error {
	t.Helper()
	before, err := fdpoll.Waiting()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- b.Run(t.Context()) }()
	if err := fdpoll.AwaitWaiting(before+2*len(b.workers), 5*time.Second); err != nil {
		t.Fatalf("the data plane's loops do not wait for traffic: %v", err)
	}
	return done
}
