package udp

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"unsafe"

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

// txBatch places pkts in the TX loop's read buffers as a TUN read would.
func txBatch(tx *txLoop, pkts ...[]byte) int {
	for i, p := range pkts {
		tx.sizes[i] = copy(tx.bufs[i][headroom:], p)
	}
	return len(pkts)
}

// route runs route+add over the batch, as forward does before sending.
func routeBatch(tx *txLoop, t *table, n int) {
	tx.msgs, tx.meta, tx.used = tx.msgs[:0], tx.meta[:0], 0
	for i := 0; i < n; i++ {
		pos := headroom + i*tx.stride
		if p, pkt, alone := tx.route(t, tx.arena[pos:pos+tx.sizes[i]]); p != nil {
			tx.add(p, pos, pkt, alone)
		}
	}
}

func twoPeers(t *testing.T) *Backend {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2"), added("198.18.3.0/24", "192.0.2.3")})
	return b
}

func TestFullSizePacketsToOnePeerAreSentAsOneGSOTrainInPlace(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	mtu := tx.stride
	var pkts [][]byte
	for i := 0; i < 10; i++ {
		pkts = append(pkts, ipv4("198.18.1.5", "198.18.2.7", mtu, 64, true))
	}
	pkts = append(pkts, ipv4("198.18.1.5", "198.18.2.7", 300, 64, true)) // the short tail
	routeBatch(tx, b.table.Load(), txBatch(tx, pkts...))
	if len(tx.msgs) != 1 {
		t.Fatalf("%d messages, want 1 train", len(tx.msgs))
	}
	m := tx.msgs[0]
	if m.SegSize != mtu || len(m.Buf) != 10*mtu+300 || tx.meta[0].packets != 11 {
		t.Errorf("train: segsize %d, %d bytes, %d packets; want %d, %d, 11", m.SegSize, len(m.Buf), tx.meta[0].packets, mtu, 10*mtu+300)
	}
	if unsafe.SliceData(m.Buf) != &tx.arena[headroom] || tx.used != 0 {
		t.Error("full-size train was copied instead of sent from the read buffers")
	}
	if m.Addr != netip.MustParseAddrPort("192.0.2.2:8285") {
		t.Errorf("addr %v", m.Addr)
	}
	for i := 0; i < 11; i++ {
		seg := m.Buf[i*mtu : min((i+1)*mtu, len(m.Buf))]
		if proto.IPv4TTL(seg) != 63 || !proto.IPv4HeaderChecksumValid(seg) {
			t.Fatalf("segment %d: ttl %d checksum valid %v", i, proto.IPv4TTL(seg), proto.IPv4HeaderChecksumValid(seg))
		}
	}
}

func TestSmallPacketsAreCopiedIntoOneContiguousTrain(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	a := ipv4("198.18.1.5", "198.18.2.7", 60, 64, false)
	routeBatch(tx, b.table.Load(), txBatch(tx, a, a, a))
	if len(tx.msgs) != 1 || tx.msgs[0].SegSize != 60 || len(tx.msgs[0].Buf) != 180 {
		t.Fatalf("got %d messages (first: segsize %d, %d bytes), want one train of 3x60", len(tx.msgs), tx.msgs[0].SegSize, len(tx.msgs[0].Buf))
	}
	want := ipv4("198.18.1.5", "198.18.2.7", 60, 63, false)
	for i := 0; i < 3; i++ {
		if string(tx.msgs[0].Buf[i*60:(i+1)*60]) != string(want) {
			t.Fatalf("segment %d differs from the packet with TTL 63", i)
		}
	}
}

func TestTrainsBreakOnPeerChangeShortSegmentAndLimits(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	S := tx.stride
	toA := func(n int) []byte { return ipv4("198.18.1.5", "198.18.2.7", n, 64, true) }
	toB := func(n int) []byte { return ipv4("198.18.1.5", "198.18.3.7", n, 64, true) }
	routeBatch(tx, b.table.Load(), txBatch(tx, toA(S), toA(S), toA(100), toA(100), toB(S), toA(S), toA(S+0)))
	var got [][2]int // (packets, segsize)
	for k, m := range tx.msgs {
		got = append(got, [2]int{tx.meta[k].packets, m.SegSize})
	}
	want := [][2]int{{3, S}, {1, 0}, {1, 0}, {2, S}}
	if len(got) != len(want) {
		t.Fatalf("trains %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("trains %v, want %v", got, want)
		}
	}

	tx.maxSegs = 4
	var pkts [][]byte
	for i := 0; i < 10; i++ {
		pkts = append(pkts, toA(S))
	}
	routeBatch(tx, b.table.Load(), txBatch(tx, pkts...))
	if len(tx.msgs) != 3 || tx.meta[0].packets != 4 || tx.meta[2].packets != 2 {
		t.Fatalf("with 4 segments max: %d trains", len(tx.msgs))
	}
	tx.maxSegs = 128
	pkts = pkts[:0]
	for i := 0; i < 100; i++ {
		pkts = append(pkts, toA(S))
	}
	routeBatch(tx, b.table.Load(), txBatch(tx, pkts...))
	for k, m := range tx.msgs {
		if len(m.Buf) > maxGSOPayload {
			t.Fatalf("train %d carries %d bytes, more than %d", k, len(m.Buf), maxGSOPayload)
		}
	}
	if tx.meta[0].packets != maxGSOPayload/S {
		t.Errorf("first train %d packets, want %d", tx.meta[0].packets, maxGSOPayload/S)
	}
}

func TestTransmitDropsAreCountedByReasonWithICMPErrors(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	tb := b.table.Load()
	tb.lookup(addr32("198.18.3.1")).innerMTU.Store(1000)

	v6 := make([]byte, 60)
	v6[0] = 0x60
	routeBatch(tx, tb, txBatch(tx,
		ipv4("198.18.1.5", "198.18.2.7", 100, 1, false),    // ttl_expired
		ipv4("198.18.1.5", "198.18.9.7", 100, 64, false),   // no_route: nobody's subnet -> host unreachable
		ipv4("198.18.1.5", "198.51.100.7", 100, 64, false), // no_route: outside the network -> net unreachable
		ipv4("198.18.1.5", "198.18.1.7", 100, 64, false),   // no_route: own lease
		v6,                      // no_route: IPv6
		[]byte{0x45, 0, 0, 200}, // malformed
		ipv4("198.18.1.5", "198.18.3.7", 1200, 64, true),  // oversize, DF -> frag needed
		ipv4("198.18.1.5", "198.18.3.7", 1200, 64, false), // oversize, no DF -> sent alone
		ipv4("198.18.1.5", "198.18.3.7", 900, 64, false),
	))
	d := tx.drops
	if d[dropTTLExpired] != 1 || d[dropNoRoute] != 4 || d[dropMalformed] != 1 || d[dropOversize] != 1 {
		t.Errorf("drops %v", d)
	}
	if len(tx.msgs) != 2 || tx.meta[0].packets != 1 || !tx.meta[0].closed || len(tx.msgs[0].Buf) != 1200 {
		t.Errorf("non-DF oversize packet must go alone: %d messages", len(tx.msgs))
	}
	if len(tx.icmpOut) != 4 {
		t.Fatalf("%d ICMP errors queued, want 4 (3 unreachable + 1 frag needed)", len(tx.icmpOut))
	}
	type tc struct{ typ, code uint8 }
	want := []tc{{3, 1}, {3, 0}, {3, 1}, {3, 4}}
	for i, buf := range tx.icmpOut {
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
	routeBatch(tx, b.table.Load(), txBatch(tx, pkts...))
	if len(tx.icmpOut) != 2 || tx.drops[dropNoRoute] != 6 {
		t.Errorf("%d ICMP errors for 6 drops with 2 tokens; drops %v", len(tx.icmpOut), tx.drops)
	}
}

func TestReceiveChecksTrustAndCountsByReason(t *testing.T) {
	b := twoPeers(t)
	rx := &b.workers[0].rx
	tb := b.table.Load()
	peerA := addr32("192.0.2.2")
	stranger := addr32("192.0.2.99")

	truncated := ipv4("198.18.2.7", "198.18.1.5", 100, 64, false)[:80]
	trailing := append(ipv4("198.18.2.7", "198.18.1.5", 100, 64, false), 0)
	badSum := ipv4("198.18.2.7", "198.18.1.5", 100, 64, false)
	badSum[10] ^= 0xff
	cases := []struct {
		name   string
		src    uint32
		pkt    []byte
		reason dropReason // numDropReasons = accepted
	}{
		{"valid", peerA, ipv4("198.18.2.7", "198.18.1.5", 100, 64, false), numDropReasons},
		{"from a stranger", stranger, ipv4("198.18.2.7", "198.18.1.5", 100, 64, false), dropUnknownSender},
		{"garbage from a stranger", stranger, []byte{1, 2, 3}, dropUnknownSender},
		{"spoofed source (another peer's subnet)", peerA, ipv4("198.18.3.7", "198.18.1.5", 100, 64, false), dropSpoofedSource},
		{"spoofed source (outside the network)", peerA, ipv4("198.51.100.1", "198.18.1.5", 100, 64, false), dropSpoofedSource},
		{"foreign destination", peerA, ipv4("198.18.2.7", "198.18.3.5", 100, 64, false), dropForeignDestination},
		{"malformed", peerA, []byte{0x45, 0, 0}, dropMalformed},
		{"IPv6", peerA, append([]byte{0x60}, make([]byte, 59)...), dropMalformed},
		{"trailing bytes", peerA, trailing, dropMalformed},
		{"bad header checksum", peerA, badSum, dropMalformed},
		{"truncated inner packet", peerA, truncated, dropTruncated},
		{"TTL 1", peerA, ipv4("198.18.2.7", "198.18.1.5", 100, 1, false), dropTTLExpired},
	}
	for _, c := range cases {
		rx.drops = batchCounts{}
		rx.out = rx.out[:0]
		pkt := append([]byte(nil), c.pkt...)
		if err := rx.accept(tb, c.src, pkt); err != nil {
			t.Fatal(err)
		}
		if c.reason == numDropReasons {
			if len(rx.out) != 1 || rx.drops != (batchCounts{}) {
				t.Errorf("%s: not accepted (drops %v)", c.name, rx.drops)
				continue
			}
			got := rx.out[0][headroom:]
			if proto.IPv4TTL(got) != 63 || !proto.IPv4HeaderChecksumValid(got) || len(got) != len(c.pkt) {
				t.Errorf("%s: delivered ttl %d, checksum valid %v, %d bytes", c.name, proto.IPv4TTL(got), proto.IPv4HeaderChecksumValid(got), len(got))
			}
			continue
		}
		if len(rx.out) != 0 || rx.drops[c.reason] != 1 {
			t.Errorf("%s: want dropped as %v; delivered %d, drops %v", c.name, c.reason, len(rx.out), rx.drops)
		}
	}
}

func TestPathDoesNotAllocate(t *testing.T) {
	b := twoPeers(t)
	tx := &b.workers[0].tx
	rx := &b.workers[0].rx
	tb := b.table.Load()
	var pkts [][]byte
	for i := 0; i < 64; i++ {
		pkts = append(pkts, ipv4("198.18.1.5", "198.18.2.7", tx.stride, 255, true))
	}
	in := ipv4("198.18.2.7", "198.18.1.5", 1400, 255, false)
	allocs := testing.AllocsPerRun(200, func() {
		routeBatch(tx, tb, txBatch(tx, pkts...))
		tx.drops.flush(tx.stats)
		rx.out = rx.out[:0]
		for i := 0; i < 32; i++ {
			in[8] = 255
			binary.BigEndian.PutUint16(in[10:], 0)
			binary.BigEndian.PutUint16(in[10:], proto.IPv4HeaderChecksum(in[:20]))
			if err := rx.accept(tb, addr32("192.0.2.2"), in); err != nil {
				t.Fatal(err)
			}
		}
		rx.run.flush(rx.stats)
	})
	if allocs != 0 {
		t.Errorf("allocs per batch = %v, want 0", allocs)
	}
}

// BenchmarkTransmitGrouping measures route + GSO grouping of a 64-packet
// TSO split (in place), per batch.
func BenchmarkTransmitGrouping(b *testing.B) {
	be := newPureBackend(b, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	be.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")})
	tx := &be.workers[0].tx
	tb := be.table.Load()
	var pkts [][]byte
	for i := 0; i < 44; i++ {
		pkts = append(pkts, ipv4("198.18.1.5", "198.18.2.7", tx.stride, 255, true))
	}
	n := txBatch(tx, pkts...)
	b.ReportAllocs()
	b.SetBytes(int64(n * tx.stride))
	for b.Loop() {
		for i := 0; i < n; i++ {
			pos := headroom + i*tx.stride
			if tx.arena[pos+8] < 2 {
				tx.arena[pos+8] = 255
				binary.BigEndian.PutUint16(tx.arena[pos+10:], 0)
				binary.BigEndian.PutUint16(tx.arena[pos+10:], proto.IPv4HeaderChecksum(tx.arena[pos:pos+20]))
			}
		}
		routeBatch(tx, tb, n)
	}
}

// BenchmarkReceiveAccept measures the trust checks and the copy into a TUN
// write buffer, per packet.
func BenchmarkReceiveAccept(b *testing.B) {
	be := newPureBackend(b, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	be.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")})
	rx := &be.workers[0].rx
	tb := be.table.Load()
	in := ipv4("198.18.2.7", "198.18.1.5", 1400, 255, false)
	src := addr32("192.0.2.2")
	b.ReportAllocs()
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		if in[8] < 2 {
			in[8] = 255
			binary.BigEndian.PutUint16(in[10:], 0)
			binary.BigEndian.PutUint16(in[10:], proto.IPv4HeaderChecksum(in[:20]))
		}
		if len(rx.out) == len(rx.wbufs)-1 {
			rx.out = rx.out[:0]
		}
		if err := rx.accept(tb, src, in); err != nil {
			b.Fatal(err)
		}
	}
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
	senders := []uint32{addr32("192.0.2.2"), addr32("192.0.2.3"), addr32("192.0.2.99")}
	f.Fuzz(func(t *testing.T, data []byte, who uint8, seg uint16) {
		if len(data) > 4096 {
			data = data[:4096] // keeps each run (and minimizing) fast; size limits are tested elsewhere
		}
		rx := &b.workers[0].rx
		tb := b.table.Load()
		src := senders[int(who)%len(senders)]
		m := &rx.msgs[0]
		m.N = copy(m.Buf, data)
		m.SegSize = int(seg)
		m.Truncated = false
		m.Addr = netip.AddrPortFrom(proto.Uint32Addr(src), 8285)
		rx.out = rx.out[:0]
		// deliver without a TUN: accept each datagram as deliver splits them.
		step := m.SegSize
		if step <= 0 || step > m.N {
			step = m.N
		}
		for off := 0; off < m.N && len(rx.out) < len(rx.wbufs)-1; off += step {
			if err := rx.accept(tb, src, m.Buf[off:min(off+step, m.N)]); err != nil {
				t.Fatal(err)
			}
		}
		for _, o := range rx.out {
			pkt := o[headroom:]
			total, err := proto.CheckIPv4(pkt)
			if err != nil || total != len(pkt) || !proto.IPv4HeaderChecksumValid(pkt) {
				t.Fatalf("accepted a malformed packet: %v", err)
			}
			p := tb.lookup(proto.IPv4SrcUint32(pkt))
			if p == nil || p.public != src {
				t.Fatalf("accepted inner source %v from %v", proto.IPv4SrcAddr(pkt), proto.Uint32Addr(src))
			}
			if !tb.isOwn(proto.IPv4DstUint32(pkt)) {
				t.Fatalf("accepted foreign destination %v", proto.IPv4DstAddr(pkt))
			}
		}
		rx.out = rx.out[:0]
		rx.run = peerRun{}
		rx.drops = batchCounts{}
	})
}
