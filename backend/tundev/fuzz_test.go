//go:build linux

package tundev_test

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/proto"
)

// Bits of FuzzSplit's fix argument. Each makes the fuzzed superpacket pass
// one check of Split.Init that random bytes rarely pass, so that the fuzzer
// spends its time on splits rather than on rejections; with fix 0 the input
// is taken as it is.
const (
	fixTotalLen  = 1 << iota // IPv4 total length (IPv6 payload length) := len(data) (- 40)
	fixCsumStart             // csum_start := the IP header length
	fixGSOType               // GSO type and csum_offset from the IP protocol
)

// FuzzSplit cuts arbitrary superpackets with arbitrary virtio headers. Init
// must never panic; whatever it accepts must split into valid segments
// that carry the superpacket's payload (see resplit).
func FuzzSplit(f *testing.F) {
	add := func(h tundev.VirtioHdr, pkt []byte, fix uint8) {
		f.Add(pkt, h.Flags, h.GSOType, h.HdrLen, h.GSOSize, h.CsumStart, h.CsumOffset, fix)
	}
	// No 64 KiB seed: the fuzzer's minimizing of inputs grown from it stalls
	// the run for seconds. FuzzCoalesce re-splits merged 64 KiB groups.
	for _, c := range []struct{ payload, mss int }{
		{5*1000 + 123, 1000}, {3 * 100, 100}, {37, 8}, {1, 1}, {500, 1400},
	} {
		h, pkt := superTCP(c.payload, c.mss)
		add(h, pkt, 0)
	}
	h, pkt := superTCP(250, 64)
	pkt[33] |= tcpFIN // ACK|PSH|FIN: FIN and PSH only on the last segment
	add(h, pkt, 0)
	h, pkt = superTCP(300, 64)
	h.CsumStart, h.HdrLen = 24, 56
	add(h, withIPOptions(pkt), 0)
	for _, c := range []struct{ payload, size int }{{3000, 1200}, {99, 7}, {1472, 1472}, {2, 1}} {
		h, pkt := superUDP(c.payload, c.size)
		add(h, pkt, 0)
	}
	// A datagram whose checksum comes out 0, sent as 0xffff (RFC 768): its
	// last payload word is what its checksum would otherwise be.
	h, pkt = superUDP(40, 64)
	pseudo := pseudoSum(flowSrc.Addr(), flowDst.Addr(), 17, len(pkt)-20)
	binary.BigEndian.PutUint16(pkt[26:], 0)
	binary.BigEndian.PutUint16(pkt[66:], 0)
	binary.BigEndian.PutUint16(pkt[66:], checksum(pkt[20:], pseudo))
	binary.BigEndian.PutUint16(pkt[26:], ^checksum(nil, pseudo))
	add(h, pkt, 0)
	add(tundev.VirtioHdr{GSOSize: 3}, []byte{0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
		0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x10, 0, 0, 0, 0, 0, 0, 'a', 'b', 'c', 'd'}, fixTotalLen|fixCsumStart|fixGSOType)
	// IPv6: TSO6 and USO6, a superpacket with an extension header (refused).
	for _, c := range []struct{ payload, mss int }{{3*1000 + 7, 1000}, {37, 8}, {1, 1}} {
		h, pkt := superTCP6(c.payload, c.mss)
		add(h, pkt, 0)
	}
	h, pkt = superUDP6(2500, 1200)
	add(h, pkt, 0)
	h, pkt = superTCP6(300, 100)
	h.CsumStart = 48
	add(h, withDestOptions(pkt), 0)
	six := make([]byte, 40+20+5)
	six[0], six[6], six[40+12] = 0x60, 6, 0x50
	add(tundev.VirtioHdr{GSOSize: 2}, six, fixTotalLen|fixCsumStart|fixGSOType)

	f.Fuzz(func(t *testing.T, data []byte, flags, gsoType uint8, hdrLen, gsoSize, csumStart, csumOffset uint16, fix uint8) {
		if len(data) > proto.MaxIPv6Len {
			data = data[:proto.MaxIPv6Len] // no packet is longer
		}
		pkt := bytes.Clone(data) // the fuzz input must not be modified
		h := tundev.VirtioHdr{Flags: flags, GSOType: gsoType, HdrLen: hdrLen, GSOSize: gsoSize,
			CsumStart: csumStart, CsumOffset: csumOffset}
		v6 := len(pkt) >= proto.IPv6HeaderLen && pkt[0]>>4 == 6
		if fix&fixTotalLen != 0 && len(pkt) >= 6 {
			if v6 {
				binary.BigEndian.PutUint16(pkt[4:], uint16(len(pkt)-40))
			} else {
				binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
			}
		}
		if fix&fixCsumStart != 0 && len(pkt) >= 1 {
			h.CsumStart = uint16(proto.IPv4HeaderLength(pkt))
			if v6 {
				h.CsumStart = proto.IPv6HeaderLen
			}
		}
		if fix&fixGSOType != 0 && len(pkt) >= proto.IPv4HeaderLen {
			protocol, tso := proto.IPv4Protocol(pkt), uint8(tundev.GSOTCPv4)
			if v6 {
				protocol, tso = pkt[6], tundev.GSOTCPv6
			}
			switch protocol {
			case proto.ProtoTCP:
				h.GSOType, h.CsumOffset = tso, 16
			case proto.ProtoUDP:
				h.GSOType, h.CsumOffset = tundev.GSOUDPL4, 6
			}
		}
		before := bytes.Clone(pkt)
		var s tundev.Split
		if err := s.Init(h, pkt); err != nil {
			if !bytes.Equal(pkt, before) {
				t.Fatal("Init changed the superpacket it rejected")
			}
			return
		}
		resplit(t, &s, pkt)
	})
}

// resplit cuts pkt, the superpacket s.Init accepted, into its segments with
// complete checksums (Segment partial=false) and returns them. It checks
// that Segment writes no more than HeaderLen bytes of headers, returns the
// payload as a slice of pkt and leaves pkt unchanged, and that each segment
// is:
//   - valid IPv4: header checksum right, total length = its length, the IP
//     header the superpacket's but for total length, checksum and ID (the
//     superpacket's plus the segment's index, as the kernel's TSO numbers
//     them); or valid IPv6: payload length right, the fixed header the
//     superpacket's but for the payload length;
//   - valid TCP or UDP: checksum right (proto.Sum over the pseudo-header,
//     cross-checked with parseIPv4's independent sum); UDP: length right,
//     checksum never 0 (that means none); TCP: sequence number the
//     superpacket's advanced by the payload of the segments before it,
//     FIN and PSH only on the last segment, every other header byte the
//     superpacket's (ports, ACK, other flags, window, options);
//   - the same bytes when cut with partial=true and completed with
//     tundev.CompleteChecksum, whose checksum field held the pseudo-header
//     sum for the segment's length;
//
// and that the payloads, concatenated, are the superpacket's payload.
func resplit(t *testing.T, s *tundev.Split, pkt []byte) [][]byte {
	t.Helper()
	before := bytes.Clone(pkt)
	v6 := pkt[0]>>4 == 6
	ihl, protocol := ipHeader(pkt)
	tcp := protocol == proto.ProtoTCP
	hl, n := s.HeaderLen(), s.Segments()
	size := s.SegmentSize() - hl
	wantHL, csumAt := ihl+8, 6
	if tcp {
		wantHL, csumAt = ihl+int(pkt[ihl+12]>>4)*4, 16
	}
	if hl != wantHL || size <= 0 || n < 1 || n != (len(pkt)-hl+size-1)/size || !bytes.Equal(s.Header(), pkt[:hl]) {
		t.Fatalf("split of a %d-byte superpacket (IP header %d, protocol %d): %d segments, header %d (want %d), segment size %d",
			len(pkt), ihl, protocol, n, hl, wantHL, s.SegmentSize())
	}
	id0 := binary.BigEndian.Uint16(pkt[4:])
	seq0 := binary.BigEndian.Uint32(pkt[ihl+4:])
	const guard = 0xa5
	segs := make([][]byte, 0, n)
	off := hl // of segment i's payload in pkt
	for i := range n {
		hdr := bytes.Repeat([]byte{guard}, hl+8)
		payload := s.Segment(i, hdr, false)
		if bytes.Count(hdr[hl:], []byte{guard}) != 8 {
			t.Fatalf("segment %d: Segment wrote beyond HeaderLen (%d)", i, hl)
		}
		if want := min(size, len(pkt)-off); len(payload) != want || want <= 0 || &payload[0] != &pkt[off] {
			t.Fatalf("segment %d: payload of %d bytes, want pkt[%d:%d]", i, len(payload), off, off+want)
		}
		seg := append(hdr[:hl:hl], payload...)
		if v6 {
			if plen := binary.BigEndian.Uint16(seg[4:]); int(plen) != len(seg)-40 {
				t.Fatalf("segment %d: IPv6 payload length %d for %d bytes", i, plen, len(seg))
			}
			if d := diffExcept(seg[:ihl], pkt[:ihl], 4, 6); d >= 0 {
				t.Fatalf("segment %d: IPv6 header byte %d is %#x, superpacket's %#x", i, d, seg[d], pkt[d])
			}
		} else {
			if total := proto.IPv4TotalLength(seg); total != len(seg) || !proto.IPv4HeaderChecksumValid(seg) {
				t.Fatalf("segment %d: IPv4 total length %d for %d bytes, header checksum valid %v",
					i, total, len(seg), proto.IPv4HeaderChecksumValid(seg))
			}
			if d := diffExcept(seg[:ihl], pkt[:ihl], 2, 6, 10, 12); d >= 0 {
				t.Fatalf("segment %d: IP header byte %d is %#x, superpacket's %#x", i, d, seg[d], pkt[d])
			}
			if id := binary.BigEndian.Uint16(seg[4:]); id != id0+uint16(i) {
				t.Fatalf("segment %d: IP ID %d, want %d", i, id, id0+uint16(i))
			}
		}
		l4 := seg[ihl:]
		if sum := proto.Sum(l4, uint64(pseudoOf(seg, len(l4)))); sum != 0xffff {
			t.Fatalf("segment %d: transport checksum wrong (sum %#x)", i, sum)
		}
		if _, err := parseIP(seg); err != nil {
			t.Fatalf("segment %d: %v", i, err)
		}
		if tcp {
			wantFlags := pkt[ihl+13]
			if i != n-1 {
				wantFlags &^= tcpFIN | tcpPSH
			}
			if seq, want := binary.BigEndian.Uint32(l4[4:]), seq0+uint32(off-hl); seq != want {
				t.Fatalf("segment %d: seq %d, want %d", i, seq, want)
			}
			if l4[13] != wantFlags {
				t.Fatalf("segment %d of %d: TCP flags %#x, want %#x", i, n, l4[13], wantFlags)
			}
			if d := diffExcept(seg[ihl:hl], pkt[ihl:hl], 4, 8, 13, 14, 16, 18); d >= 0 {
				t.Fatalf("segment %d: TCP header byte %d is %#x, superpacket's %#x", i, d, l4[d], pkt[ihl+d])
			}
		} else {
			if ulen := binary.BigEndian.Uint16(l4[4:]); int(ulen) != len(l4) {
				t.Fatalf("segment %d: UDP length %d, want %d", i, ulen, len(l4))
			}
			if l4[6] == 0 && l4[7] == 0 {
				t.Fatalf("segment %d: UDP checksum 0 (none)", i)
			}
			if d := diffExcept(seg[ihl:hl], pkt[ihl:hl], 4, 8); d >= 0 {
				t.Fatalf("segment %d: UDP header byte %d is %#x, superpacket's %#x", i, d, l4[d], pkt[ihl+d])
			}
		}

		ph := make([]byte, hl)
		pp := s.Segment(i, ph, true)
		if len(pp) != len(payload) || &pp[0] != &payload[0] {
			t.Fatalf("segment %d: partial and complete cuts return different payloads", i)
		}
		if got, want := binary.BigEndian.Uint16(ph[ihl+csumAt:]), pseudoOf(seg, len(l4)); got != want {
			t.Fatalf("segment %d, partial: checksum field %#x, want the pseudo-header sum %#x", i, got, want)
		}
		pseg := append(ph, pp...)
		if err := tundev.CompleteChecksum(pseg, ihl, csumAt); err != nil {
			t.Fatalf("segment %d, partial: %v", i, err)
		}
		if d := diffExcept(pseg, seg); d >= 0 {
			t.Fatalf("segment %d: partial cut, completed, differs from the complete cut at byte %d", i, d)
		}
		segs = append(segs, seg)
		off += len(payload)
	}
	if off != len(pkt) {
		t.Fatalf("%d segments carry %d of %d payload bytes", n, off-hl, len(pkt)-hl)
	}
	if !bytes.Equal(pkt, before) {
		t.Fatal("Segment changed the superpacket")
	}
	return segs
}

// ipHeader returns the IP header length and the transport protocol of
// the IPv4 packet pkt, or of the IPv6 packet pkt without extension headers.
func ipHeader(pkt []byte) (ihl int, protocol uint8) {
	if pkt[0]>>4 == 6 {
		return proto.IPv6HeaderLen, pkt[6]
	}
	return proto.IPv4HeaderLength(pkt), proto.IPv4Protocol(pkt)
}

// pseudoOf is the pseudo-header sum of pkt (IPv4, or IPv6 without
// extension headers) for a transport of length bytes.
func pseudoOf(pkt []byte, length int) uint16 {
	if pkt[0]>>4 == 6 {
		return proto.PseudoHeaderSumIPv6(proto.IPv6Src(pkt), proto.IPv6Dst(pkt), pkt[6], length)
	}
	return proto.PseudoHeaderSum(proto.IPv4Src(pkt), proto.IPv4Dst(pkt), pkt[9], length)
}

// diffExcept returns the first offset at which a and b differ outside the
// half-open ranges skip (pairs of offsets), len of the shorter if one is a
// prefix of the other, or -1 if they are equal.
func diffExcept(a, b []byte, skip ...int) int {
next:
	for i := range min(len(a), len(b)) {
		for k := 0; k+1 < len(skip); k += 2 {
			if i >= skip[k] && i < skip[k+1] {
				continue next
			}
		}
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// superUDP builds what a TUN with USO hands over: a UDP superpacket with
// the pseudo-header sum in the checksum field, and its virtio header.
func superUDP(payload, size int) (tundev.VirtioHdr, []byte) {
	return superUDPOf(flowSrc, flowDst, 77, payload, size)
}

// superTCPOf is a TSO superpacket of flow src -> dst (IPv4 or IPv6): the
// pseudo-header sum in the checksum field, and its virtio header.
func superTCPOf(src, dst netip.AddrPort, payload, mss int) (tundev.VirtioHdr, []byte) {
	data := make([]byte, payload)
	for i := range data {
		data[i] = byte(i * 31)
	}
	ihl := ipHeaderLen(src.Addr())
	pkt := buildTCP(make([]byte, ihl+32+payload), 0, src, dst, 7, 9, tcpACK|tcpPSH, tsOpts, data)
	binary.BigEndian.PutUint16(pkt[ihl+16:], ^checksum(nil, pseudoSum(src.Addr(), dst.Addr(), 6, len(pkt)-ihl)))
	gso := uint8(tundev.GSOTCPv4)
	if src.Addr().Is6() {
		gso = tundev.GSOTCPv6
	}
	return tundev.VirtioHdr{Flags: tundev.VirtioNeedsCsum, GSOType: gso, HdrLen: uint16(ihl + 32),
		GSOSize: uint16(mss), CsumStart: uint16(ihl), CsumOffset: 16}, pkt
}

// superUDPOf is a USO superpacket of flow src -> dst (IPv4 or IPv6; id
// the IPv4 ID).
func superUDPOf(src, dst netip.AddrPort, id uint16, payload, size int) (tundev.VirtioHdr, []byte) {
	data := make([]byte, payload)
	for i := range data {
		data[i] = byte(i*13 + 5)
	}
	ihl := ipHeaderLen(src.Addr())
	pkt := buildUDP(make([]byte, ihl+8+payload), 0, src, dst, data, id)
	binary.BigEndian.PutUint16(pkt[ihl+6:], ^checksum(nil, pseudoSum(src.Addr(), dst.Addr(), 17, len(pkt)-ihl)))
	return tundev.VirtioHdr{Flags: tundev.VirtioNeedsCsum, GSOType: tundev.GSOUDPL4, HdrLen: uint16(ihl + 8),
		GSOSize: uint16(size), CsumStart: uint16(ihl), CsumOffset: 6}, pkt
}

// withIPOptions returns a copy of the IPv4 packet pkt (20-byte header) with
// four bytes of IP options (NOP NOP NOP EOL) and the header checksum fixed;
// the transport checksum does not cover them.
func withIPOptions(pkt []byte) []byte {
	p := make([]byte, len(pkt)+4)
	copy(p, pkt[:20])
	copy(p[20:], []byte{1, 1, 1, 0})
	copy(p[24:], pkt[20:])
	p[0] = 0x46
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	p[10], p[11] = 0, 0
	binary.BigEndian.PutUint16(p[10:], checksum(p[:24], 0))
	return p
}

// ---- FuzzCoalesce ----

// A fuzzPacket is one packet FuzzCoalesce offers to the Coalescer.
type fuzzPacket struct {
	buf     []byte // handed to Add (Group patches the headers of a group's first packet)
	orig    []byte // buf as generated
	partial bool   // added as partial: the checksum field holds the pseudo-header sum
}

// fuzzBytes hands out the fuzz input byte by byte, zeros once it is used up.
type fuzzBytes []byte

func (b *fuzzBytes) byte() byte {
	if len(*b) == 0 {
		return 0
	}
	v := (*b)[0]
	*b = (*b)[1:]
	return v
}

func (b *fuzzBytes) u16() uint16 { return uint16(b.byte())<<8 | uint16(b.byte()) }

// FuzzCoalesce's input: two bytes each for the segment size of flows 0
// and 1 (1 + n%1460; the top bit of the first makes every flow IPv6),
// then steps. A step is an op byte,
//
//	bit 0    flow: source port 40000 (TCP with timestamps) or 40001 (no options)
//	bit 1    UDP instead of TCP
//	bit 2    a run: the next byte is the number of further packets
//	bit 3    partial checksums (where a receiver would take them)
//	bits 4-7 what to do to the step's first packet (mut* below; < mutLength: nothing)
//
// followed by the bytes the mutation takes. Packets of a flow are its next
// segment (full size, in sequence, ACK only, checksums complete, the IP ID
// incremented) unless mutated.
const (
	mutLength    = 6 + iota // payload length u16 % (2*size+1)
	mutSeq                  // TCP: sequence number moved by int8(byte), the flow goes on from there
	mutFlags                // TCP: flags byte; UDP: no checksum (0)
	mutPSH                  // TCP: ACK|PSH; UDP: half the size
	mutFIN                  // TCP: ACK|FIN; UDP: one byte more than the size
	mutBadSum               // transport byte u16 % len XOR (byte|1), checksum left wrong
	mutHeader               // IP/transport header byte byte % len XOR (byte|1), checksums recomputed
	mutRaw                  // any byte u16 % len XOR (byte|1), nothing recomputed
	mutTotalLen             // cut or padded to u16 % (len+16) bytes, IP length unchanged
	mutIPOptions            // 4 bytes of IP options (IHL 6); IPv6: a destination options header
)

// maxFuzzPackets bounds one run of FuzzCoalesce (a group holds at most
// tundev.MaxCoalesce = 128 packets).
const maxFuzzPackets = 400

// fuzzPackets derives FuzzCoalesce's packets from data.
func fuzzPackets(data []byte) []*fuzzPacket {
	r := fuzzBytes(data)
	first := r.u16()
	v6 := first&0x8000 != 0
	mss := [2]int{1 + int(first&0x7fff)%1460, 1 + int(r.u16())%1460}
	flowFrom, flowTo, ihl := flowSrc, flowDst, 20
	if v6 {
		flowFrom, flowTo, ihl = flowSrc6, flowDst6, 40
	}
	type flowState struct {
		seq uint32
		id  uint16
	}
	flows := [2][2]flowState{{{seq: 1000, id: 1}, {seq: 0xfffff000, id: 0xfff0}}, {{id: 100}, {id: 200}}}
	var pkts []*fuzzPacket
	for len(r) > 0 && len(pkts) < maxFuzzPackets {
		op := r.byte()
		fi, udp, partial, mut := int(op&1), op&2 != 0, op&8 != 0, op>>4
		run := 1
		if op&4 != 0 {
			run += int(r.byte())
		}
		for k := 0; k < run && len(pkts) < maxFuzzPackets; k++ {
			m := mut
			if k > 0 {
				m = 0
			}
			fl := &flows[b2i(udp)][fi]
			src := netip.AddrPortFrom(flowFrom.Addr(), flowFrom.Port()+uint16(fi))
			opts := tsOpts // TCP options: timestamps on flow 0, none on flow 1
			if fi == 1 {
				opts = nil
			}
			size, flags, seq, noSum := mss[fi], byte(tcpACK), fl.seq, false
			switch m {
			case mutLength:
				size = int(r.u16()) % (2*mss[fi] + 1)
			case mutSeq:
				seq += uint32(int32(int8(r.byte())))
			case mutFlags:
				if udp {
					noSum = true
				} else {
					flags = r.byte()
				}
			case mutPSH:
				if udp {
					size /= 2
				} else {
					flags |= tcpPSH
				}
			case mutFIN:
				if udp {
					size++
				} else {
					flags |= tcpFIN
				}
			}
			payload := make([]byte, size)
			for i := range payload {
				payload[i] = byte(len(pkts)*37 + i*7) // distinct per packet: a misplaced payload shows
			}
			var pkt []byte
			if udp {
				pkt = buildUDP(make([]byte, ihl+8+size), 0, src, flowTo, payload, fl.id)
				if noSum {
					pkt[ihl+6], pkt[ihl+7] = 0, 0
				}
			} else {
				pkt = buildTCP(make([]byte, ihl+20+len(opts)+size), 0, src, flowTo, seq, 555, flags, opts, payload)
				if !v6 {
					binary.BigEndian.PutUint16(pkt[4:], fl.id)
					refreshChecksums(pkt, false)
				}
				fl.seq = seq + uint32(size)
			}
			fl.id++
			switch m {
			case mutBadSum:
				l4 := pkt[ihl:]
				l4[int(r.u16())%len(l4)] ^= r.byte() | 1
			case mutHeader:
				hl := ihl + 20 + len(opts)
				if udp {
					hl = ihl + 8
				}
				pkt[int(r.byte())%hl] ^= r.byte() | 1
				refreshChecksums(pkt, true)
			case mutRaw:
				pkt[int(r.u16())%len(pkt)] ^= r.byte() | 1
			case mutTotalLen:
				if n := int(r.u16()) % (len(pkt) + 16); n <= len(pkt) {
					pkt = pkt[:n]
				} else {
					pkt = append(pkt, make([]byte, n-len(pkt))...)
				}
			case mutIPOptions:
				if v6 {
					pkt = withDestOptions(pkt)
				} else {
					pkt = withIPOptions(pkt)
				}
			}
			p := &fuzzPacket{buf: pkt, partial: partial && takesPartial(pkt)}
			if p.partial {
				ihl, _ := ipHeader(pkt)
				binary.BigEndian.PutUint16(pkt[ihl+csumField(pkt):], pseudoOf(pkt, len(pkt)-ihl))
			}
			p.orig = bytes.Clone(pkt)
			pkts = append(pkts, p)
		}
	}
	return pkts
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// csumField is the offset of the checksum field in pkt's TCP or UDP header.
func csumField(pkt []byte) int {
	if _, protocol := ipHeader(pkt); protocol == proto.ProtoUDP {
		return 6
	}
	return 16
}

// takesPartial reports whether a receiver would take pkt with a partial
// checksum: what backend/udp checks before it passes partial to Add (a
// well-formed IPv4 packet of exactly its total length, header checksum
// right, unfragmented TCP or UDP with room for the transport header; or an
// IPv6 packet of exactly its length with TCP or UDP right after the fixed
// header, with room for it).
func takesPartial(pkt []byte) bool {
	if len(pkt) > 0 && pkt[0]>>4 == 6 {
		total, err := proto.CheckIPv6(pkt)
		if err != nil || total != len(pkt) {
			return false
		}
		switch pkt[6] {
		case proto.ProtoTCP:
			return len(pkt) >= 40+20
		case proto.ProtoUDP:
			return len(pkt) >= 40+8
		}
		return false
	}
	total, err := proto.CheckIPv4(pkt)
	if err != nil || total != len(pkt) || !proto.IPv4HeaderChecksumValid(pkt) || pkt[6]&0x3f != 0 || pkt[7] != 0 {
		return false
	}
	ihl := proto.IPv4HeaderLength(pkt)
	switch pkt[9] {
	case proto.ProtoTCP:
		return len(pkt) >= ihl+20
	case proto.ProtoUDP:
		return len(pkt) >= ihl+8
	}
	return false
}

// refreshChecksums recomputes, as a sender would, the IPv4 header checksum
// of pkt and (with transport, if pkt is still TCP or UDP with room for the
// header) its transport checksum, over what is there.
// (IPv6: the transport checksum only, if TCP or UDP follows the fixed
// header.)
func refreshChecksums(pkt []byte, transport bool) {
	var ihl int
	var protocol byte
	var src, dst netip.Addr
	if pkt[0]>>4 == 6 {
		if len(pkt) < 40 {
			return
		}
		ihl, protocol = 40, pkt[6]
		src, dst = netip.AddrFrom16(proto.IPv6Src(pkt)), netip.AddrFrom16(proto.IPv6Dst(pkt))
	} else {
		ihl = proto.IPv4HeaderLength(pkt)
		if ihl < 20 || ihl > len(pkt) {
			return
		}
		pkt[10], pkt[11] = 0, 0
		binary.BigEndian.PutUint16(pkt[10:], checksum(pkt[:ihl], 0))
		protocol = pkt[9]
		src, dst = netip.AddrFrom4(proto.IPv4Src(pkt)), netip.AddrFrom4(proto.IPv4Dst(pkt))
	}
	if !transport || (protocol != proto.ProtoTCP && protocol != proto.ProtoUDP) || len(pkt) < ihl+csumField(pkt)+2 {
		return
	}
	l4 := pkt[ihl:]
	at := csumField(pkt)
	l4[at], l4[at+1] = 0, 0
	c := checksum(l4, pseudoSum(src, dst, protocol, len(l4)))
	if c == 0 && protocol == proto.ProtoUDP {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(l4[at:], c)
}

// FuzzCoalesce offers the Coalescer sequences of TCP and UDP segments of
// two flows, mutated (see fuzzPackets), as its documented use does: if
// !Add { write Group; Reset; Add }. It tracks which packets went into
// which group and checks each group written (see checkGroup).
func FuzzCoalesce(f *testing.F) {
	seed := func(udp bool, size0, size1 int, steps ...[]byte) {
		flag := size0 & 0x8000 // IPv6
		size0 &^= 0x8000
		data := []byte{byte((size0-1)>>8) | byte(flag>>8), byte(size0 - 1), byte((size1 - 1) >> 8), byte(size1 - 1)}
		for _, s := range steps {
			data = append(data, s...)
		}
		f.Add(data, udp)
	}
	// step builds an op byte (and the run length): run packets of flow fi,
	// the first mutated with mut and the bytes args.
	step := func(fi int, udp, partial bool, mut byte, run int, args ...byte) []byte {
		op := byte(fi) | byte(b2i(udp))<<1 | byte(b2i(partial))<<3 | mut<<4
		s := []byte{op}
		if run > 1 {
			s[0] |= 4
			s = append(s, byte(run-1))
		}
		return append(s, args...)
	}
	const tcp, udp = false, true
	// Full segments, then a short one with PSH; then the next ones.
	seed(false, 1400, 1000, step(0, tcp, false, 0, 10), step(0, tcp, false, mutPSH, 1), step(0, tcp, false, 0, 3))
	// Two flows interleaved, one of them in runs.
	seed(false, 100, 200, step(0, tcp, false, 0, 3), step(1, tcp, false, 0, 3), step(0, tcp, false, 0, 1),
		step(1, tcp, false, 0, 2), step(0, tcp, false, 0, 1))
	// A corrupt segment between good ones; one whose checksum is corrupt
	// first of its group.
	seed(false, 500, 500, step(0, tcp, false, 0, 3), step(0, tcp, false, mutBadSum, 3, 0, 80, 0x55),
		step(1, tcp, false, mutBadSum, 1, 0, 60, 1), step(1, tcp, false, 0, 2))
	// Partial segments, a complete one among them.
	seed(false, 800, 800, step(0, tcp, true, 0, 5), step(0, tcp, false, 0, 1), step(0, tcp, true, 0, 3))
	// UDP with and without USO: full datagrams, a shorter one, a longer one,
	// one without checksum, partial ones.
	for _, uso := range []bool{false, true} {
		seed(uso, 500, 1200, step(0, udp, false, 0, 5), step(0, udp, false, mutPSH, 1), step(0, udp, false, 0, 3),
			step(0, udp, false, mutFIN, 1), step(1, udp, false, mutFlags, 3), step(1, udp, true, 0, 4),
			step(0, tcp, false, 0, 2))
	}
	// IPv6: full segments of two flows, partial ones, a corrupt one, an
	// extension header, UDP with USO (the top bit of the first size).
	seed6 := func(udp bool, size0, size1 int, steps ...[]byte) { seed(udp, size0|0x8000, size1, steps...) }
	seed6(false, 1400, 300, step(0, tcp, false, 0, 10), step(1, tcp, true, 0, 4), step(0, tcp, false, mutBadSum, 3, 0, 99, 7),
		step(1, tcp, false, mutIPOptions, 2), step(0, tcp, false, mutHeader, 2, 3, 1), step(0, tcp, false, mutPSH, 1))
	seed6(true, 1200, 500, step(0, udp, false, 0, 6), step(1, udp, true, 0, 5), step(0, udp, false, mutFlags, 2),
		step(0, udp, false, mutTotalLen, 1, 0, 80), step(1, udp, false, mutIPOptions, 1))
	// 64 KiB and MaxCoalesce limits.
	seed(false, 1400, 10, step(0, tcp, false, 0, 60), step(1, tcp, false, 0, 200))
	seed(true, 1460, 10, step(0, udp, false, 0, 60), step(1, udp, true, 0, 200))
	// Sequence gap, other flags, other lengths, header changes.
	seed(false, 300, 300, step(0, tcp, false, 0, 2), step(0, tcp, false, mutSeq, 2, 5),
		step(0, tcp, false, mutFlags, 2, tcpACK|tcpSYN), step(0, tcp, false, mutLength, 2, 1, 0),
		step(0, tcp, false, mutHeader, 2, 8, 1), step(0, tcp, false, mutRaw, 2, 0, 4, 0x80),
		step(0, tcp, false, mutTotalLen, 2, 0, 40), step(0, tcp, false, mutIPOptions, 2),
		step(0, tcp, true, mutTotalLen, 1, 0, 0), step(0, tcp, true, 0, 2))

	f.Fuzz(func(t *testing.T, data []byte, udp bool) {
		pkts := fuzzPackets(data)
		c := tundev.NewCoalescer(udp)
		var group []*fuzzPacket // the packets in c's pending group
		for _, p := range pkts {
			if !c.Add(p.buf, p.partial) {
				if c.Packets() != len(group) {
					t.Fatalf("Add refused a packet and the group holds %d, want %d", c.Packets(), len(group))
				}
				checkGroup(t, c.Group(), group, udp)
				c.Reset()
				group = group[:0]
				if c.Pending() || !c.Add(p.buf, p.partial) {
					t.Fatal("Add after Reset refused a packet")
				}
			}
			group = append(group, p)
			if c.Packets() != len(group) {
				t.Fatalf("the group holds %d packets, want %d", c.Packets(), len(group))
			}
		}
		if c.Pending() {
			checkGroup(t, c.Group(), group, udp)
			c.Reset()
		}
	})
}

// checkGroup checks what the Coalescer writes for the packets group:
//
// A group of one is written as it came: the packet unchanged, a zero
// virtio header, or if it was partial, VirtioNeedsCsum at its checksum.
//
// A merged group holds only what may be merged: IPv4 without options,
// exactly its total length, unfragmented TCP or UDP, or IPv6 of exactly
// its payload length with TCP or UDP right after the fixed header (UDP
// only with USO), and, unless partial, a transport checksum that verifies
// (a complete but wrong checksum must keep a packet alone, so the kernel
// drops it). It is
// written with the GSO header for the first packet's header and payload
// length, and split again with tundev.Split (see resplit) it must give back
// the packets added, byte for byte, except:
//   - IP ID and header checksum: Split numbers segments from the first
//     packet's ID, as TSO would; the Coalescer does not ask for consecutive
//     IDs (the others' IDs are lost, and with them the IP checksum);
//   - TCP or UDP checksum: recomputed by Split (a partial packet's field
//     held the pseudo-header sum; resplit checked each is right);
//   - TCP urgent pointer: the Coalescer takes only ACK or ACK|PSH segments,
//     without URG the field means nothing and the kernel's GRO does not
//     compare it either, so the first packet's stands for all.
//
// Everything else is compared, including sequence numbers, ACK, window,
// options, the whole TCP flags byte, the byte before it (data offset,
// reserved bits and AE, which the kernel's GRO compares as part of the
// flag word) and the IP TTL, TOS and DF. PSH cannot
// move: it closes a group, so only the last packet of a merged group has
// it, the Coalescer sets it on the merged header, and Split clears it on
// all segments but the last. Nor can the segment boundaries: every packet
// but the last has the first's payload length, the GSO size.
func checkGroup(t *testing.T, iov [][]byte, group []*fuzzPacket, udp bool) {
	t.Helper()
	h, pkt := written(t, iov)
	n := len(group)
	if len(iov) != n+1 {
		t.Fatalf("a group of %d packets is written in %d pieces, want %d", n, len(iov), n+1)
	}
	first := group[0].orig
	if n == 1 {
		want := tundev.VirtioHdr{}
		if group[0].partial {
			ihl, _ := ipHeader(first)
			off := csumField(first)
			want = tundev.VirtioHdr{Flags: tundev.VirtioNeedsCsum, HdrLen: uint16(ihl + off + 2),
				CsumStart: uint16(ihl), CsumOffset: uint16(off)}
		}
		if h != want || !bytes.Equal(pkt, first) {
			t.Fatalf("a group of one is not written as it came: header %+v (want %+v), packet changed %v",
				h, want, !bytes.Equal(pkt, first))
		}
		return
	}
	for j, p := range group {
		if why := unmergeable(p); why != "" {
			t.Fatalf("packet %d of a merged group of %d: %s", j, n, why)
		}
	}
	ihl, protocol := ipHeader(first)
	v6 := ihl == proto.IPv6HeaderLen
	want := tundev.VirtioHdr{Flags: tundev.VirtioNeedsCsum, GSOType: tundev.GSOUDPL4, HdrLen: uint16(ihl + 8),
		CsumStart: uint16(ihl), CsumOffset: 6}
	if protocol == proto.ProtoTCP {
		want.GSOType, want.CsumOffset = tundev.GSOTCPv4, 16
		if v6 {
			want.GSOType = tundev.GSOTCPv6
		}
		want.HdrLen = uint16(ihl + int(first[ihl+12]>>4)*4)
	} else if !udp {
		t.Fatalf("%d UDP datagrams merged without USO", n)
	}
	want.GSOSize = uint16(len(first) - int(want.HdrLen))
	if h != want {
		t.Fatalf("merged group of %d: virtio header %+v, want %+v", n, h, want)
	}
	var s tundev.Split
	if err := s.Init(h, pkt); err != nil {
		t.Fatalf("merged group of %d: %v", n, err)
	}
	segs := resplit(t, &s, pkt)
	if len(segs) != n {
		t.Fatalf("a group of %d packets splits into %d segments", n, len(segs))
	}
	skip := []int{4, 6, 10, 12, 36, 40} // IP ID, IP checksum, TCP checksum and urgent pointer
	switch {
	case v6 && protocol == proto.ProtoUDP:
		skip = []int{46, 48} // UDP checksum
	case v6:
		skip = []int{56, 60} // TCP checksum and urgent pointer
	case protocol == proto.ProtoUDP:
		skip = []int{4, 6, 10, 12, 26, 28} // IP ID, IP checksum, UDP checksum
	}
	for j, seg := range segs {
		o := group[j].orig
		if d := diffExcept(seg, o, skip...); d >= 0 {
			t.Fatalf("merged group of %d: segment %d differs from the packet added at byte %d of %d (%d bytes added): %#x, want %#x",
				n, j, d, len(seg), len(o), at(seg, d), at(o, d))
		}
	}
}

func at(b []byte, i int) int {
	if i < len(b) {
		return int(b[i])
	}
	return -1
}

// unmergeable says why the packet p must not be part of a merged group, or
// "" if it may be.
func unmergeable(p *fuzzPacket) string {
	o := p.orig
	if len(o) > 0 && o[0]>>4 == 6 {
		switch {
		case len(o) < 48:
			return "shorter than IPv6 and UDP headers"
		case 40+int(binary.BigEndian.Uint16(o[4:])) != len(o):
			return "IPv6 payload length is not the packet's"
		case o[6] != proto.ProtoTCP && o[6] != proto.ProtoUDP:
			return "an extension header, or neither TCP nor UDP"
		case p.partial:
			return ""
		}
		if proto.Sum(o[40:], uint64(pseudoOf(o, len(o)-40))) != 0xffff {
			return "its checksum is complete but wrong"
		}
		return ""
	}
	switch {
	case len(o) < 28 || o[0] != 0x45:
		return "not IPv4 with a 20-byte header"
	case int(binary.BigEndian.Uint16(o[2:])) != len(o):
		return "IP total length is not the packet's length"
	case o[6]&0x3f != 0 || o[7] != 0:
		return "a fragment"
	case o[9] != proto.ProtoTCP && o[9] != proto.ProtoUDP:
		return "neither TCP nor UDP"
	case p.partial:
		return ""
	}
	l4 := o[20:]
	if proto.Sum(l4, uint64(proto.PseudoHeaderSum(proto.IPv4Src(o), proto.IPv4Dst(o), o[9], len(l4)))) != 0xffff {
		return "its checksum is complete but wrong"
	}
	return ""
}
