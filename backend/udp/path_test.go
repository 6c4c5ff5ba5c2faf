package udp

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"unsafe"

	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
)

// ipv4 builds an IPv4/UDP packet of exactly size bytes (>= 28) with a valid
// header checksum; the UDP checksum is 0 (none), which IPv4 allows.
func ipv4(src, dst string, size int, ttl uint8, df bool) []byte {
	b := make([]byte, size)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(size))
	binary.BigEndian.PutUint16(b[4:], 0x4242)
	if df {
		b[6] = 0x40
	}
	b[8] = ttl
	b[9] = proto.ProtoUDP
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	binary.BigEndian.PutUint16(b[10:], proto.IPv4HeaderChecksum(b[:20]))
	binary.BigEndian.PutUint16(b[20:], 4000)
	binary.BigEndian.PutUint16(b[22:], 5000)
	binary.BigEndian.PutUint16(b[24:], uint16(size-20))
	for i := 28; i < size; i++ {
		b[i] = byte(i)
	}
	return b
}

// tcpSuper builds what a TUN with TSO hands over for a TCP superpacket:
// IPv4 (DF) + TCP with 12 bytes of options + payload, the TCP checksum
// field holding the pseudo-header sum (CHECKSUM_PARTIAL), and its virtio
// header (GSO TCPv4, segments of mss payload bytes).
func tcpSuper(src, dst string, payload, mss int, seq uint32) (tundev.VirtioHdr, []byte) {
	const hl = 20 + 32
	b := make([]byte, hl+payload)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	binary.BigEndian.PutUint16(b[4:], 0x1000)
	b[6] = 0x40
	b[8] = 64
	b[9] = proto.ProtoTCP
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	binary.BigEndian.PutUint16(b[10:], proto.IPv4HeaderChecksum(b[:20]))
	binary.BigEndian.PutUint16(b[20:], 40000)
	binary.BigEndian.PutUint16(b[22:], 5201)
	binary.BigEndian.PutUint32(b[24:], seq)
	binary.BigEndian.PutUint32(b[28:], 777)
	b[32] = 8 << 4 // 32-byte header
	b[33] = 0x18   // ACK|PSH
	binary.BigEndian.PutUint16(b[34:], 500)
	copy(b[40:52], []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}) // NOP NOP timestamps
	for i := hl; i < len(b); i++ {
		b[i] = byte(i * 13)
	}
	binary.BigEndian.PutUint16(b[36:], proto.PseudoHeaderSum(s, d, proto.ProtoTCP, len(b)-20))
	h := tundev.VirtioHdr{Flags: tundev.VirtioNeedsCsum, GSOType: tundev.GSOTCPv4, HdrLen: hl,
		GSOSize: uint16(mss), CsumStart: 20, CsumOffset: 16}
	return h, b
}

// txReads hands pkts to the TX loop as consecutive TUN reads of one batch
// (each with a zero virtio header: complete checksums, no GSO).
func txReads(t testing.TB, tx *txLoop, tb *table, pkts ...[]byte) {
	t.Helper()
	for i, p := range pkts {
		txRead(t, tx, tb, i, tundev.VirtioHdr{}, p)
	}
}

// txRead places pkt with virtio header h in read slot i and handles it.
func txRead(t testing.TB, tx *txLoop, tb *table, i int, h tundev.VirtioHdr, pkt []byte) {
	t.Helper()
	slot := tx.slots[i]
	h.Encode(slot)
	n := tundev.VirtioHdrLen + copy(slot[tundev.VirtioHdrLen:], pkt)
	if err := tx.handle(tb, slot[:n]); err != nil {
		t.Fatal(err)
	}
}

// resetTx forgets the batch built so far (pure tests have no socket).
func resetTx(tx *txLoop) {
	for i := range tx.out {
		tx.out[i].msgs, tx.out[i].meta = tx.out[i].msgs[:0], tx.out[i].meta[:0]
	}
	tx.used, tx.npiece, tx.bytes, tx.packets = 0, 0, 0, 0
	tx.drops = batchCounts{}
	tx.icmpOut = tx.icmpOut[:0]
}

// datagrams returns the datagrams message k (to the IPv4 socket) will
// become on the wire.
func datagrams(tx *txLoop, k int) [][]byte { return datagramsOf(&tx.out[underlay4], k) }

// datagramsOf is datagrams of message k of outbox o.
func datagramsOf(o *outbox, k int) [][]byte {
	m := o.msgs[k]
	var all []byte
	for _, p := range m.Iov {
		all = append(all, p...)
	}
	seg := m.SegSize
	if seg == 0 {
		seg = len(all)
	}
	var out [][]byte
	for off := 0; off < len(all); off += seg {
		out = append(out, all[off:min(off+seg, len(all))])
	}
	return out
}

// inSlots reports whether p points into one of the TX read slots.
func inSlots(tx *txLoop, p []byte) bool {
	a := uintptr(unsafe.Pointer(unsafe.SliceData(p)))
	for _, s := range tx.slots {
		lo := uintptr(unsafe.Pointer(unsafe.SliceData(s)))
		if a >= lo && a < lo+uintptr(len(s)) {
			return true
		}
	}
	return false
}

func twoPeers(t testing.TB) *Backend {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2"), added("198.18.3.0/24", "192.0.2.3")})
	return b
}

// tcpChecksumValid verifies the TCP checksum of an IPv4 packet.
func tcpChecksumValid(pkt []byte) bool {
	ihl := proto.IPv4HeaderLength(pkt)
	l4 := pkt[ihl:]
	return proto.Sum(l4, uint64(proto.PseudoHeaderSum(proto.IPv4Src(pkt), proto.IPv4Dst(pkt), proto.IPv4Protocol(pkt), len(l4)))) == 0xffff
}

// coalesce adds pkt to rx's GRO table as the RX loop does: when it does
// not join the group being built, that group is handed over first.
func coalesce(rx *rxLoop, pkt []byte, partial bool) {
	if !rx.co.Add(pkt, partial) {
		rx.co.Group()
		rx.co.Reset()
		rx.co.Add(pkt, partial)
	}
}

// wantOneZeroCopyTrain checks the first message to the IPv4 socket: a GSO
// train to B (192.0.2.2:8285) of segments of segSize bytes in pieces
// pieces (header, payload), every payload piece still in its read slot.
func wantOneZeroCopyTrain(t *testing.T, tx *txLoop, segSize, pieces int) {
	t.Helper()
	m := tx.out[0].msgs[0]
	if m.SegSize != segSize || m.Addr != netip.MustParseAddrPort("192.0.2.2:8285") || len(m.Iov) != pieces {
		t.Fatalf("train: segsize %d, to %v, %d pieces", m.SegSize, m.Addr, len(m.Iov))
	}
	for i := 1; i < len(m.Iov); i += 2 {
		if !inSlots(tx, m.Iov[i]) {
			t.Fatalf("payload piece %d was copied out of the read slot", i)
		}
	}
}

// rxCase is a datagram from src and how the receive path must take it.
type rxCase struct {
	name   string
	src    netip.Addr
	pkt    []byte
	reason dropReason // numDropReasons = accepted
}

// wantReceiveVerdicts hands a copy of each case's packet to rx.accept: an
// accepted one must come back whole (not partial, nothing dropped) and
// pass delivered; a refused one must be counted once, under its family
// and reason.
func wantReceiveVerdicts(t *testing.T, rx *rxLoop, tb *table, cases []rxCase, delivered func(name string, pkt []byte)) {
	t.Helper()
	for _, c := range cases {
		rx.drops = batchCounts{}
		pkt := append([]byte(nil), c.pkt...)
		p, partial := rx.accept(tb, c.src, pkt)
		if c.reason == numDropReasons {
			if p == nil || partial || rx.drops != (batchCounts{}) {
				t.Errorf("%s: not accepted (drops %v)", c.name, rx.drops)
				continue
			}
			delivered(c.name, pkt)
			continue
		}
		if p != nil || rx.drops[familyOf(c.pkt)][c.reason] != 1 {
			t.Errorf("%s: want dropped as %v/%v; accepted %v, drops %v", c.name, familyOf(c.pkt), c.reason, p != nil, rx.drops)
		}
	}
}

// wantPathAllocFree runs a whole batch each way through b's first worker
// and checks that neither allocates: the TX loop reads the superpacket
// super (virtio header h) and then each of singles, counts and flushes;
// the RX loop takes each of ins from B at from, each made fresh by
// refresh first (the receive path rewrites TTL and mark in place), and
// coalesces what it accepts.
func wantPathAllocFree(t *testing.T, b *Backend, from netip.Addr, h tundev.VirtioHdr, super []byte, singles, ins [][]byte, refresh func(p []byte)) {
	t.Helper()
	tx := &b.workers[0].tx
	rx := &b.workers[0].rx
	tb := b.table.Load()
	allocs := testing.AllocsPerRun(200, func() {
		resetTx(tx)
		txRead(t, tx, tb, 0, h, super)
		for i, p := range singles {
			txRead(t, tx, tb, 1+i, tundev.VirtioHdr{}, p)
		}
		tx.run.add(tx.stats, tx.out[0].meta[0].peer, 1, 1)
		tx.run.flush(tx.stats)
		tx.drops.flush(tx.stats)
		for _, p := range ins {
			refresh(p)
			if peer, partial := rx.accept(tb, from, p); peer != nil {
				rx.run.add(rx.stats, peer, 1, len(p))
				coalesce(rx, p, partial)
			}
		}
		rx.co.Group()
		rx.co.Reset()
		rx.run.flush(rx.stats)
	})
	if allocs != 0 {
		t.Errorf("allocs per batch = %v, want 0", allocs)
	}
}

func TestSuperpacketGoesOutAsOneGSOTrainWithoutCopyingItsPayload(t *testing.T) {
	for _, partial := range []bool{false, true} {
		b := twoPeers(t)
		tx := &b.workers[0].tx
		tb := b.table.Load()
		tb.lookup(addr32("198.18.2.1")).partialCsum.Store(partial)
		const mss = 1400
		h, pkt := tcpSuper("198.18.1.5", "198.18.2.7", 10*mss+300, mss, 1000)
		txRead(t, tx, tb, 0, h, pkt)
		if len(tx.out[0].msgs) != 1 || tx.out[0].meta[0].packets != 11 {
			t.Fatalf("partial %v: %d messages, want 1 train of 11", partial, len(tx.out[0].msgs))
		}
		wantOneZeroCopyTrain(t, tx, 52+mss, 22)
		for i, seg := range datagrams(tx, 0) {
			want := 52 + mss
			if i == 10 {
				want = 52 + 300
			}
			if len(seg) != want || proto.IPv4TotalLength(seg) != want || proto.IPv4TTL(seg) != 63 || !proto.IPv4HeaderChecksumValid(seg) {
				t.Fatalf("segment %d: %d bytes, total %d, ttl %d, header checksum valid %v", i, len(seg), proto.IPv4TotalLength(seg), proto.IPv4TTL(seg), proto.IPv4HeaderChecksumValid(seg))
			}
			if seq := binary.BigEndian.Uint32(seg[24:]); seq != 1000+uint32(i*mss) {
				t.Fatalf("segment %d: seq %d", i, seq)
			}
			if psh := seg[33]&0x08 != 0; psh != (i == 10) {
				t.Fatalf("segment %d: PSH %v", i, psh)
			}
			if marked(seg) != partial {
				t.Fatalf("segment %d: marked %v, peer takes partial checksums %v", i, marked(seg), partial)
			}
			if partial {
				if got, want := binary.BigEndian.Uint16(seg[36:]), proto.PseudoHeaderSum(proto.IPv4Src(seg), proto.IPv4Dst(seg), proto.ProtoTCP, len(seg)-20); got != want {
					t.Fatalf("segment %d: partial checksum %#04x, want the pseudo-header sum %#04x", i, got, want)
				}
			} else if !tcpChecksumValid(seg) {
				t.Fatalf("segment %d: TCP checksum invalid", i)
			}
		}
	}
}

func TestPartialChecksumOfSinglePacketIsCompletedOrMarkedByPeer(t *testing.T) {
	for _, partial := range []bool{false, true} {
		b := twoPeers(t)
		tx := &b.workers[0].tx
		tb := b.table.Load()
		tb.lookup(addr32("198.18.2.1")).partialCsum.Store(partial)
		h, pkt := tcpSuper("198.18.1.5", "198.18.2.7", 100, 1400, 5)
		h.GSOType, h.GSOSize = tundev.GSONone, 0
		txRead(t, tx, tb, 0, h, pkt)
		seg := datagrams(tx, 0)[0]
		if marked(seg) != partial || !proto.IPv4HeaderChecksumValid(seg) {
			t.Fatalf("partial %v: marked %v, header checksum valid %v", partial, marked(seg), proto.IPv4HeaderChecksumValid(seg))
		}
		if !partial && !tcpChecksumValid(seg) {
			t.Fatal("checksum not completed for a peer without the feature")
		}
		if partial && binary.BigEndian.Uint16(seg[36:]) != binary.BigEndian.Uint16(pkt[36:]) {
			t.Fatal("partial checksum changed for a peer with the feature")
		}
	}
}

// TestReservedBitFromTheApplicationIsNotTakenForTheMark: a sender clears
// a reserved bit it did not set itself, whether or not the peer takes
// partial checksums (a peer whose own setting differs from its lease, or
// one that changes its mind, must never see an application's bit as our
// mark).
func TestReservedBitFromTheApplicationIsNotTakenForTheMark(t *testing.T) {
	for _, peerPartial := range []bool{true, false} {
		b := twoPeers(t)
		tx := &b.workers[0].tx
		tb := b.table.Load()
		tb.lookup(addr32("198.18.2.1")).partialCsum.Store(peerPartial)
		pkt := ipv4("198.18.1.5", "198.18.2.7", 200, 64, false)
		setMark(pkt) // as a raw socket could send it, checksum complete (none)
		h, super := tcpSuper("198.18.1.5", "198.18.2.7", 3*1400, 1400, 1)
		setMark(super) // a superpacket from a raw socket
		tcp := ipv4("198.18.1.5", "198.18.2.7", 300, 64, false)
		tcp[9] = proto.ProtoTCP
		binary.BigEndian.PutUint16(tcp[10:], 0)
		binary.BigEndian.PutUint16(tcp[10:], proto.IPv4HeaderChecksum(tcp[:20]))
		setMark(tcp)
		txReads(t, tx, tb, pkt, tcp)
		txRead(t, tx, tb, 2, h, super)
		var all [][]byte
		for k := range tx.out[0].msgs {
			all = append(all, datagrams(tx, k)...)
		}
		if len(all) != 5 {
			t.Fatalf("peer partial %v: %d datagrams, want 5", peerPartial, len(all))
		}
		for i, seg := range all[:2] {
			if marked(seg) || !proto.IPv4HeaderChecksumValid(seg) {
				t.Errorf("peer partial %v: complete-checksum packet %d reaches the peer marked %v, header checksum valid %v",
					peerPartial, i, marked(seg), proto.IPv4HeaderChecksumValid(seg))
			}
		}
		for i, seg := range all[2:] {
			if marked(seg) != peerPartial || !proto.IPv4HeaderChecksumValid(seg) {
				t.Errorf("peer partial %v: segment %d marked %v, header checksum valid %v", peerPartial, i, marked(seg), proto.IPv4HeaderChecksumValid(seg))
			}
		}
	}
}

func TestSmallPacketsToOnePeerShareOneTrain(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	a := ipv4("198.18.1.5", "198.18.2.7", 60, 64, false)
	txReads(t, tx, b.table.Load(), a, a, a)
	if len(tx.out[0].msgs) != 1 || tx.out[0].msgs[0].SegSize != 60 || len(tx.out[0].msgs[0].Iov) != 3 {
		t.Fatalf("got %d messages, want one train of 3x60", len(tx.out[0].msgs))
	}
	want := ipv4("198.18.1.5", "198.18.2.7", 60, 63, false)
	for i, d := range datagrams(tx, 0) {
		if !bytes.Equal(d, want) || !inSlots(tx, tx.out[0].msgs[0].Iov[i]) {
			t.Fatalf("datagram %d differs from the packet with TTL 63, or was copied", i)
		}
	}
}

func TestTrainsBreakOnPeerChangeShortSegmentAndLimits(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	tb := b.table.Load()
	const S = 1400
	toA := func(n int) []byte { return ipv4("198.18.1.5", "198.18.2.7", n, 64, true) }
	toB := func(n int) []byte { return ipv4("198.18.1.5", "198.18.3.7", n, 64, true) }
	txReads(t, tx, tb, toA(S), toA(S), toA(100), toA(100), toB(S), toA(S), toA(S))
	var got [][2]int // (packets, segsize)
	for k, m := range tx.out[0].msgs {
		got = append(got, [2]int{tx.out[0].meta[k].packets, m.SegSize})
	}
	want := [][2]int{{3, S}, {1, 100}, {1, S}, {2, S}}
	if len(got) != len(want) {
		t.Fatalf("trains %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("trains %v, want %v", got, want)
		}
	}

	resetTx(tx)
	tx.maxSegs = 4
	h, pkt := tcpSuper("198.18.1.5", "198.18.2.7", 10*S, S, 1)
	txRead(t, tx, tb, 0, h, pkt)
	if len(tx.out[0].msgs) != 3 || tx.out[0].meta[0].packets != 4 || tx.out[0].meta[2].packets != 2 {
		t.Fatalf("with 4 segments max: %d trains", len(tx.out[0].msgs))
	}
	resetTx(tx)
	tx.maxSegs = 128
	h, pkt = tcpSuper("198.18.1.5", "198.18.2.7", 65535-52, S, 1) // segments carry more than 64 KiB with their headers
	txRead(t, tx, tb, 0, h, pkt)
	for k := range tx.out[0].msgs {
		if tx.out[0].meta[k].bytes > maxGSOPayload {
			t.Fatalf("train %d carries %d bytes, more than %d", k, tx.out[0].meta[k].bytes, maxGSOPayload)
		}
	}
	if len(tx.out[0].msgs) != 2 {
		t.Errorf("a 64 KiB superpacket became %d trains, want 2", len(tx.out[0].msgs))
	}
}

func TestTransmitDropsAreCountedByReasonWithICMPErrors(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	tb := b.table.Load()
	tb.lookup(addr32("198.18.3.1")).innerMTU.Store(1000)

	v6 := make([]byte, 60) // from :: (no ICMP error), IPv6 off: no route
	v6[0], v6[7] = 0x60, 64
	txReads(t, tx, tb,
		ipv4("198.18.1.5", "198.18.2.7", 100, 1, false),    // ttl_expired
		ipv4("198.18.1.5", "198.18.9.7", 100, 64, false),   // no_route: nobody's subnet -> host unreachable
		ipv4("198.18.1.5", "198.51.100.7", 100, 64, false), // no_route: outside the network -> net unreachable
		ipv4("198.18.1.5", "198.18.1.7", 100, 64, false),   // no_route: own lease
		v6,                      // no_route (family ipv6)
		[]byte{0x45, 0, 0, 200}, // malformed
		ipv4("198.18.1.5", "198.18.3.7", 1200, 64, true), // oversize, DF -> frag needed
	)
	txRead(t, tx, tb, 7, tundev.VirtioHdr{}, ipv4("198.18.1.5", "198.18.3.7", 1200, 64, false)) // oversize, no DF -> sent alone
	txRead(t, tx, tb, 6, tundev.VirtioHdr{}, ipv4("198.18.1.5", "198.18.3.7", 900, 64, false))
	d := tx.drops[famIPv4]
	if d[dropTTLExpired] != 1 || d[dropNoRoute] != 3 || d[dropMalformed] != 1 || d[dropOversize] != 1 {
		t.Errorf("IPv4 drops %v", d)
	}
	if d6 := tx.drops[famIPv6]; d6[dropNoRoute] != 1 || d6 != (func() (c [numDropReasons]uint32) { c[dropNoRoute] = 1; return })() {
		t.Errorf("IPv6 drops %v, want 1 no_route", d6)
	}
	if len(tx.out[0].msgs) != 2 || tx.out[0].meta[0].packets != 1 || !tx.out[0].meta[0].closed || tx.out[0].meta[0].bytes != 1200 {
		t.Errorf("non-DF oversize packet must go alone: %d messages", len(tx.out[0].msgs))
	}
	if len(tx.icmpOut) != 4 {
		t.Fatalf("%d ICMP errors queued, want 4 (3 unreachable + 1 frag needed)", len(tx.icmpOut))
	}
	type tc struct{ typ, code uint8 }
	want := []tc{{3, 1}, {3, 0}, {3, 1}, {3, 4}}
	for i, buf := range tx.icmpOut {
		if !bytes.Equal(buf[:headroom], make([]byte, headroom)) {
			t.Fatalf("ICMP %d: the virtio header in the headroom is not zero", i)
		}
		m := buf[headroom:]
		if _, err := proto.CheckIPv4(m); err != nil || !proto.IPv4HeaderChecksumValid(m) || proto.Checksum(m[20:], 0) != 0 {
			t.Fatalf("ICMP %d does not check: %v", i, err)
		}
		if got := (tc{m[20], m[21]}); got != want[i] {
			t.Errorf("ICMP %d: type/code %v, want %v", i, got, want[i])
		}
		if proto.IPv4DstAddr(m) != netip.MustParseAddr("198.18.1.5") {
			t.Errorf("ICMP %d goes to %v", i, proto.IPv4DstAddr(m))
		}
	}
	if mtu := binary.BigEndian.Uint16(tx.icmpOut[3][headroom+26:]); mtu != 1000 {
		t.Errorf("frag needed advertises MTU %d, want 1000", mtu)
	}

	// A DF superpacket whose segments do not fit: every segment counted,
	// one ICMP error.
	resetTx(tx)
	h, pkt := tcpSuper("198.18.1.5", "198.18.3.7", 5*1400, 1400, 1)
	txRead(t, tx, tb, 0, h, pkt)
	if tx.drops[famIPv4][dropOversize] != 5 || len(tx.icmpOut) != 1 || len(tx.out[0].msgs) != 0 {
		t.Errorf("oversize superpacket: drops %v, %d ICMP, %d messages", tx.drops, len(tx.icmpOut), len(tx.out[0].msgs))
	}
}

func TestICMPErrorsAreRateLimited(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	tx.icmpToken = 2
	tx.icmpLast = tx.icmpLast.AddDate(3000, 0, 0) // "now" is before the last refill: no refill
	var pkts [][]byte
	for i := 0; i < 6; i++ {
		pkts = append(pkts, ipv4("198.18.1.5", "198.18.9.7", 100, 64, false))
	}
	txReads(t, tx, b.table.Load(), pkts...)
	if len(tx.icmpOut) != 2 || tx.drops[famIPv4][dropNoRoute] != 6 {
		t.Errorf("%d ICMP errors for 6 drops with 2 tokens; drops %v", len(tx.icmpOut), tx.drops)
	}
}

func TestReceiveChecksTrustAndCountsByReason(t *testing.T) {
	b := twoPeers(t)
	rx := &b.workers[0].rx
	tb := b.table.Load()
	peerA := netip.MustParseAddr("192.0.2.2")
	stranger := netip.MustParseAddr("192.0.2.99")

	truncated := ipv4("198.18.2.7", "198.18.1.5", 100, 64, false)[:80]
	trailing := append(ipv4("198.18.2.7", "198.18.1.5", 100, 64, false), 0)
	badSum := ipv4("198.18.2.7", "198.18.1.5", 100, 64, false)
	badSum[10] ^= 0xff
	cases := []rxCase{
		{"valid", peerA, ipv4("198.18.2.7", "198.18.1.5", 100, 64, false), numDropReasons},
		{"from a stranger", stranger, ipv4("198.18.2.7", "198.18.1.5", 100, 64, false), dropUnknownSender},
		{"garbage from a stranger", stranger, []byte{1, 2, 3}, dropUnknownSender},
		{"spoofed source (another peer's subnet)", peerA, ipv4("198.18.3.7", "198.18.1.5", 100, 64, false), dropSpoofedSource},
		{"spoofed source (outside the network)", peerA, ipv4("198.51.100.1", "198.18.1.5", 100, 64, false), dropSpoofedSource},
		{"foreign destination", peerA, ipv4("198.18.2.7", "198.18.3.5", 100, 64, false), dropForeignDestination},
		{"malformed", peerA, []byte{0x45, 0, 0}, dropMalformed},
		{"IPv6 from ::, which no peer holds", peerA, append([]byte{0x60}, make([]byte, 59)...), dropSpoofedSource},
		{"neither IPv4 nor IPv6", peerA, append([]byte{0x50}, make([]byte, 59)...), dropMalformed},
		{"trailing bytes", peerA, trailing, dropMalformed},
		{"bad header checksum", peerA, badSum, dropMalformed},
		{"truncated inner packet", peerA, truncated, dropTruncated},
		{"TTL 1", peerA, ipv4("198.18.2.7", "198.18.1.5", 100, 1, false), dropTTLExpired},
	}
	wantReceiveVerdicts(t, rx, tb, cases, func(name string, pkt []byte) {
		if proto.IPv4TTL(pkt) != 63 || !proto.IPv4HeaderChecksumValid(pkt) {
			t.Errorf("%s: delivered ttl %d, checksum valid %v", name, proto.IPv4TTL(pkt), proto.IPv4HeaderChecksumValid(pkt))
		}
	})
}

func TestMarkIsHonouredOnlyWhenBothLeasesAdvertiseIt(t *testing.T) {
	b := twoPeers(t)
	rx := &b.workers[0].rx
	tb := b.table.Load()
	markedTCP := func() []byte {
		_, pkt := tcpSuper("198.18.2.7", "198.18.1.5", 100, 1400, 9)
		setMark(pkt)
		return pkt
	}
	pa := tb.lookup(addr32("198.18.2.1"))

	pa.partialCsum.Store(true)
	pkt := markedTCP()
	p, partial := rx.accept(tb, netip.MustParseAddr("192.0.2.2"), pkt)
	if p == nil || !partial || marked(pkt) || !proto.IPv4HeaderChecksumValid(pkt) {
		t.Errorf("from a peer with the feature: accepted %v, partial %v, still marked %v", p != nil, partial, marked(pkt))
	}
	marked1 := ipv4("198.18.2.7", "198.18.1.5", 100, 64, false) // ICMP-like: no transport checksum to leave partial
	marked1[9] = proto.ProtoICMP
	binary.BigEndian.PutUint16(marked1[10:], 0)
	binary.BigEndian.PutUint16(marked1[10:], proto.IPv4HeaderChecksum(marked1[:20]))
	setMark(marked1)
	rx.drops = batchCounts{}
	if p, _ := rx.accept(tb, netip.MustParseAddr("192.0.2.2"), marked1); p != nil || rx.drops[famIPv4][dropMalformed] != 1 {
		t.Errorf("a marked packet that cannot be partial was accepted (drops %v)", rx.drops)
	}

	pa.partialCsum.Store(false)
	pkt = markedTCP()
	p, partial = rx.accept(tb, netip.MustParseAddr("192.0.2.2"), pkt)
	if p == nil || partial || !marked(pkt) {
		t.Errorf("from a peer without the feature: accepted %v, partial %v, mark cleared %v", p != nil, partial, !marked(pkt))
	}

	// Our own lease without the feature (--partial-checksums=false): a
	// peer that advertises it is not believed either.
	pa.partialCsum.Store(true)
	b.ownPartial.Store(false)
	pkt = markedTCP()
	p, partial = rx.accept(tb, netip.MustParseAddr("192.0.2.2"), pkt)
	if p == nil || partial || !marked(pkt) {
		t.Errorf("with our own lease without the feature: accepted %v, partial %v, mark cleared %v", p != nil, partial, !marked(pkt))
	}
}

func TestNoMarksWhenOurOwnLeaseDoesNotAdvertiseTheFeature(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	tb := b.table.Load()
	tb.lookup(addr32("198.18.2.1")).partialCsum.Store(true)
	own := subnet.Event{Type: subnet.EventAdded, Lease: subnet.Lease{Subnet: netip.MustParsePrefix("198.18.1.0/24"),
		Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.0.2.1")}}} // a reservation written by hand
	b.Apply([]subnet.Event{own})
	h, pkt := tcpSuper("198.18.1.5", "198.18.2.7", 3*1400, 1400, 1)
	txRead(t, tx, tb, 0, h, pkt)
	for i, seg := range datagrams(tx, 0) {
		if marked(seg) || !tcpChecksumValid(seg) {
			t.Fatalf("segment %d: marked %v, checksum valid %v; our lease does not advertise partial checksums", i, marked(seg), tcpChecksumValid(seg))
		}
	}
	own.Lease.Attrs.BackendData = []byte(`{"tulle":{"features":["partial-checksum"]}}`)
	b.Apply([]subnet.Event{own})
	resetTx(tx)
	h, pkt = tcpSuper("198.18.1.5", "198.18.2.7", 3*1400, 1400, 1)
	txRead(t, tx, tb, 0, h, pkt)
	if !marked(datagrams(tx, 0)[0]) {
		t.Fatal("not marked once our own lease advertises the feature")
	}
}

func TestLeaseFeaturesSetAndUpdateThePeer(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	ev := added("198.18.2.0/24", "192.0.2.2")
	b.Apply([]subnet.Event{ev})
	p := b.table.Load().lookup(addr32("198.18.2.1"))
	if p.partialCsum.Load() {
		t.Fatal("a lease without BackendData (flannel) has the partial-checksum feature")
	}
	ev.Lease.Attrs.BackendData = []byte(`{"tulle":{"version":"v1","features":["x","partial-checksum"]}}`)
	b.Apply([]subnet.Event{ev})
	if p2 := b.table.Load().lookup(addr32("198.18.2.1")); p2 != p || !p.partialCsum.Load() {
		t.Fatal("a renewal with the feature did not turn it on in place")
	}
	for _, data := range []string{`{"tulle":{"version":"v1"}}`, `"junk"`, `{"tulle":{"features":"partial-checksum"}}`} {
		ev.Lease.Attrs.BackendData = []byte(data)
		b.Apply([]subnet.Event{ev})
		if p.partialCsum.Load() {
			t.Errorf("BackendData %s turns the feature on", data)
		}
	}
}

func TestPathDoesNotAllocate(t *testing.T) {
	b := twoPeers(t)
	h, super := tcpSuper("198.18.1.5", "198.18.2.7", 45*1400, 1400, 1)
	small := ipv4("198.18.1.5", "198.18.2.7", 60, 64, true)
	_, in := tcpSuper("198.18.2.7", "198.18.1.5", 1400, 1400, 1)
	binary.BigEndian.PutUint16(in[36:], 0)
	binary.BigEndian.PutUint16(in[36:], proto.Checksum(in[20:], uint64(proto.PseudoHeaderSum(proto.IPv4Src(in), proto.IPv4Dst(in), proto.ProtoTCP, len(in)-20))))
	ins := make([][]byte, 32)
	for i := range ins {
		ins[i] = append([]byte(nil), in...)
		binary.BigEndian.PutUint32(ins[i][24:], 1+uint32(i*1400))
	}
	wantPathAllocFree(t, b, netip.MustParseAddr("192.0.2.2"), h, super, [][]byte{small}, ins, func(p []byte) {
		p[8] = 255
		binary.BigEndian.PutUint16(p[10:], 0)
		binary.BigEndian.PutUint16(p[10:], proto.IPv4HeaderChecksum(p[:20]))
	})
}

// benchPeerModes runs fn as two sub-benchmarks on a backend from setup,
// with B (the peer that peerB finds) taking complete checksums (a flannel
// host) in one and partial ones (a Tulle host) in the other.
func benchPeerModes(b *testing.B, setup func(testing.TB) *Backend, peerB func(*table) *peer, fn func(b *testing.B, be *Backend, tb *table, partial bool)) {
	for _, partial := range []bool{false, true} {
		name := "complete-checksums"
		if partial {
			name = "partial-checksums"
		}
		b.Run(name, func(b *testing.B) {
			be := setup(b)
			tb := be.table.Load()
			peerB(tb).partialCsum.Store(partial)
			fn(b, be, tb, partial)
		})
	}
}

// onePeer is a backend with one peer, B (198.18.2.0/24 at 192.0.2.2).
func onePeer(t testing.TB) *Backend {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")})
	return b
}

// peerB is B's peer, found by its IPv4 subnet.
func peerB(tb *table) *peer { return tb.lookup(addr32("198.18.2.1")) }

// benchTransmitSplit measures the TX loop's handling of the superpacket
// pkt (virtio header h) read from the TUN.
func benchTransmitSplit(b *testing.B, tx *txLoop, tb *table, h tundev.VirtioHdr, pkt []byte) {
	b.ReportAllocs()
	b.SetBytes(int64(len(pkt)))
	for b.Loop() {
		resetTx(tx)
		txRead(b, tx, tb, 0, h, pkt)
	}
}

// benchAcceptAndCoalesce measures the RX loop's trust checks and GRO over
// segs, all from B, each made fresh before every run by copying back its
// first hdrLen bytes (TTL or hop limit, mark, lengths).
func benchAcceptAndCoalesce(b *testing.B, rx *rxLoop, tb *table, segs [][]byte, hdrLen int) {
	pristine := make([][]byte, len(segs))
	for i := range segs {
		pristine[i] = append([]byte(nil), segs[i]...)
	}
	src := netip.MustParseAddr("192.0.2.2")
	b.ReportAllocs()
	b.SetBytes(int64(len(segs) * len(segs[0])))
	for b.Loop() {
		for i, p := range segs {
			copy(p[:hdrLen], pristine[i][:hdrLen])
			if peer, partial := rx.accept(tb, src, p); peer != nil {
				coalesce(rx, p, partial)
			}
		}
		if rx.co.Packets() != len(segs) {
			b.Fatalf("coalesced %d of %d segments", rx.co.Packets(), len(segs))
		}
		rx.co.Group()
		rx.co.Reset()
	}
}

// BenchmarkTransmitSplit measures route + split of a 64 KiB TSO
// superpacket into GSO trains (headers built, payload not copied), for a
// flannel peer (complete checksums) and a Tulle peer (partial).
func BenchmarkTransmitSplit(b *testing.B) {
	benchPeerModes(b, onePeer, peerB, func(b *testing.B, be *Backend, tb *table, partial bool) {
		h, pkt := tcpSuper("198.18.1.5", "198.18.2.7", 45*1420, 1420, 1)
		benchTransmitSplit(b, &be.workers[0].tx, tb, h, pkt)
	})
}

// BenchmarkReceiveAcceptAndCoalesce measures the trust checks and GRO
// coalescing of 45 TCP segments into one superpacket (no copy), per
// segment, with complete checksums (verified) and partial ones (trusted).
func BenchmarkReceiveAcceptAndCoalesce(b *testing.B) {
	benchPeerModes(b, onePeer, peerB, func(b *testing.B, be *Backend, tb *table, partial bool) {
		var segs [][]byte
		for i := range 45 {
			_, p := tcpSuper("198.18.2.7", "198.18.1.5", 1420, 1420, 1+uint32(i*1420))
			p[33] = 0x10 // ACK
			if partial {
				setMark(p)
			} else {
				binary.BigEndian.PutUint16(p[36:], 0)
				binary.BigEndian.PutUint16(p[36:], proto.Checksum(p[20:], uint64(proto.PseudoHeaderSum(proto.IPv4Src(p), proto.IPv4Dst(p), proto.ProtoTCP, len(p)-20))))
			}
			segs = append(segs, p)
		}
		benchAcceptAndCoalesce(b, &be.workers[0].rx, tb, segs, 52)
	})
}

// FuzzReceiveTrustBoundary feeds arbitrary datagrams from a peer, from a
// stranger and from a GRO train through the receive path: it must never
// panic, and whatever it accepts must come from the sender's lease, go to
// ours, and be a well-formed IPv4 packet with its TTL decremented.
func FuzzReceiveTrustBoundary(f *testing.F) {
	f.Add(ipv4("198.18.2.7", "198.18.1.5", 100, 64, false), uint8(0), uint16(0))
	f.Add(ipv4("198.18.3.7", "198.18.1.5", 60, 2, true), uint8(1), uint16(30))
	f.Add([]byte{0x45, 0, 0, 20, 0, 0, 0, 0, 1, 17, 0, 0, 198, 18, 2, 1, 198, 18, 1, 1}, uint8(2), uint16(20))
	b := newPureBackend(f, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2"), added("198.18.3.0/24", "192.0.2.3")})
	b.table.Load().lookup(addr32("198.18.2.1")).partialCsum.Store(true)
	fuzzReceive(f, b, true, func(t *testing.T, tb *table, src netip.Addr, pkt []byte, p *peer, partial bool) bool {
		total, err := proto.CheckIPv4(pkt)
		if err != nil || total != len(pkt) || !proto.IPv4HeaderChecksumValid(pkt) || marked(pkt) {
			t.Fatalf("accepted a malformed or still marked packet: %v", err)
		}
		if partial && !partialTransport(pkt) {
			t.Fatal("a packet that cannot carry a partial checksum was taken as partial")
		}
		if q := tb.lookup(proto.IPv4SrcUint32(pkt)); q == nil || !q.sentFrom(src) {
			t.Fatalf("accepted inner source %v from %v", proto.IPv4SrcAddr(pkt), src)
		}
		if !tb.isOwn(proto.IPv4DstUint32(pkt)) {
			t.Fatalf("accepted foreign destination %v", proto.IPv4DstAddr(pkt))
		}
		return true
	})
}

// fuzzReceive fuzzes the receive path of b's first worker: an input is a
// datagram, or a GRO train of seg-byte ones (seg 0 or past the end: one),
// of at most 4 KiB (which keeps each run, and minimizing, fast; size
// limits are tested elsewhere), from 192.0.2.2 (B), 192.0.2.3 (C) or
// 192.0.2.99 (a stranger) by who. inBuf: the datagrams are read where the
// RX loop's receive puts them (in place in its buffer); otherwise each is
// copied to a slice of its own length, as the fuzzer's bounds checks then
// catch any read past it. check fails t on a packet that accept must not
// have let through (p its peer) and says whether to coalesce it.
func fuzzReceive(f *testing.F, b *Backend, inBuf bool, check func(t *testing.T, tb *table, src netip.Addr, pkt []byte, p *peer, partial bool) bool) {
	senders := []netip.Addr{netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("192.0.2.3"), netip.MustParseAddr("192.0.2.99")}
	f.Fuzz(func(t *testing.T, data []byte, who uint8, seg uint16) {
		if len(data) > 4096 {
			data = data[:4096]
		}
		rx := &b.workers[0].rx
		tb := b.table.Load()
		src := senders[int(who)%len(senders)]
		if inBuf {
			m := &rx.msgs[0]
			m.N = copy(m.Buf, data)
			m.SegSize = int(seg)
			data = m.Buf[:m.N]
		}
		n := len(data)
		step := int(seg)
		if step <= 0 || step > n {
			step = n
		}
		for off := 0; off < n; off += step {
			pkt := data[off:min(off+step, n)]
			if !inBuf {
				pkt = append([]byte(nil), pkt...)
			}
			p, partial := rx.accept(tb, src, pkt)
			if p != nil && check(t, tb, src, pkt, p, partial) {
				coalesce(rx, pkt, partial)
			}
		}
		if rx.co.Pending() {
			rx.co.Group()
			rx.co.Reset()
		}
		rx.run = peerRun{}
		rx.drops = batchCounts{}
	})
}
