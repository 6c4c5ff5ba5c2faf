package udp

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/subnet"
)

// TestAFlowIsNeverSplitAcrossWorkers: eight UDP flows cross two Tulle
// hosts of two workers each, sent interleaved in bursts from host a's
// namespace, so that a's TX loops read several flows' packets per batch,
// all of one size. The trains a sends must each carry one flow: b's
// steering then puts every packet of a flow on that flow's worker (b
// counts those it does not), and each flow arrives in order.
func TestAFlowIsNeverSplitAcrossWorkers(t *testing.T) {
	h := newTwoHosts(t)
	startBackend(t, h.a, h.tunName("a"), leaseA, hostA, "offload", 2, lease(leaseB, hostB))
	b := startBackend(t, h.b, h.tunName("b"), leaseB, hostB, "offload", 2, lease(leaseA, hostA))
	const flows, bursts, rounds, size = 8, 60, 4, 1000
	dst := netip.AddrPortFrom(leaseB.Addr(), 7000)
	sink := listenUDP(t, h.b, dst)
	var srcs [flows]*net.UDPConn
	for i := range srcs {
		srcs[i] = listenUDP(t, h.a, netip.AddrPortFrom(leaseA.Addr(), uint16(6000+i)))
	}
	last := map[uint16]int{} // per flow (source port), the last sequence number received
	msg, buf := make([]byte, size), make([]byte, 2*size)
	seq := 0
	for range bursts {
		for range rounds {
			seq++
			binary.BigEndian.PutUint32(msg, uint32(seq))
			for _, s := range srcs {
				if _, err := s.WriteToUDPAddrPort(msg, dst); err != nil {
					t.Fatal(err)
				}
			}
		}
		for range rounds * flows {
			sink.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, from, err := sink.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("after %d rounds: %v", seq, err)
			}
			got := int(binary.BigEndian.Uint32(buf[:n]))
			if got <= last[from.Port()] {
				t.Fatalf("flow from port %d: datagram %d arrived after %d", from.Port(), got, last[from.Port()])
			}
			last[from.Port()] = got
		}
	}
	// A loop adds to its counters after it has written its batch: wait
	// until they hold every packet the sink read.
	p := b.table.Load().lookup(addr32("198.18.1.1"))
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		var n uint64
		for _, w := range b.workers {
			n += w.rx.stats.peer(p.index).packets.Load()
		}
		if n >= flows*bursts*rounds {
			break
		}
	}
	var misses uint64
	for _, w := range b.workers {
		misses += w.rx.stats.steerMisses.Load()
		if n := w.rx.stats.peer(p.index).packets.Load(); n == 0 {
			t.Errorf("worker %d of host b received none of the %d flows", w.id, flows)
		}
	}
	if misses != 0 {
		t.Errorf("host b received %d packets on a worker other than their flow's", misses)
	}
}

// TestPacketsSteeredByAnotherFlowAreCounted: a GRO train that carries two
// flows (as a receiver's GRO may merge a flannel host's datagrams) goes to
// the worker of its first packet; the packets of the other flow are
// counted as steering misses, and still delivered.
func TestPacketsSteeredByAnotherFlowAreCounted(t *testing.T) {
	h := newTwoHosts(t)
	b := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, "offload", 2, lease(leaseB, hostB))
	app := listenUDP(t, h.a, netip.AddrPortFrom(leaseA.Addr(), 9999))
	to := netip.AddrPortFrom(leaseA.Addr(), 9999)
	// Two source ports whose flows the steering gives to different workers.
	var pkts [][]byte
	for port := uint16(20000); len(pkts) < 2; port++ {
		p := innerUDP(netip.AddrPortFrom(leaseB.Addr().Next(), port), to, make([]byte, 100))
		k, _ := flowKey(p)
		if len(pkts) == 0 || steerIndex(k, 2) != steerIndexOf(t, pkts[0]) {
			pkts = append(pkts, p)
		}
	}
	peer := openConn(t, h.b, netip.AddrPortFrom(hostB, subnet.DefaultPort))
	train := append(append([]byte(nil), pkts[0]...), pkts[1]...)
	msgs := []udpconn.Message{{Buf: train, Addr: netip.AddrPortFrom(hostA, subnet.DefaultPort), SegSize: len(pkts[0])}}
	if _, err := peer.WriteBatch(msgs); err != nil || msgs[0].Err != 0 {
		t.Fatalf("send a train of two flows: %v %v", err, msgs[0].Err)
	}
	readUDP(t, app, 5*time.Second)
	readUDP(t, app, 5*time.Second)
	// The loop counts a batch's misses before it writes the batch; wait a
	// little all the same, as for any counter another thread updates.
	var misses uint64
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		misses = 0
		for _, w := range b.workers {
			misses += w.rx.stats.steerMisses.Load()
		}
		if misses != 0 || time.Now().After(deadline) {
			break
		}
	}
	if misses != 1 {
		t.Errorf("%d steering misses counted, want 1 (the second flow's packet)", misses)
	}
}

func steerIndexOf(t *testing.T, pkt []byte) int {
	k, ok := flowKey(pkt)
	if !ok {
		t.Fatalf("no flow key for % x", pkt)
	}
	return steerIndex(k, 2)
}
