package udp

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/bpf"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
)

func steerVM(t *testing.T, n int) *bpf.VM {
	t.Helper()
	prog, err := steerProgram(n)
	if err != nil {
		t.Fatal(err)
	}
	vm, err := bpf.NewVM(prog)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := steerFilter(n); err != nil {
		t.Fatal(err)
	}
	return vm
}

// flowPacket is an inner IPv4 packet of protocol p between the given
// addresses and ports (as the steering program sees the UDP payload).
func flowPacket(src, dst string, p uint8, sport, dport uint16) []byte {
	b := ipv4(src, dst, 60, 64, true)
	b[9] = p
	binary.BigEndian.PutUint16(b[20:], sport)
	binary.BigEndian.PutUint16(b[22:], dport)
	return b
}

func steer(t *testing.T, vm *bpf.VM, pkt []byte) int {
	t.Helper()
	v, err := vm.Run(pkt)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestSteeringKeepsBothDirectionsOfAFlowOnOneWorker(t *testing.T) {
	for _, n := range []int{1, 2, 3, 8} {
		vm := steerVM(t, n)
		counts := make([]int, n)
		for i := range 256 {
			sport := uint16(30000 + i)
			fwd := steer(t, vm, flowPacket("198.18.1.5", "198.18.2.7", proto.ProtoTCP, sport, 5201))
			rev := steer(t, vm, flowPacket("198.18.2.7", "198.18.1.5", proto.ProtoTCP, 5201, sport))
			if fwd != rev || fwd < 0 || fwd >= n {
				t.Fatalf("n=%d: flow %d goes to socket %d, its reverse to %d", n, i, fwd, rev)
			}
			counts[fwd]++
		}
		for k, c := range counts {
			if c < 256/n/2 {
				t.Errorf("n=%d: socket %d gets %d of 256 flows: %v", n, k, c, counts)
			}
		}
	}
}

func TestSteeringUsesPortsOnlyOfUnfragmentedTCPAndUDP(t *testing.T) {
	vm := steerVM(t, 4)
	seen := func(p uint8, frag bool) map[int]bool {
		s := map[int]bool{}
		for i := range 64 {
			pkt := flowPacket("198.18.1.5", "198.18.2.7", p, uint16(1000+i), 80)
			if frag {
				pkt[6] |= 0x20 // more fragments
			}
			s[steer(t, vm, pkt)] = true
		}
		return s
	}
	if s := seen(proto.ProtoUDP, false); len(s) < 2 {
		t.Errorf("UDP flows with different ports all on %v", s)
	}
	for _, c := range []struct {
		p    uint8
		frag bool
	}{{proto.ProtoICMP, false}, {proto.ProtoUDP, true}, {proto.ProtoTCP, true}} {
		if s := seen(c.p, c.frag); len(s) != 1 {
			t.Errorf("protocol %d (fragment %v): spread by bytes that are not ports: %v", c.p, c.frag, s)
		}
	}
}

func TestSteeringLeavesNonIPv4ToTheKernel(t *testing.T) {
	vm := steerVM(t, 2)
	if v := steer(t, vm, append([]byte{0x60}, make([]byte, 59)...)); v < 2 {
		t.Errorf("IPv6 steered to socket %d, want an index past the group (the kernel's hash)", v)
	}
	if v := steer(t, vm, []byte{0x45, 0}); v != 0 {
		t.Errorf("a truncated packet steered to %d, want 0 (a load past the end ends the program with 0)", v)
	}
}

// TestReceivedFlowsFromOnePeerSpreadOverTheWorkers sends 64 inner flows
// from one peer, all from its port 8285 to ours (as flannel sends): the
// kernel's own hash would give every datagram to one socket; the steering
// program gives each worker a share.
func TestReceivedFlowsFromOnePeerSpreadOverTheWorkers(t *testing.T) {
	h := newTwoHosts(t)
	b := startBackend(t, h.a, h.tunName("a"), leaseA, hostA, "offload", 2, lease(leaseB, hostB))
	app := listenUDP(t, h.a, netip.AddrPortFrom(leaseA.Addr(), 9999))
	peer := listenUDP(t, h.b, netip.AddrPortFrom(hostB, subnet.DefaultPort))
	to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(hostA, subnet.DefaultPort))
	const flows = 64
	for i := range flows {
		from := netip.AddrPortFrom(leaseB.Addr().Next(), uint16(20000+i))
		if _, err := peer.WriteToUDP(innerUDP(from, netip.AddrPortFrom(leaseA.Addr(), 9999), []byte("x")), to); err != nil {
			t.Fatal(err)
		}
		readUDP(t, app, 5*time.Second)
	}
	p := b.table.Load().lookup(addr32("198.18.2.1"))
	for _, w := range b.workers {
		n := w.rx.stats.peer(p.index).packets.Load()
		if n < flows/8 {
			t.Errorf("worker %d received %d of %d flows", w.id, n, flows)
		}
	}
}
