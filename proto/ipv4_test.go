package proto_test

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/tulle-net/tulle/proto"
)

// ipv4Packet builds a valid IPv4 packet with a correct header checksum, using
// gopacket so that the package under test is checked against an independent
// encoder.
func ipv4Packet(t testing.TB, src, dst string, ttl uint8, df bool, payload []byte) []byte {
	t.Helper()
	ip := &layers.IPv4{
		Version:  4,
		IHL:      5,
		TTL:      ttl,
		Id:       0x1234,
		Protocol: layers.IPProtocolUDP,
		SrcIP:    netip.MustParseAddr(src).AsSlice(),
		DstIP:    netip.MustParseAddr(dst).AsSlice(),
	}
	if df {
		ip.Flags = layers.IPv4DontFragment
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

func TestCheckIPv4AcceptsWellFormedPacketAndReadsFields(t *testing.T) {
	pkt := ipv4Packet(t, "198.18.1.5", "198.18.2.7", 64, true, make([]byte, 100))
	pkt = append(pkt, 0xaa, 0xbb) // trailing bytes beyond total length
	total, err := proto.CheckIPv4(pkt)
	if err != nil {
		t.Fatalf("CheckIPv4: %v", err)
	}
	if total != 20+8+100 {
		t.Errorf("total = %d, want 128", total)
	}
	if got := proto.IPv4SrcAddr(pkt); got != netip.MustParseAddr("198.18.1.5") {
		t.Errorf("src = %v", got)
	}
	if got := proto.IPv4DstAddr(pkt); got != netip.MustParseAddr("198.18.2.7") {
		t.Errorf("dst = %v", got)
	}
	if got := proto.IPv4DstUint32(pkt); got != 198<<24|18<<16|2<<8|7 {
		t.Errorf("dst uint32 = %#x", got)
	}
	if !proto.IPv4DontFragment(pkt) || proto.IPv4TTL(pkt) != 64 || proto.IPv4Protocol(pkt) != proto.ProtoUDP {
		t.Errorf("flags/ttl/protocol wrong: df=%v ttl=%d proto=%d", proto.IPv4DontFragment(pkt), proto.IPv4TTL(pkt), proto.IPv4Protocol(pkt))
	}
	if !proto.IPv4HeaderChecksumValid(pkt) {
		t.Error("checksum of a gopacket-built header reported invalid")
	}
	if proto.Version(pkt) != 4 || proto.Version(nil) != 0 {
		t.Error("Version wrong")
	}
}

func TestCheckIPv4RejectsMalformedHeaders(t *testing.T) {
	good := ipv4Packet(t, "198.18.1.5", "198.18.2.7", 64, false, make([]byte, 12))
	mod := func(f func(b []byte) []byte) []byte {
		b := append([]byte(nil), good...)
		return f(b)
	}
	cases := []struct {
		name string
		pkt  []byte
		want error
	}{
		{"empty", nil, proto.ErrShort},
		{"shorter than header", good[:19], proto.ErrShort},
		{"version 6", mod(func(b []byte) []byte { b[0] = 0x65; return b }), proto.ErrVersion},
		{"IHL 4", mod(func(b []byte) []byte { b[0] = 0x44; return b }), proto.ErrHeaderLen},
		{"IHL beyond total length", mod(func(b []byte) []byte {
			b[0] = 0x4f
			binary.BigEndian.PutUint16(b[2:], 40)
			return b
		}), proto.ErrHeaderLen},
		{"total length below 20", mod(func(b []byte) []byte { binary.BigEndian.PutUint16(b[2:], 19); return b }), proto.ErrTotalLen},
		{"total length beyond buffer (truncated)", good[:len(good)-1], proto.ErrShort},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := proto.CheckIPv4(c.pkt); !errors.Is(err, c.want) {
				t.Errorf("CheckIPv4 = %v, want %v", err, c.want)
			}
		})
	}
}

func TestDecrementTTLKeepsChecksumEqualToFullRecompute(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 100000; i++ {
		h := make([]byte, 20)
		for j := range h {
			h[j] = byte(r.Uint32())
		}
		h[0] = 0x45
		binary.BigEndian.PutUint16(h[2:], 20)
		if h[8] < 2 {
			h[8] = 2
		}
		binary.BigEndian.PutUint16(h[10:], proto.IPv4HeaderChecksum(h))
		ttl := h[8]
		if !proto.DecrementTTL(h) {
			t.Fatalf("DecrementTTL refused TTL %d", ttl)
		}
		if h[8] != ttl-1 {
			t.Fatalf("TTL %d -> %d", ttl, h[8])
		}
		if got, want := binary.BigEndian.Uint16(h[10:]), proto.IPv4HeaderChecksum(h); got != want {
			t.Fatalf("header % x: incremental checksum %#04x, full recompute %#04x", h, got, want)
		}
	}
}

func TestDecrementTTLRefusesToReachZero(t *testing.T) {
	for _, ttl := range []uint8{0, 1} {
		pkt := ipv4Packet(t, "198.18.1.5", "198.18.2.7", ttl, false, nil)
		before := append([]byte(nil), pkt...)
		if proto.DecrementTTL(pkt) {
			t.Errorf("TTL %d: DecrementTTL = true, want false", ttl)
		}
		if string(before) != string(pkt) {
			t.Errorf("TTL %d: packet changed although refused", ttl)
		}
	}
	pkt := ipv4Packet(t, "198.18.1.5", "198.18.2.7", 2, false, nil)
	if !proto.DecrementTTL(pkt) || proto.IPv4TTL(pkt) != 1 || !proto.IPv4HeaderChecksumValid(pkt) {
		t.Errorf("TTL 2: want accepted, TTL 1, valid checksum; got ttl %d valid %v", proto.IPv4TTL(pkt), proto.IPv4HeaderChecksumValid(pkt))
	}
}

func TestPeekAndTTLDoNotAllocate(t *testing.T) {
	pkt := ipv4Packet(t, "198.18.1.5", "198.18.2.7", 255, true, make([]byte, 1400))
	var sink uint32
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := proto.CheckIPv4(pkt); err != nil {
			t.Fatal(err)
		}
		sink += proto.IPv4DstUint32(pkt)
		_ = proto.IPv4DstAddr(pkt)
		if !proto.DecrementTTL(pkt) {
			pkt[8] = 255
		}
	})
	if allocs != 0 {
		t.Errorf("allocs per peek+TTL = %v, want 0", allocs)
	}
	_ = sink
}

func TestFragmentsAndTransportChecksumOffsets(t *testing.T) {
	pkt := ipv4Packet(t, "198.18.1.5", "198.18.2.7", 64, true, make([]byte, 10))
	for _, c := range []struct {
		flags uint16 // IPv4 bytes 6-7
		frag  bool
	}{{0x4000, false}, {0x0000, false}, {0x2000, true}, {0x0001, true}, {0x6000, true}} {
		binary.BigEndian.PutUint16(pkt[6:], c.flags)
		if got := proto.IPv4IsFragment(pkt); got != c.frag {
			t.Errorf("flags/offset %#04x: IPv4IsFragment = %v, want %v", c.flags, got, c.frag)
		}
	}
	if proto.TransportChecksumOffset(proto.ProtoTCP) != 16 || proto.TransportChecksumOffset(proto.ProtoUDP) != 6 ||
		proto.TransportChecksumOffset(proto.ProtoICMP) != -1 {
		t.Error("TransportChecksumOffset: want 16 for TCP, 6 for UDP, -1 for others")
	}
}

func TestAddrUint32RoundTrips(t *testing.T) {
	a := netip.MustParseAddr("198.18.255.1")
	v, ok := proto.AddrUint32(a)
	if !ok || proto.Uint32Addr(v) != a {
		t.Errorf("round trip of %v: %#x %v -> %v", a, v, ok, proto.Uint32Addr(v))
	}
	if _, ok := proto.AddrUint32(netip.MustParseAddr("2001:db8::1")); ok {
		t.Error("IPv6 address accepted")
	}
	if _, ok := proto.AddrUint32(netip.Addr{}); ok {
		t.Error("zero address accepted")
	}
}

func BenchmarkCheckIPv4AndPeekDst(b *testing.B) {
	pkt := ipv4Packet(b, "198.18.1.5", "198.18.2.7", 64, true, make([]byte, 1400))
	var sink uint32
	b.ReportAllocs()
	for b.Loop() {
		if _, err := proto.CheckIPv4(pkt); err != nil {
			b.Fatal(err)
		}
		sink += proto.IPv4DstUint32(pkt)
	}
	_ = sink
}

func BenchmarkDecrementTTL(b *testing.B) {
	pkt := ipv4Packet(b, "198.18.1.5", "198.18.2.7", 255, true, make([]byte, 1400))
	b.ReportAllocs()
	for b.Loop() {
		if !proto.DecrementTTL(pkt) {
			pkt[8] = 255
			binary.BigEndian.PutUint16(pkt[10:], 0)
			binary.BigEndian.PutUint16(pkt[10:], proto.IPv4HeaderChecksum(pkt[:20]))
		}
	}
}

func BenchmarkIPv4HeaderChecksumValid(b *testing.B) {
	pkt := ipv4Packet(b, "198.18.1.5", "198.18.2.7", 64, true, make([]byte, 1400))
	b.ReportAllocs()
	for b.Loop() {
		if !proto.IPv4HeaderChecksumValid(pkt) {
			b.Fatal("invalid")
		}
	}
}

func FuzzCheckIPv4(f *testing.F) {
	f.Add(ipv4Packet(f, "198.18.1.5", "198.18.2.7", 64, true, []byte("hello")))
	f.Add([]byte{0x4f, 0, 0, 60})
	f.Add([]byte{0x46, 0, 0, 24, 0, 0, 0, 0, 1, 17, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 1, 1, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		total, err := proto.CheckIPv4(b)
		if err != nil {
			return
		}
		ihl := proto.IPv4HeaderLength(b)
		if total > len(b) || total < ihl || ihl < 20 || proto.Version(b) != 4 {
			t.Fatalf("accepted inconsistent packet: total %d ihl %d len %d", total, ihl, len(b))
		}
		_ = proto.IPv4HeaderChecksumValid(b)
		_ = proto.IPv4FragmentOffset(b)
		if proto.IPv4SrcAddr(b) != netip.AddrFrom4(proto.IPv4Src(b)) {
			t.Fatal("src mismatch")
		}
	})
}

func FuzzDecrementTTL(f *testing.F) {
	f.Add(ipv4Packet(f, "198.18.1.5", "198.18.2.7", 64, true, nil))
	f.Add(ipv4Packet(f, "198.18.1.5", "198.18.2.7", 2, false, nil))
	f.Add(ipv4Packet(f, "0.0.0.0", "255.255.255.255", 1, false, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := proto.CheckIPv4(b); err != nil {
			return
		}
		valid := proto.IPv4HeaderChecksumValid(b)
		ttl := proto.IPv4TTL(b)
		before := append([]byte(nil), b...)
		ok := proto.DecrementTTL(b)
		if ok != (ttl > 1) {
			t.Fatalf("TTL %d: DecrementTTL = %v", ttl, ok)
		}
		if !ok {
			if string(before) != string(b) {
				t.Fatal("refused decrement changed the packet")
			}
			return
		}
		if proto.IPv4TTL(b) != ttl-1 {
			t.Fatalf("TTL %d -> %d", ttl, proto.IPv4TTL(b))
		}
		if valid && !proto.IPv4HeaderChecksumValid(b) {
			t.Fatalf("valid checksum became invalid: % x -> % x", before[:20], b[:20])
		}
		for i := range b {
			if i != 8 && i != 10 && i != 11 && b[i] != before[i] {
				t.Fatalf("byte %d changed", i)
			}
		}
	})
}
