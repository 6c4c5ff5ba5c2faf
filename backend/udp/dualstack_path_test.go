package udp

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
)

// ipv6 builds an IPv6/UDP packet of exactly size bytes (>= 48) with hop
// limit hop and a complete UDP checksum.
func ipv6(src, dst string, size int, hop uint8) []byte {
	b := make([]byte, size)
	binary.BigEndian.PutUint32(b[0:], 6<<28|0xabcde)
	binary.BigEndian.PutUint16(b[4:], uint16(size-40))
	b[6], b[7] = proto.ProtoUDP, hop
	s, d := netip.MustParseAddr(src).As16(), netip.MustParseAddr(dst).As16()
	copy(b[8:24], s[:])
	copy(b[24:40], d[:])
	binary.BigEndian.PutUint16(b[40:], 4000)
	binary.BigEndian.PutUint16(b[42:], 5000)
	binary.BigEndian.PutUint16(b[44:], uint16(size-40))
	for i := 48; i < size; i++ {
		b[i] = byte(i)
	}
	binary.BigEndian.PutUint16(b[46:], proto.Checksum(b[40:], uint64(proto.PseudoHeaderSumIPv6(s, d, proto.ProtoUDP, size-40))))
	return b
}

// tcpSuper6 is tcpSuper over IPv6: IPv6 + TCP with 12 bytes of options +
// payload, the checksum field holding the pseudo-header sum, and its
// virtio header (GSO TCPv6).
func tcpSuper6(src, dst string, payload, mss int, seq uint32) (tundev.VirtioHdr, []byte) {
	const hl = 40 + 32
	b := make([]byte, hl+payload)
	binary.BigEndian.PutUint32(b[0:], 6<<28|0x12345)
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)-40))
	b[6], b[7] = proto.ProtoTCP, 64
	s, d := netip.MustParseAddr(src).As16(), netip.MustParseAddr(dst).As16()
	copy(b[8:24], s[:])
	copy(b[24:40], d[:])
	t := b[40:]
	binary.BigEndian.PutUint16(t[0:], 40000)
	binary.BigEndian.PutUint16(t[2:], 5201)
	binary.BigEndian.PutUint32(t[4:], seq)
	binary.BigEndian.PutUint32(t[8:], 777)
	t[12] = 8 << 4
	t[13] = 0x18 // ACK|PSH
	binary.BigEndian.PutUint16(t[14:], 500)
	copy(t[20:32], []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2})
	for i := hl; i < len(b); i++ {
		b[i] = byte(i * 13)
	}
	binary.BigEndian.PutUint16(t[16:], proto.PseudoHeaderSumIPv6(s, d, proto.ProtoTCP, len(t)))
	h := tundev.VirtioHdr{Flags: tundev.VirtioNeedsCsum, GSOType: tundev.GSOTCPv6, HdrLen: hl,
		GSOSize: uint16(mss), CsumStart: 40, CsumOffset: 16}
	return h, b
}

// twoPeers6 is twoPeers in a dual-stack network: B (198.18.2.0/24,
// 2001:db8:1:2::/64) carries IPv6, C (198.18.3.0/24, 2001:db8:1:3::/64)
// does not advertise it.
func twoPeers6(t testing.TB) *Backend {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1, dualStack)
	b.Apply([]subnet.Event{
		lease6("198.18.2.0/24", "2001:db8:1:2::/64", "192.0.2.2", "", FeatureIPv6, FeaturePartialChecksum),
		lease6("198.18.3.0/24", "2001:db8:1:3::/64", "192.0.2.3", "", FeaturePartialChecksum),
	})
	return b
}

// l4Valid verifies the transport checksum of an IPv6 packet without
// extension headers.
func l4Valid(pkt []byte) bool {
	l4 := pkt[40:]
	return proto.Sum(l4, uint64(proto.PseudoHeaderSumIPv6(proto.IPv6Src(pkt), proto.IPv6Dst(pkt), pkt[6], len(l4)))) == 0xffff
}

func TestIPv6SuperpacketGoesOutAsOneTrainMarkedOrComplete(t *testing.T) {
	for _, partial := range []bool{false, true} {
		b := twoPeers6(t)
		tx := &b.workers[0].tx
		tb := b.table.Load()
		lookup6(tb, "2001:db8:1:2::1").partialCsum.Store(partial)
		const mss = 1380
		h, pkt := tcpSuper6("2001:db8:1:1::5", "2001:db8:1:2::7", 10*mss+300, mss, 1000)
		txRead(t, tx, tb, 0, h, pkt)
		if len(tx.out[0].msgs) != 1 || tx.out[0].meta[0].packets != 11 || tx.out[0].meta[0].ipv6 != 11 {
			t.Fatalf("partial %v: %d messages, want 1 train of 11 IPv6 packets", partial, len(tx.out[0].msgs))
		}
		wantOneZeroCopyTrain(t, tx, 72+mss, 22)
		for i, seg := range datagrams(tx, 0) {
			if proto.IPv6HopLimit(seg) != 63 || !bytes.Equal(seg[:4], pkt[:4]) {
				t.Fatalf("segment %d: hop limit %d, first word % x", i, proto.IPv6HopLimit(seg), seg[:4])
			}
			if markedIPv6(seg) != partial {
				t.Fatalf("segment %d: marked %v, peer takes partial checksums %v", i, markedIPv6(seg), partial)
			}
			if seq := binary.BigEndian.Uint32(seg[44:]); seq != 1000+uint32(i*mss) {
				t.Fatalf("segment %d: seq %d", i, seq)
			}
			if partial {
				// What the receiver does: length back, then the field holds
				// the pseudo-header sum of the segment.
				unmarkIPv6(seg)
				if got, want := binary.BigEndian.Uint16(seg[56:]), proto.PseudoHeaderSumIPv6(proto.IPv6Src(seg), proto.IPv6Dst(seg), proto.ProtoTCP, len(seg)-40); got != want {
					t.Fatalf("segment %d: partial checksum %#04x, want %#04x", i, got, want)
				}
			} else if int(binary.BigEndian.Uint16(seg[4:])) != len(seg)-40 || !l4Valid(seg) {
				t.Fatalf("segment %d: payload length %d for %d bytes, checksum valid %v", i, binary.BigEndian.Uint16(seg[4:]), len(seg), l4Valid(seg))
			}
		}
	}
}

func TestIPv6SinglePacketChecksumIsCompletedOrMarked(t *testing.T) {
	for _, partial := range []bool{false, true} {
		b := twoPeers6(t)
		tx := &b.workers[0].tx
		tb := b.table.Load()
		lookup6(tb, "2001:db8:1:2::1").partialCsum.Store(partial)
		h, pkt := tcpSuper6("2001:db8:1:1::5", "2001:db8:1:2::7", 100, 1400, 5)
		h.GSOType, h.GSOSize = tundev.GSONone, 0
		txRead(t, tx, tb, 0, h, pkt)
		seg := datagrams(tx, 0)[0]
		if markedIPv6(seg) != partial {
			t.Fatalf("partial %v: marked %v", partial, markedIPv6(seg))
		}
		if !partial && !l4Valid(seg) {
			t.Fatal("checksum not completed for a peer without the feature")
		}
	}
}

func TestIPv6TransmitDropsAndICMPv6Errors(t *testing.T) {
	b := twoPeers6(t)
	tx := &b.workers[0].tx
	tb := b.table.Load()
	lookup6(tb, "2001:db8:1:2::1").innerMTU.Store(1300)
	txReads(t, tx, tb,
		ipv6("2001:db8:1:1::5", "2001:db8:1:2::7", 100, 1),   // ttl_expired
		ipv6("2001:db8:1:1::5", "2001:db8:1:3::7", 100, 64),  // no_route: C does not carry IPv6 -> address unreachable
		ipv6("2001:db8:1:1::5", "2001:db8:1:9::7", 100, 64),  // no_route: nobody's -> address unreachable
		ipv6("2001:db8:1:1::5", "2001:db8:9::7", 100, 64),    // no_route: outside the network -> no route
		ipv6("2001:db8:1:1::5", "2001:db8:1:2::7", 1400, 64), // oversize -> packet too big
		ipv6("2001:db8:1:1::5", "ff02::16", 100, 64),         // no_route, multicast: no ICMPv6 error
	)
	d := tx.drops[famIPv6]
	if d[dropTTLExpired] != 1 || d[dropNoRoute] != 4 || d[dropOversize] != 1 || tx.drops[famIPv4] != [numDropReasons]uint32{} {
		t.Errorf("drops %v", tx.drops)
	}
	if len(tx.out[0].msgs) != 0 {
		t.Errorf("%d messages for packets that were all dropped", len(tx.out[0].msgs))
	}
	if len(tx.icmpOut) != 4 {
		t.Fatalf("%d ICMPv6 errors queued, want 4 (3 unreachable + 1 packet too big)", len(tx.icmpOut))
	}
	type tc struct{ typ, code uint8 }
	want := []tc{{1, 3}, {1, 3}, {1, 0}, {2, 0}}
	for i, buf := range tx.icmpOut {
		if !bytes.Equal(buf[:headroom], make([]byte, headroom)) {
			t.Fatalf("ICMPv6 %d: the virtio header in the headroom is not zero", i)
		}
		m := buf[headroom:]
		total, err := proto.CheckIPv6(m)
		if err != nil || total != len(m) || proto.IPv6NextHeader(m) != proto.ProtoICMPv6 || !l4Valid(m) {
			t.Fatalf("ICMPv6 %d does not check: %v", i, err)
		}
		if got := (tc{m[40], m[41]}); got != want[i] {
			t.Errorf("ICMPv6 %d: type/code %v, want %v", i, got, want[i])
		}
		if proto.IPv6DstAddr(m) != netip.MustParseAddr("2001:db8:1:1::5") {
			t.Errorf("ICMPv6 %d goes to %v", i, proto.IPv6DstAddr(m))
		}
	}
	if mtu := binary.BigEndian.Uint32(tx.icmpOut[3][headroom+44:]); mtu != 1300 {
		t.Errorf("packet too big advertises MTU %d, want 1300", mtu)
	}

	// A path below the IPv6 minimum MTU: a packet within 1280 bytes goes
	// alone (the outer datagram is fragmented), a larger one is told 1280.
	resetTx(tx)
	lookup6(tb, "2001:db8:1:2::1").innerMTU.Store(1200)
	txReads(t, tx, tb, ipv6("2001:db8:1:1::5", "2001:db8:1:2::7", 1280, 64), ipv6("2001:db8:1:1::5", "2001:db8:1:2::7", 1300, 64))
	if len(tx.out[0].msgs) != 1 || tx.out[0].meta[0].packets != 1 || !tx.out[0].meta[0].closed || tx.out[0].meta[0].bytes != 1280 {
		t.Errorf("a 1280-byte packet above the path MTU must go alone: %d messages", len(tx.out[0].msgs))
	}
	if len(tx.icmpOut) != 1 || binary.BigEndian.Uint32(tx.icmpOut[0][headroom+44:]) != proto.IPv6MinMTU {
		t.Errorf("%d ICMPv6 errors, want one packet too big advertising 1280", len(tx.icmpOut))
	}

	// A superpacket whose segments do not fit: every segment counted, one
	// Packet Too Big.
	resetTx(tx)
	h, pkt := tcpSuper6("2001:db8:1:1::5", "2001:db8:1:2::7", 5*1380, 1380, 1)
	txRead(t, tx, tb, 0, h, pkt)
	if tx.drops[famIPv6][dropOversize] != 5 || len(tx.icmpOut) != 1 || len(tx.out[0].msgs) != 0 {
		t.Errorf("oversize superpacket: drops %v, %d ICMP, %d messages", tx.drops, len(tx.icmpOut), len(tx.out[0].msgs))
	}
}

func TestIPv6ReceiveChecksTrustAndCountsByReason(t *testing.T) {
	b := twoPeers6(t)
	rx := &b.workers[0].rx
	tb := b.table.Load()
	peerB, peerC := netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("192.0.2.3")
	stranger := netip.MustParseAddr("192.0.2.99")
	valid := func() []byte { return ipv6("2001:db8:1:2::7", "2001:db8:1:1::5", 100, 64) }
	trailing := append(valid(), 0)
	truncated := valid()[:90]
	ext := valid() // a hop-by-hop header the receiver's kernel may read; we do not
	ext[6] = 0
	cases := []rxCase{
		{"valid", peerB, valid(), numDropReasons},
		{"valid, behind an extension header", peerB, ext, numDropReasons},
		{"from a stranger", stranger, valid(), dropUnknownSender},
		{"from a peer that does not carry IPv6", peerC, ipv6("2001:db8:1:3::7", "2001:db8:1:1::5", 100, 64), dropSpoofedSource},
		{"B's IPv6 source from C's address", peerC, valid(), dropSpoofedSource},
		{"spoofed source (another peer's IPv6 lease)", peerB, ipv6("2001:db8:1:3::7", "2001:db8:1:1::5", 100, 64), dropSpoofedSource},
		{"spoofed source (outside the network)", peerB, ipv6("2001:db8:2::7", "2001:db8:1:1::5", 100, 64), dropSpoofedSource},
		{"spoofed source (B's IPv4 lease as IPv4-mapped)", peerB, ipv6("::ffff:198.18.2.7", "2001:db8:1:1::5", 100, 64), dropSpoofedSource},
		{"foreign destination", peerB, ipv6("2001:db8:1:2::7", "2001:db8:1:3::5", 100, 64), dropForeignDestination},
		{"multicast destination", peerB, ipv6("2001:db8:1:2::7", "ff02::1", 100, 64), dropForeignDestination},
		{"trailing bytes", peerB, trailing, dropMalformed},
		{"truncated", peerB, truncated, dropTruncated},
		{"shorter than the fixed header", peerB, valid()[:30], dropMalformed},
		{"hop limit 1", peerB, ipv6("2001:db8:1:2::7", "2001:db8:1:1::5", 100, 1), dropTTLExpired},
	}
	for _, c := range cases {
		if familyOf(c.pkt) != famIPv6 {
			t.Fatalf("%s: not an IPv6 case", c.name)
		}
	}
	wantReceiveVerdicts(t, rx, tb, cases, func(name string, pkt []byte) {
		if proto.IPv6HopLimit(pkt) != 63 {
			t.Errorf("%s: delivered with hop limit %d, want 63", name, proto.IPv6HopLimit(pkt))
		}
	})
}

func TestIPv6MarkIsHonouredOnlyWhenBothLeasesAdvertiseIt(t *testing.T) {
	b := twoPeers6(t)
	rx := &b.workers[0].rx
	tb := b.table.Load()
	from := netip.MustParseAddr("192.0.2.2")
	markedTCP := func() []byte {
		_, pkt := tcpSuper6("2001:db8:1:2::7", "2001:db8:1:1::5", 100, 1400, 9)
		markIPv6(pkt)
		return pkt
	}
	pb := lookup6(tb, "2001:db8:1:2::1")

	pb.partialCsum.Store(true)
	pkt := markedTCP()
	p, partial := rx.accept(tb, from, pkt)
	if p == nil || !partial || int(binary.BigEndian.Uint16(pkt[4:])) != len(pkt)-40 {
		t.Errorf("from a peer with the feature: accepted %v, partial %v, payload length %d", p != nil, partial, binary.BigEndian.Uint16(pkt[4:]))
	}
	icmp := ipv6("2001:db8:1:2::7", "2001:db8:1:1::5", 100, 64) // no transport checksum to leave partial
	icmp[6] = proto.ProtoICMPv6
	markIPv6(icmp)
	for name, b0 := range map[string]bool{"with the feature": true, "without": false} {
		pb.partialCsum.Store(b0)
		for _, pkt := range [][]byte{append([]byte(nil), icmp...), markedTCP()} {
			rx.drops = batchCounts{}
			if p, _ := rx.accept(tb, from, pkt); (p != nil) != (b0 && pkt[6] == proto.ProtoTCP) {
				t.Errorf("%s: marked next header %d accepted %v (drops %v)", name, pkt[6], p != nil, rx.drops)
			}
			if p == nil && rx.drops[famIPv6][dropMalformed] != 1 {
				t.Errorf("%s: marked packet refused but not counted malformed: %v", name, rx.drops)
			}
		}
	}
	// Our own lease without the feature: the peer's is not believed.
	pb.partialCsum.Store(true)
	b.ownPartial.Store(false)
	if p, _ := rx.accept(tb, from, markedTCP()); p != nil {
		t.Error("a marked packet was taken with our own lease without the feature")
	}
}

func TestIPv6PathDoesNotAllocate(t *testing.T) {
	b := twoPeers6(t)
	h, super := tcpSuper6("2001:db8:1:1::5", "2001:db8:1:2::7", 45*1380, 1380, 1)
	small := ipv6("2001:db8:1:1::5", "2001:db8:1:2::7", 60, 64)
	noRoute := ipv6("2001:db8:1:1::5", "2001:db8:1:3::7", 60, 64)
	_, in := tcpSuper6("2001:db8:1:2::7", "2001:db8:1:1::5", 1380, 1380, 1)
	ins := make([][]byte, 32)
	for i := range ins {
		ins[i] = append([]byte(nil), in...)
		binary.BigEndian.PutUint32(ins[i][44:], 1+uint32(i*1380))
		markIPv6(ins[i])
	}
	wantPathAllocFree(t, b, netip.MustParseAddr("192.0.2.2"), h, super, [][]byte{small, noRoute}, ins, func(p []byte) {
		p[7] = 255
		markIPv6(p)
	})
}

// peerB6 is B's peer, found by its IPv6 subnet.
func peerB6(tb *table) *peer { return lookup6(tb, "2001:db8:1:2::1") }

// BenchmarkTransmitSplitIPv6 is BenchmarkTransmitSplit for a TSO6
// superpacket (IPv6 lookup, hop limit, split into a GSO train, marked for
// a peer that takes partial checksums).
func BenchmarkTransmitSplitIPv6(b *testing.B) {
	benchPeerModes(b, twoPeers6, peerB6, func(b *testing.B, be *Backend, tb *table, partial bool) {
		h, pkt := tcpSuper6("2001:db8:1:1::5", "2001:db8:1:2::7", 45*1400, 1400, 1)
		benchTransmitSplit(b, &be.workers[0].tx, tb, h, pkt)
	})
}

// BenchmarkReceiveAcceptAndCoalesceIPv6 is BenchmarkReceiveAcceptAndCoalesce
// for IPv6: trust checks and coalescing of 45 segments.
func BenchmarkReceiveAcceptAndCoalesceIPv6(b *testing.B) {
	benchPeerModes(b, twoPeers6, peerB6, func(b *testing.B, be *Backend, tb *table, partial bool) {
		var segs [][]byte
		for i := range 45 {
			_, p := tcpSuper6("2001:db8:1:2::7", "2001:db8:1:1::5", 1400, 1400, 1+uint32(i*1400))
			p[53] = 0x10 // ACK
			if partial {
				markIPv6(p)
			} else {
				binary.BigEndian.PutUint16(p[56:], 0)
				binary.BigEndian.PutUint16(p[56:], proto.Checksum(p[40:], uint64(proto.PseudoHeaderSumIPv6(proto.IPv6Src(p), proto.IPv6Dst(p), proto.ProtoTCP, len(p)-40))))
			}
			segs = append(segs, p)
		}
		benchAcceptAndCoalesce(b, &be.workers[0].rx, tb, segs, 72)
	})
}

// FuzzReceiveTrustBoundaryIPv6 is FuzzReceiveTrustBoundary in a dual-stack
// network: arbitrary datagrams (IPv6 seeds with extension headers, marks,
// GRO trains) from a peer that carries IPv6, one that does not, and a
// stranger. The receive path must never panic nor read past a packet;
// whatever it accepts as IPv6 comes from the sender's IPv6 lease, goes to
// ours, is exactly its payload length (the mark removed) and has its hop
// limit decremented; IPv4 keeps its own rules.
func FuzzReceiveTrustBoundaryIPv6(f *testing.F) {
	withExt := ipv6("2001:db8:1:2::7", "2001:db8:1:1::5", 100, 64)
	withExt[6] = 60 // destination options: its length byte says 8*(1+n) bytes
	f.Add(ipv6("2001:db8:1:2::7", "2001:db8:1:1::5", 100, 64), uint8(0), uint16(0))
	f.Add(withExt, uint8(0), uint16(0))
	_, m := tcpSuper6("2001:db8:1:2::7", "2001:db8:1:1::5", 60, 1400, 1)
	markIPv6(m)
	f.Add(append(append([]byte(nil), m...), m...), uint8(0), uint16(len(m)))
	f.Add(ipv6("2001:db8:1:3::7", "2001:db8:1:1::5", 60, 2), uint8(1), uint16(0))
	f.Add(ipv4("198.18.2.7", "198.18.1.5", 100, 64, false), uint8(0), uint16(0))
	f.Add([]byte{0x60, 0, 0, 0, 0, 0, 6, 1}, uint8(2), uint16(3))
	b := twoPeers6(f)
	fuzzReceive(f, b, false, func(t *testing.T, tb *table, src netip.Addr, pkt []byte, p *peer, partial bool) bool {
		if proto.Version(pkt) != 6 {
			return false
		}
		total, err := proto.CheckIPv6(pkt)
		if err != nil || total != len(pkt) {
			t.Fatalf("accepted an IPv6 packet of %d bytes, payload length %d: %v", len(pkt), total, err)
		}
		if partial && !partialTransport6(pkt) {
			t.Fatal("a packet that cannot carry a partial checksum was taken as partial")
		}
		if q := tb.lookup6(proto.IPv6SrcWords(pkt)); q == nil || q != p || !q.sentFrom(src) || !q.subnet6.Contains(proto.IPv6SrcAddr(pkt)) {
			t.Fatalf("accepted inner source %v from %v", proto.IPv6SrcAddr(pkt), src)
		}
		if !tb.isOwn6(proto.IPv6DstWords(pkt)) || !leaseA6.Contains(proto.IPv6DstAddr(pkt)) {
			t.Fatalf("accepted foreign destination %v", proto.IPv6DstAddr(pkt))
		}
		if proto.IPv6HopLimit(pkt) == 0 {
			t.Fatal("accepted with hop limit 0")
		}
		return true
	})
}
