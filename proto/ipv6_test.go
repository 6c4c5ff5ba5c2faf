package proto_test

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/tulle-net/tulle/proto"
)

func ipv6Packet(t testing.TB, src, dst string, payload []byte) []byte {
	t.Helper()
	ip := &layers.IPv6{
		Version:    6,
		HopLimit:   64,
		NextHeader: layers.IPProtocolUDP,
		SrcIP:      netip.MustParseAddr(src).AsSlice(),
		DstIP:      netip.MustParseAddr(dst).AsSlice(),
	}
	udp := &layers.UDP{SrcPort: 4000, DstPort: 5000}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		t.Fatal(err)
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, ip, udp, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestCheckIPv6ReadsAddressesAndRejectsTruncated(t *testing.T) {
	pkt := ipv6Packet(t, "2001:db8::1", "2001:db8:0:2::7", make([]byte, 30))
	total, err := proto.CheckIPv6(pkt)
	if err != nil || total != 40+8+30 {
		t.Fatalf("CheckIPv6 = %d, %v", total, err)
	}
	if proto.IPv6SrcAddr(pkt) != netip.MustParseAddr("2001:db8::1") || proto.IPv6DstAddr(pkt) != netip.MustParseAddr("2001:db8:0:2::7") {
		t.Errorf("addresses %v %v", proto.IPv6SrcAddr(pkt), proto.IPv6DstAddr(pkt))
	}
	if _, err := proto.CheckIPv6(pkt[:len(pkt)-1]); !errors.Is(err, proto.ErrShort) {
		t.Errorf("truncated: %v", err)
	}
	if _, err := proto.CheckIPv6(ipv4Packet(t, "198.18.1.1", "198.18.1.2", 1, false, make([]byte, 40))); !errors.Is(err, proto.ErrVersion) {
		t.Errorf("IPv4 as IPv6: %v", err)
	}
	if !proto.DecrementHopLimit(pkt) || proto.IPv6HopLimit(pkt) != 63 {
		t.Error("hop limit not decremented")
	}
}

func TestICMPv6PacketTooBigVerifies(t *testing.T) {
	pkt := ipv6Packet(t, "2001:db8::1", "2001:db8:0:2::7", make([]byte, 1400))
	buf := make([]byte, proto.IPv6MinMTU)
	from := netip.MustParseAddr("2001:db8:0:2::7").As16()
	n, err := proto.ICMPv6PacketTooBig(buf, from, pkt, 1400)
	if err != nil {
		t.Fatal(err)
	}
	if n != proto.IPv6MinMTU {
		t.Errorf("length %d, want %d (quote up to the minimum MTU)", n, proto.IPv6MinMTU)
	}
	p := gopacket.NewPacket(buf[:n], layers.LayerTypeIPv6, gopacket.Default)
	icmp, _ := p.Layer(layers.LayerTypeICMPv6).(*layers.ICMPv6)
	if icmp == nil {
		t.Fatalf("no ICMPv6 layer: %v", p)
	}
	if icmp.TypeCode.Type() != layers.ICMPv6TypePacketTooBig {
		t.Errorf("type %v", icmp.TypeCode)
	}
	// Verify the checksum independently: sum over pseudo-header + message is 0.
	var pseudo []byte
	pseudo = append(pseudo, buf[8:40]...)
	pseudo = append(pseudo, 0, 0, byte((n-40)>>8), byte(n-40), 0, 0, 0, proto.ProtoICMPv6)
	if proto.Checksum(append(pseudo, buf[40:n]...), 0) != 0 {
		t.Error("ICMPv6 checksum does not verify")
	}
	if proto.IPv6DstAddr(buf) != netip.MustParseAddr("2001:db8::1") {
		t.Errorf("dst %v", proto.IPv6DstAddr(buf))
	}
	if proto.ICMPv6ErrorAllowed(buf[:n]) {
		t.Error("an ICMPv6 error must not be answerable")
	}
}

// withExtensions inserts extension headers between the fixed header of the
// IPv6 packet pkt and its upper layer: each ext is (type, body length in
// 8-byte units beyond the first 8 bytes); the chain ends at pkt's next header.
func withExtensions(pkt []byte, exts ...[2]byte) []byte {
	upper := pkt[6]
	out := append([]byte(nil), pkt[:40]...)
	var chain []byte
	for i, e := range exts {
		next := upper
		if i+1 < len(exts) {
			next = exts[i+1][0]
		}
		size := (int(e[1]) + 1) * 8
		if e[0] == 44 {
			size = 8
		}
		h := make([]byte, size)
		h[0], h[1] = next, e[1]
		if e[0] == 44 {
			h[1] = 0
		}
		chain = append(chain, h...)
	}
	if len(exts) > 0 {
		out[6] = exts[0][0]
	}
	out = append(append(out, chain...), pkt[40:]...)
	binary.BigEndian.PutUint16(out[4:], uint16(len(out)-40))
	return out
}

type transportCase struct {
	name  string
	pkt   []byte
	proto uint8
	off   int
	ok    bool
}

func TestIPv6TransportStepsOverExtensionHeadersAndNeverPastThePacket(t *testing.T) {
	udp := ipv6Packet(t, "2001:db8::1", "2001:db8::2", make([]byte, 20))
	cases := []transportCase{
		{"no extension", udp, proto.ProtoUDP, 40, true},
		{"hop-by-hop, dest options", withExtensions(udp, [2]byte{0, 0}, [2]byte{60, 1}), proto.ProtoUDP, 40 + 8 + 16, true},
		{"routing, first fragment", withExtensions(udp, [2]byte{43, 2}, [2]byte{44, 0}), proto.ProtoUDP, 40 + 24 + 8, true},
		{"no next header", withExtensions(udp, [2]byte{59, 0}), 0, 0, false},
	}
	nonFirst := withExtensions(udp, [2]byte{44, 0})
	binary.BigEndian.PutUint16(nonFirst[42:], 185<<3) // offset 1480
	cases = append(cases, transportCase{"non-first fragment", nonFirst, 0, 0, false})
	long := withExtensions(udp, [2]byte{60, 0})
	long[41] = 200 // claims 1608 bytes
	cases = append(cases, transportCase{"header past the packet", long, 0, 0, false})
	many := udp
	for range 9 {
		many = withExtensions(many, [2]byte{60, 0})
	}
	cases = append(cases, transportCase{"nine extension headers", many, 0, 0, false})
	for _, c := range cases {
		p, off, ok := proto.IPv6Transport(c.pkt)
		if p != c.proto || off != c.off || ok != c.ok {
			t.Errorf("%s: IPv6Transport = %d, %d, %v; want %d, %d, %v", c.name, p, off, ok, c.proto, c.off, c.ok)
		}
	}
	// Bytes beyond the payload length are not the packet's.
	trailing := withExtensions(udp, [2]byte{60, 0})
	binary.BigEndian.PutUint16(trailing[4:], 4) // the extension header itself is cut
	if _, _, ok := proto.IPv6Transport(trailing); ok {
		t.Error("read an extension header beyond the payload length")
	}
}

func TestIPv6WordsRoundTripAndPseudoHeaderSumVerifies(t *testing.T) {
	a := netip.MustParseAddr("2001:db8:1:2:3:4:5:6")
	hi, lo, ok := proto.AddrWords(a)
	if !ok || hi != 0x20010db800010002 || lo != 0x0003000400050006 || proto.WordsAddr(hi, lo) != a {
		t.Errorf("AddrWords(%v) = %#x %#x %v", a, hi, lo, ok)
	}
	if _, _, ok := proto.AddrWords(netip.MustParseAddr("198.18.0.1")); ok {
		t.Error("AddrWords took an IPv4 address")
	}
	pkt := ipv6Packet(t, "2001:db8::1", "2001:db8:0:2::7", make([]byte, 33)) // gopacket computed the UDP checksum
	if h, l := proto.IPv6SrcWords(pkt); proto.WordsAddr(h, l) != proto.IPv6SrcAddr(pkt) {
		t.Error("IPv6SrcWords")
	}
	if h, l := proto.IPv6DstWords(pkt); proto.WordsAddr(h, l) != proto.IPv6DstAddr(pkt) {
		t.Error("IPv6DstWords")
	}
	l4 := pkt[40:]
	if proto.Sum(l4, uint64(proto.PseudoHeaderSumIPv6(proto.IPv6Src(pkt), proto.IPv6Dst(pkt), proto.ProtoUDP, len(l4)))) != 0xffff {
		t.Error("gopacket's UDP checksum does not verify with PseudoHeaderSumIPv6")
	}
}

func TestICMPv6DestinationUnreachableAndWhatGetsNoError(t *testing.T) {
	pkt := ipv6Packet(t, "2001:db8::1", "2001:db8:0:2::7", make([]byte, 100))
	buf := make([]byte, proto.IPv6MinMTU)
	from := netip.MustParseAddr("2001:db8:0:2::7").As16()
	n, err := proto.ICMPv6DestinationUnreachable(buf, from, pkt, proto.ICMPv6CodeAddressUnreachable)
	if err != nil {
		t.Fatal(err)
	}
	if n != 40+8+len(pkt) {
		t.Errorf("length %d, want the whole packet quoted", n)
	}
	p := gopacket.NewPacket(buf[:n], layers.LayerTypeIPv6, gopacket.Default)
	icmp, _ := p.Layer(layers.LayerTypeICMPv6).(*layers.ICMPv6)
	if icmp == nil || icmp.TypeCode != layers.CreateICMPv6TypeCode(1, 3) {
		t.Fatalf("not an ICMPv6 address unreachable: %v", p)
	}
	// An ICMPv6 error behind a destination options header gets no error.
	errPkt := withExtensions(buf[:n], [2]byte{60, 0})
	if proto.ICMPv6ErrorAllowed(errPkt) {
		t.Error("an ICMPv6 error behind an extension header is answerable")
	}
	echo := ipv6Packet(t, "2001:db8::1", "2001:db8:0:2::7", nil)
	echo[6] = proto.ProtoICMPv6
	echo = append(echo[:40], 128, 0, 0, 0, 0, 0, 0, 0)
	binary.BigEndian.PutUint16(echo[4:], 8)
	if !proto.ICMPv6ErrorAllowed(withExtensions(echo, [2]byte{0, 0})) {
		t.Error("an echo request behind a hop-by-hop header must be answerable")
	}
	multicast := ipv6Packet(t, "2001:db8::1", "ff02::16", make([]byte, 10))
	if _, err := proto.ICMPv6DestinationUnreachable(buf, from, multicast, 0); !errors.Is(err, proto.ErrNoICMPError) {
		t.Errorf("unreachable about a multicast destination: %v", err)
	}
	if _, err := proto.ICMPv6PacketTooBig(buf, from, multicast, 1280); err != nil {
		t.Errorf("packet too big about a multicast destination: %v", err)
	}
	for name, src := range map[string]string{"unspecified": "::", "multicast": "ff02::1", "loopback": "::1"} {
		if _, err := proto.ICMPv6PacketTooBig(buf, from, ipv6Packet(t, src, "2001:db8::2", nil), 1280); !errors.Is(err, proto.ErrNoICMPError) {
			t.Errorf("from %s: %v", name, err)
		}
	}
	if _, err := proto.ICMPv6PacketTooBig(buf[:100], from, pkt, 1280); !errors.Is(err, proto.ErrShortBuffer) {
		t.Errorf("short buffer: %v", err)
	}
}

func TestIPv6PeekHopLimitAndErrorsDoNotAllocate(t *testing.T) {
	pkt := withExtensions(ipv6Packet(t, "2001:db8::1", "2001:db8:0:2::7", make([]byte, 1400)), [2]byte{60, 0})
	buf := make([]byte, proto.IPv6MinMTU)
	var sink uint64
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := proto.CheckIPv6(pkt); err != nil {
			t.Fatal(err)
		}
		hi, lo := proto.IPv6DstWords(pkt)
		sink += hi ^ lo
		if _, off, ok := proto.IPv6Transport(pkt); ok {
			sink += uint64(off)
		}
		if !proto.DecrementHopLimit(pkt) {
			pkt[7] = 255
		}
		if _, err := proto.ICMPv6PacketTooBig(buf, [16]byte{}, pkt, 1300); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("allocs = %v, want 0", allocs)
	}
	_ = sink
}

func BenchmarkCheckIPv6AndPeekDst(b *testing.B) {
	pkt := ipv6Packet(b, "2001:db8::1", "2001:db8:0:2::7", make([]byte, 1400))
	var sink uint64
	for b.Loop() {
		if _, err := proto.CheckIPv6(pkt); err != nil {
			b.Fatal(err)
		}
		hi, lo := proto.IPv6DstWords(pkt)
		sink += hi + lo
	}
	_ = sink
}

// FuzzCheckIPv6 feeds arbitrary bytes to the IPv6 checks: they never panic
// nor read past the packet (the fuzzer's slices end exactly at the data),
// the transport offset lies within the packet, and every ICMPv6 error
// built is a well-formed IPv6 packet within the minimum MTU, addressed to
// the packet's source, with a valid checksum, and itself unanswerable.
func FuzzCheckIPv6(f *testing.F) {
	f.Add(ipv6Packet(f, "2001:db8::1", "2001:db8::2", []byte("x")), uint16(1300))
	f.Add(withExtensions(ipv6Packet(f, "2001:db8::1", "2001:db8::2", make([]byte, 30)), [2]byte{0, 0}, [2]byte{44, 0}, [2]byte{60, 2}), uint16(0))
	f.Add(withExtensions(ipv6Packet(f, "2001:db8::1", "2001:db8::2", nil), [2]byte{51, 1}), uint16(9000))
	f.Fuzz(func(t *testing.T, b []byte, mtu uint16) {
		total, err := proto.CheckIPv6(b)
		if err != nil {
			if _, _, ok := proto.IPv6Transport(b); ok {
				t.Fatal("IPv6Transport found a transport in a packet CheckIPv6 refuses")
			}
			return
		}
		if total > len(b) || total < 40 {
			t.Fatalf("total %d len %d", total, len(b))
		}
		if _, off, ok := proto.IPv6Transport(b); ok && (off < 40 || off > total) {
			t.Fatalf("transport at %d of a %d-byte packet", off, total)
		}
		if _, _, ok := proto.IPv6Transport(b[:total]); !ok {
			if _, _, ok2 := proto.IPv6Transport(b); ok2 {
				t.Fatal("IPv6Transport read bytes beyond the payload length")
			}
		}
		buf := make([]byte, proto.IPv6MinMTU)
		for _, build := range []func() (int, error){
			func() (int, error) {
				return proto.ICMPv6PacketTooBig(buf, [16]byte{0x20, 0x01, 0x0d, 0xb8, 15: 1}, b, int(mtu))
			},
			func() (int, error) {
				return proto.ICMPv6DestinationUnreachable(buf, [16]byte{0x20, 0x01, 0x0d, 0xb8, 15: 1}, b, proto.ICMPv6CodeNoRoute)
			},
		} {
			n, err := build()
			if err != nil {
				continue
			}
			tot, cerr := proto.CheckIPv6(buf[:n])
			if cerr != nil || tot != n || n > proto.IPv6MinMTU {
				t.Fatalf("built message: %d %v n=%d", tot, cerr, n)
			}
			if proto.IPv6Dst(buf) != proto.IPv6Src(b) {
				t.Fatal("not addressed to the packet's source")
			}
			if proto.Sum(buf[40:n], uint64(proto.PseudoHeaderSumIPv6(proto.IPv6Src(buf), proto.IPv6Dst(buf), proto.ProtoICMPv6, n-40))) != 0xffff {
				t.Fatal("ICMPv6 checksum does not verify")
			}
			if proto.ICMPv6ErrorAllowed(buf[:n]) {
				t.Fatal("an ICMPv6 error must not itself be answerable")
			}
		}
		hl := proto.IPv6HopLimit(b)
		if proto.DecrementHopLimit(b) != (hl > 1) {
			t.Fatalf("DecrementHopLimit at hop limit %d", hl)
		}
	})
}
