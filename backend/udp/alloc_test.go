package udp

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
)

// flow sends UDP from one host's TUN address to the other's through both
// data planes: the sender's TX loop and the receiver's RX loop.
type flow struct {
	name     string
	from, to *udpconn.Conn
	dst      netip.AddrPort
	sent     atomic.Uint64
	received atomic.Uint64
}

func openConn(t *testing.T, ns netns.NsHandle, addr netip.AddrPort) *udpconn.Conn {
	t.Helper()
	var c *udpconn.Conn
	err := nstest.In(ns, func() error {
		var err error
		c, err = udpconn.Listen(addr, udpconn.Options{BatchSize: 64})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// send keeps at most window packets in flight until stop, in GSO trains of
// 8 datagrams of 1000 bytes (the sending kernel hands them to the TUN as
// USO superpackets, which the driver splits). A lost packet only delays it.
func (f *flow) send(stop <-chan struct{}) {
	const window = 4096
	msgs := make([]udpconn.Message, 8)
	for i := range msgs {
		msgs[i] = udpconn.Message{Buf: make([]byte, 8*1000), Addr: f.dst, SegSize: 1000}
	}
	for {
		select {
		case <-stop:
			return
		default:
		}
		for wait := 0; f.sent.Load()-f.received.Load() > window && wait < 20; wait++ {
			time.Sleep(time.Millisecond)
		}
		n, err := f.from.WriteBatch(msgs)
		if err != nil {
			return
		}
		f.sent.Add(uint64(n * 8))
	}
}

// receive counts the datagrams that arrive, until the conn is closed.
func (f *flow) receive() {
	msgs := make([]udpconn.Message, 64)
	for i := range msgs {
		msgs[i].Buf = make([]byte, udpconn.GROBufferSize)
	}
	for {
		n, err := f.to.ReadBatch(msgs)
		if err != nil {
			return
		}
		var got uint64
		for _, m := range msgs[:n] {
			if m.SegSize > 0 {
				got += uint64((m.N + m.SegSize - 1) / m.SegSize)
			} else {
				got++
			}
		}
		f.received.Add(got)
	}
}

// TestForwardingAllocatesNothingPerPacket forwards well over 100,000
// packets each way (20,000 under the race detector) between two backends
// over a real TUN device and real sockets and checks the process's malloc
// count per packet in steady state.
// Between Tulle hosts the packets travel with partial checksums (marked);
// with flannel leases they are completed on send and verified before
// coalescing.
func TestForwardingAllocatesNothingPerPacket(t *testing.T) {
	t.Run("tulle-peers", func(t *testing.T) { testForwardingAllocs(t, ipv4Pair(t, tulleLease)) })
	t.Run("flannel-peers", func(t *testing.T) { testForwardingAllocs(t, ipv4Pair(t, lease)) })
}

// TestForwardingOverIPv6AllocatesNothingPerPacket is the same for inner
// IPv6 (USO6 superpackets split, IPv6 UDP segments coalesced) and over the
// IPv6 underlay (inner IPv4 and IPv6).
func TestForwardingOverIPv6AllocatesNothingPerPacket(t *testing.T) {
	t.Run("inner-ipv6", func(t *testing.T) {
		testForwardingAllocs(t, func(h *twoHosts) (*Backend, *Backend, netip.Addr, netip.Addr) {
			return dualPair(t, h, "offload", tulleFeatures, tulleFeatures, nil)
		})
	})
	for _, inner6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "ipv6-underlay-inner-ipv4", true: "ipv6-underlay-inner-ipv6"}[inner6], func(t *testing.T) {
			testForwardingAllocs(t, underlay6Pair(t, inner6))
		})
	}
}

// ipv4Pair starts an IPv4-only backend on each host, peers as peer says.
func ipv4Pair(t *testing.T, peer func(netip.Prefix, netip.Addr) subnet.Event) func(*twoHosts) (*Backend, *Backend, netip.Addr, netip.Addr) {
	return func(h *twoHosts) (*Backend, *Backend, netip.Addr, netip.Addr) {
		a := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, "offload", 2, peer(leaseB, hostB))
		b := startBackend(t, h.b, h.tunName("b"), leaseB, hostB, "offload", 2, peer(leaseA, hostA))
		return a, b, leaseA.Addr(), leaseB.Addr()
	}
}

// underlay6Pair starts dual-stack backends talking over the IPv6 underlay;
// the addresses returned are of the inner family asked for.
func underlay6Pair(t *testing.T, inner6 bool) func(*twoHosts) (*Backend, *Backend, netip.Addr, netip.Addr) {
	return func(h *twoHosts) (*Backend, *Backend, netip.Addr, netip.Addr) {
		h.addUnderlay6(t)
		evA := dualLease(leaseA, leaseA6, hostA, hostA6, features6u...)
		evB := dualLease(leaseB, leaseB6, hostB, hostB6, features6u...)
		a := startBackendWith(t, h.a, h.tunName("a"), evA.Lease, "offload", 2, []func(*Options){dualStack, underlay6Of(hostA6)}, evB)
		b := startBackendWith(t, h.b, h.tunName("b"), evB.Lease, "offload", 2,
			[]func(*Options){dualStack, func(o *Options) { o.Lease.IPv6Subnet = leaseB6 }, underlay6Of(hostB6)}, evA)
		if a.table.Load().lookup(addr32("198.18.2.1")).underlay != underlay6 {
			t.Fatal("A does not reach B over the IPv6 underlay")
		}
		if !inner6 {
			return a, b, leaseA.Addr(), leaseB.Addr()
		}
		waitLocal(t, h.a, leaseA6Addr)
		waitLocal(t, h.b, leaseB6Addr)
		return a, b, leaseA6Addr, leaseB6Addr
	}
}

// wantFewMallocs logs the packets forwarded over both directions in
// elapsed and the mallocs meanwhile, and wants fewer than 0.01 mallocs
// per packet.
func wantFewMallocs(t *testing.T, packets, mallocs uint64, elapsed time.Duration) {
	t.Helper()
	perPacket := float64(mallocs) / float64(packets)
	t.Logf("%d packets in %v (%.0f packets/s over both directions), %d mallocs: %.5f per packet",
		packets, elapsed.Round(time.Millisecond), float64(packets)/elapsed.Seconds(), mallocs, perPacket)
	if perPacket >= 0.01 {
		t.Errorf("%.4f mallocs per packet, want < 0.01", perPacket)
	}
}

func testForwardingAllocs(t *testing.T, startPair func(*twoHosts) (a, b *Backend, addrA, addrB netip.Addr)) {
	h := newTwoHosts(t)
	a, b, addrA, addrB := startPair(h)

	ab := &flow{name: "A->B", dst: netip.AddrPortFrom(addrB, 9000)}
	ab.from = openConn(t, h.a, netip.AddrPortFrom(addrA, 0))
	ab.to = openConn(t, h.b, ab.dst)
	ba := &flow{name: "B->A", dst: netip.AddrPortFrom(addrA, 9000)}
	ba.from = openConn(t, h.b, netip.AddrPortFrom(addrB, 0))
	ba.to = openConn(t, h.a, ba.dst)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, f := range []*flow{ab, ba} {
		wg.Go(func() { f.send(stop) })
		wg.Go(f.receive)
	}
	defer func() {
		close(stop)
		ab.to.Close()
		ba.to.Close()
		wg.Wait()
	}()
	waitPackets := func(target uint64) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for ab.received.Load() < target || ba.received.Load() < target {
			if time.Now().After(deadline) {
				t.Fatalf("forwarded only %d A->B and %d B->A packets, want %d", ab.received.Load(), ba.received.Load(), target)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	waitPackets(20000) // warm up: buffers, GRO tables, goroutine stacks
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	start := time.Now()
	r0 := ab.received.Load() + ba.received.Load()
	waitPackets(ab.received.Load() + allocWindow)
	waitPackets(ba.received.Load() + allocWindow)
	runtime.ReadMemStats(&m1)
	elapsed := time.Since(start)
	wantFewMallocs(t, ab.received.Load()+ba.received.Load()-r0, m1.Mallocs-m0.Mallocs, elapsed)
	for _, be := range []*Backend{a, b} {
		if tx, rx := backendPackets(be); tx < allocWindow || rx < allocWindow {
			t.Errorf("backend counted %d packets sent and %d received, want >= %d each", tx, rx, allocWindow)
		}
	}
}

// backendPackets sums what be counted sent to and received from its peers.
func backendPackets(be *Backend) (tx, rx uint64) {
	for _, w := range be.workers {
		for p := range be.table.Load().all() {
			if c := w.tx.stats.peerOrNil(p.index); c != nil {
				tx += c.packets.Load()
			}
			for _, r := range w.receivers() {
				if c := r.stats.peerOrNil(p.index); c != nil {
					rx += c.packets.Load()
				}
			}
		}
	}
	return tx, rx
}

// tunStats returns the kernel's packet counters of TUN device name in ns:
// tx = packets it queued for us to read (one per superpacket), rx =
// packets we wrote (one per coalesced write).
func tunStats(t *testing.T, ns netns.NsHandle, name string) (tx, rx uint64) {
	t.Helper()
	err := nstest.In(ns, func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		tx, rx = l.Attrs().Statistics.TxPackets, l.Attrs().Statistics.RxPackets
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return tx, rx
}

// TestForwardingTCPAllocatesNothingPerPacket carries a TCP stream each way
// between two backends over real TUN devices and sockets: the sending
// kernels hand their TUNs TSO superpackets, which the TX loops cut with
// Split, and the RX loops coalesce the segments into GSO writes. It checks
// the process's malloc count per packet in steady state, and that the
// superpacket paths ran: the kernel counts far fewer TUN reads and writes
// than the packets the backends forwarded.
func TestForwardingTCPAllocatesNothingPerPacket(t *testing.T) {
	ipv4 := func(peer func(netip.Prefix, netip.Addr) subnet.Event) func(*twoHosts) (*Backend, *Backend, netip.Addr, netip.Addr) {
		return func(h *twoHosts) (*Backend, *Backend, netip.Addr, netip.Addr) {
			a := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, "offload", 2, peer(leaseB, hostB))
			b := startBackend(t, h.b, h.tunName("b"), leaseB, hostB, "offload", 2, peer(leaseA, hostA))
			return a, b, leaseA.Addr(), leaseB.Addr()
		}
	}
	t.Run("tulle-peers", func(t *testing.T) { testForwardingTCPAllocs(t, ipv4(tulleLease)) })
	t.Run("flannel-peers", func(t *testing.T) { testForwardingTCPAllocs(t, ipv4(lease)) })
	t.Run("ipv6-underlay", func(t *testing.T) { testForwardingTCPAllocs(t, underlay6Pair(t, false)) })
}

// TestForwardingTCPOverIPv6AllocatesNothingPerPacket is the same with
// inner IPv6 (TSO6 superpackets split, GSO TCPv6 writes), between Tulle
// hosts with and without partial checksums.
func TestForwardingTCPOverIPv6AllocatesNothingPerPacket(t *testing.T) {
	for _, c := range []struct {
		name  string
		feats []string
	}{{"partial-checksums", tulleFeatures}, {"complete-checksums", []string{FeatureIPv6}}} {
		t.Run(c.name, func(t *testing.T) {
			testForwardingTCPAllocs(t, func(h *twoHosts) (*Backend, *Backend, netip.Addr, netip.Addr) {
				return dualPair(t, h, "offload", c.feats, c.feats, nil)
			})
		})
	}
	t.Run("ipv6-underlay", func(t *testing.T) { testForwardingTCPAllocs(t, underlay6Pair(t, true)) })
}

func testForwardingTCPAllocs(t *testing.T, startPair func(*twoHosts) (a, b *Backend, addrA, addrB netip.Addr)) {
	h := newTwoHosts(t)
	a, b, addrA, addrB := startPair(h)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var conns []net.Conn
	// stream sends from an address in ns src to one in ns dst until stop.
	stream := func(src, dst netns.NsHandle, from, to netip.Addr) {
		var ln net.Listener
		err := nstest.In(dst, func() error {
			var err error
			ln, err = net.Listen(tcpNet(to), netip.AddrPortFrom(to, 5201).String())
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		var c net.Conn
		err = nstest.In(src, func() error {
			d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0)), Timeout: 5 * time.Second}
			var err error
			c, err = d.Dial(tcpNet(to), netip.AddrPortFrom(to, 5201).String())
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c, s)
		wg.Go(func() {
			buf := make([]byte, 256<<10)
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		})
		wg.Go(func() {
			buf := make([]byte, 256<<10)
			for {
				if _, err := s.Read(buf); err != nil {
					return
				}
			}
		})
	}
	stream(h.a, h.b, addrA, addrB)
	stream(h.b, h.a, addrB, addrA)
	defer func() {
		close(stop)
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	}()

	forwarded := func() uint64 { // packets both backends sent, each way
		atx, _ := backendPackets(a)
		btx, _ := backendPackets(b)
		return min(atx, btx)
	}
	waitForwarded := func(target uint64) {
		t.Helper()
		waitFor(t, 60*time.Second, fmt.Sprintf("%d packets forwarded each way", target), func() bool { return forwarded() >= target })
	}
	waitForwarded(20000) // warm up
	atx0, arx0 := backendPackets(a)
	btx0, brx0 := backendPackets(b)
	aread0, awrite0 := tunStats(t, h.a, h.tunName("a"))
	bread0, bwrite0 := tunStats(t, h.b, h.tunName("b"))
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	start := time.Now()
	waitForwarded(forwarded() + allocWindow)
	runtime.ReadMemStats(&m1)
	elapsed := time.Since(start)
	atx, arx := backendPackets(a)
	btx, brx := backendPackets(b)
	aread, awrite := tunStats(t, h.a, h.tunName("a"))
	bread, bwrite := tunStats(t, h.b, h.tunName("b"))

	packets := atx - atx0 + btx - btx0
	wantFewMallocs(t, packets, m1.Mallocs-m0.Mallocs, elapsed)
	// TSO on read: the TX loops sent more than twice as many packets as
	// they read from the TUN; GRO on write: the RX loops wrote fewer than
	// half as many as they received.
	reads, sent := aread-aread0+bread-bread0, packets
	writes, received := awrite-awrite0+bwrite-bwrite0, arx-arx0+brx-brx0
	t.Logf("TX: %d packets sent from %d TUN reads (%.1f per read); RX: %d received, %d TUN writes (%.1f per write)",
		sent, reads, float64(sent)/float64(reads), received, writes, float64(received)/float64(writes))
	if reads == 0 || sent < 2*reads {
		t.Errorf("%d packets sent from %d TUN reads: no TSO superpackets were split", sent, reads)
	}
	if writes == 0 || received < 2*writes {
		t.Errorf("%d packets received, %d TUN writes: segments were not coalesced", received, writes)
	}
}
