package udp

import (
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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
// packets each way between two backends over a real TUN device and real
// sockets and checks the process's malloc count per packet in steady state.
// Between Tulle hosts the packets travel with partial checksums (marked);
// with flannel leases they are completed on send and verified before
// coalescing.
func TestForwardingAllocatesNothingPerPacket(t *testing.T) {
	t.Run("tulle-peers", func(t *testing.T) { testForwardingAllocs(t, tulleLease) })
	t.Run("flannel-peers", func(t *testing.T) { testForwardingAllocs(t, lease) })
}

func testForwardingAllocs(t *testing.T, peer func(netip.Prefix, netip.Addr) subnet.Event) {
	h := newTwoHosts(t)
	a := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, "offload", 2, peer(leaseB, hostB))
	b := startBackend(t, h.b, h.tunName("b"), leaseB, hostB, "offload", 2, peer(leaseA, hostA))

	ab := &flow{name: "A->B", dst: netip.AddrPortFrom(leaseB.Addr(), 9000)}
	ab.from = openConn(t, h.a, netip.AddrPortFrom(leaseA.Addr(), 0))
	ab.to = openConn(t, h.b, ab.dst)
	ba := &flow{name: "B->A", dst: netip.AddrPortFrom(leaseA.Addr(), 9000)}
	ba.from = openConn(t, h.b, netip.AddrPortFrom(leaseB.Addr(), 0))
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
	waitPackets(ab.received.Load() + 100000)
	waitPackets(ba.received.Load() + 100000)
	runtime.ReadMemStats(&m1)
	elapsed := time.Since(start)
	packets := ab.received.Load() + ba.received.Load() - r0
	mallocs := m1.Mallocs - m0.Mallocs
	perPacket := float64(mallocs) / float64(packets)
	t.Logf("%d packets in %v (%.0f packets/s over both directions), %d mallocs: %.5f per packet",
		packets, elapsed.Round(time.Millisecond), float64(packets)/elapsed.Seconds(), mallocs, perPacket)
	if perPacket >= 0.01 {
		t.Errorf("%.4f mallocs per packet, want < 0.01", perPacket)
	}
	for _, be := range []*Backend{a, b} {
		var tx, rx uint64
		for _, w := range be.workers {
			for p := range be.table.Load().all() {
				if c := w.tx.stats.peerOrNil(p.index); c != nil {
					tx += c.packets.Load()
				}
				if c := w.rx.stats.peerOrNil(p.index); c != nil {
					rx += c.packets.Load()
				}
			}
		}
		if tx < 100000 || rx < 100000 {
			t.Errorf("backend counted %d packets sent and %d received, want >= 100000 each", tx, rx)
		}
	}
}
