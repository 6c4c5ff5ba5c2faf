package udp

import (
	"encoding/binary"
	"fmt"
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

// wantFlowsKeptTogetherAndSpread steers 256 TCP flows between a and b
// (packets built by packet) over groups of 1, 2, 3 and 8 sockets: both
// directions of a flow must go to the same socket, and every socket must
// get at least half its fair share.
func wantFlowsKeptTogetherAndSpread(t *testing.T, packet func(src, dst string, p uint8, sport, dport uint16) []byte, a, b string) {
	t.Helper()
	for _, n := range []int{1, 2, 3, 8} {
		vm := steerVM(t, n)
		counts := make([]int, n)
		for i := range 256 {
			sport := uint16(30000 + i)
			fwd := steer(t, vm, packet(a, b, proto.ProtoTCP, sport, 5201))
			rev := steer(t, vm, packet(b, a, proto.ProtoTCP, 5201, sport))
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

func TestSteeringKeepsBothDirectionsOfAFlowOnOneWorker(t *testing.T) {
	wantFlowsKeptTogetherAndSpread(t, flowPacket, "198.18.1.5", "198.18.2.7")
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

func TestSteeringLeavesNonIPToTheKernel(t *testing.T) {
	vm := steerVM(t, 2)
	if v := steer(t, vm, append([]byte{0x50}, make([]byte, 59)...)); v < 2 {
		t.Errorf("version 5 steered to socket %d, want an index past the group (the kernel's hash)", v)
	}
	if v := steer(t, vm, []byte{0x45, 0}); v != 0 {
		t.Errorf("a truncated packet steered to %d, want 0 (a load past the end ends the program with 0)", v)
	}
	if v := steer(t, vm, []byte{0x60, 0, 0, 0, 0, 0, 6, 64}); v != 0 {
		t.Errorf("a truncated IPv6 packet steered to %d, want 0", v)
	}
}

// flowPacket6 is an inner IPv6 packet with next header p between the
// given addresses and ports.
func flowPacket6(src, dst string, p uint8, sport, dport uint16) []byte {
	b := make([]byte, 40+20)
	b[0], b[6], b[7] = 0x60, p, 64
	binary.BigEndian.PutUint16(b[4:], 20)
	s, d := netip.MustParseAddr(src).As16(), netip.MustParseAddr(dst).As16()
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	binary.BigEndian.PutUint16(b[40:], sport)
	binary.BigEndian.PutUint16(b[42:], dport)
	return b
}

func TestSteeringOfIPv6KeepsAFlowOnOneWorkerAndSpreadsFlows(t *testing.T) {
	wantFlowsKeptTogetherAndSpread(t, flowPacket6, "2001:db8:1:1::5", "2001:db8:1:2::7")
	vm := steerVM(t, 4)
	seen := func(p uint8, src func(i int) string) map[int]bool {
		s := map[int]bool{}
		for i := range 64 {
			s[steer(t, vm, flowPacket6(src(i), "2001:db8:1:2::7", p, uint16(1000+i), 80))] = true
		}
		return s
	}
	one := func(int) string { return "2001:db8:1:1::5" }
	if s := seen(proto.ProtoUDP, one); len(s) < 2 {
		t.Errorf("UDP flows with different ports all on %v", s)
	}
	for _, p := range []uint8{proto.ProtoICMPv6, 60 /* destination options */, 44 /* fragment */} {
		if s := seen(p, one); len(s) != 1 {
			t.Errorf("next header %d: spread by bytes that are not ports: %v", p, s)
		}
	}
	// Every word of the addresses counts.
	if s := seen(proto.ProtoICMPv6, func(i int) string { return fmt.Sprintf("2001:db8:%x:1::5", i) }); len(s) < 2 {
		t.Errorf("flows from 64 sources all on %v", s)
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
