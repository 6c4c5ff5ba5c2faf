//go:build linux

package tundev_test

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/backend/tundev"
)

var (
	flowSrc = netip.MustParseAddrPort("198.18.2.7:40000")
	flowDst = netip.MustParseAddrPort("198.18.1.5:5201")
	tsOpts  = []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}
)

// segment builds TCP segment i of a flow: mss bytes of payload at
// sequence 1000+i*mss, flags ACK (plus extra), complete checksums.
func segment(i, mss int, extra byte) []byte {
	payload := make([]byte, mss)
	for k := range payload {
		payload[k] = byte(i*7 + k)
	}
	return buildTCP(make([]byte, 20+32+mss), 0, flowSrc, flowDst, 1000+uint32(i*mss), 555, tcpACK|extra, tsOpts, payload)
}

// written is what the kernel receives for a group: the virtio header and
// the packet gathered from the pieces.
func written(t *testing.T, iov [][]byte) (tundev.VirtioHdr, []byte) {
	t.Helper()
	if len(iov[0]) != tundev.VirtioHdrLen {
		t.Fatalf("first piece is %d bytes, want the %d-byte virtio header", len(iov[0]), tundev.VirtioHdrLen)
	}
	var pkt []byte
	for _, p := range iov[1:] {
		pkt = append(pkt, p...)
	}
	return tundev.DecodeVirtioHdr(iov[0]), pkt
}

// completed finishes a partial checksum as the kernel would.
func completed(t *testing.T, h tundev.VirtioHdr, pkt []byte) []byte {
	t.Helper()
	pkt = append([]byte(nil), pkt...)
	if h.Flags&tundev.VirtioNeedsCsum != 0 {
		if err := tundev.CompleteChecksum(pkt, int(h.CsumStart), int(h.CsumOffset)); err != nil {
			t.Fatal(err)
		}
	}
	return pkt
}

func TestCoalescerMergesASegmentRunIntoOneGSOPacket(t *testing.T) {
	const mss = 1400
	c := tundev.NewCoalescer(false)
	var want []byte
	for i := range 10 {
		extra := byte(0)
		if i == 9 {
			extra = tcpPSH
		}
		s := segment(i, mss, extra)
		if i == 9 {
			s = s[:len(s)-400] // a shorter last segment
			binary.BigEndian.PutUint16(s[2:], uint16(len(s)))
			s = buildTCP(make([]byte, len(s)), 0, flowSrc, flowDst, 1000+uint32(9*mss), 555, tcpACK|tcpPSH, tsOpts, s[52:])
		}
		want = append(want, s[52:]...)
		if !c.Add(s, false) {
			t.Fatalf("segment %d not merged", i)
		}
	}
	if c.Packets() != 10 || c.Add(segment(10, mss, 0), false) {
		t.Fatalf("%d packets merged; a segment after a short one or PSH must not join", c.Packets())
	}
	h, pkt := written(t, c.Group())
	if h.GSOType != tundev.GSOTCPv4 || h.GSOSize != mss || h.CsumStart != 20 || h.CsumOffset != 16 ||
		h.HdrLen != 52 || h.Flags != tundev.VirtioNeedsCsum {
		t.Fatalf("virtio header %+v", h)
	}
	p, err := parseIP(completed(t, h, pkt))
	if err != nil {
		t.Fatalf("merged packet: %v", err)
	}
	if p.seq != 1000 || p.flags != tcpACK|tcpPSH || !bytes.Equal(p.payload, want) {
		t.Errorf("merged: seq %d flags %#x, %d payload bytes (want %d)", p.seq, p.flags, len(p.payload), len(want))
	}
}

func TestCoalescerKeepsApartWhatTheKernelWouldNotMerge(t *testing.T) {
	const mss = 1000
	first := func() *tundev.Coalescer {
		c := tundev.NewCoalescer(true)
		c.Add(segment(0, mss, 0), false)
		return c
	}
	otherAck := segment(1, mss, 0)
	binary.BigEndian.PutUint32(otherAck[28:], 556)
	otherOpts := segment(1, mss, 0)
	otherOpts[47] = 9
	bigger := buildTCP(make([]byte, 52+mss+1), 0, flowSrc, flowDst, 1000+mss, 555, tcpACK, tsOpts, make([]byte, mss+1))
	otherPort := buildTCP(make([]byte, 52+mss), 0, netip.AddrPortFrom(flowSrc.Addr(), 1), flowDst, 1000+mss, 555, tcpACK, tsOpts, make([]byte, mss))
	for name, pkt := range map[string][]byte{
		"sequence gap":   segment(2, mss, 0),
		"other ACK":      otherAck,
		"other options":  otherOpts,
		"FIN":            segment(1, mss, tcpFIN),
		"larger segment": bigger,
		"other flow":     otherPort,
		"UDP":            buildUDP(make([]byte, 28+mss), 0, flowSrc, flowDst, make([]byte, mss), 1),
	} {
		// Fix up checksums where the test changed a header.
		if name == "other ACK" || name == "other options" {
			binary.BigEndian.PutUint16(pkt[36:], 0)
			binary.BigEndian.PutUint16(pkt[36:], checksum(pkt[20:], pseudoSum(flowSrc.Addr(), flowDst.Addr(), 6, len(pkt)-20)))
		}
		if c := first(); c.Add(pkt, false) {
			t.Errorf("%s: merged", name)
		}
	}
	c := first()
	for i := 1; c.Add(segment(i, mss, 0), false); i++ {
		if i > 100 {
			t.Fatal("merged beyond 64 KiB")
		}
	}
	if n := c.Packets(); (n+1)*mss <= 65535-52 {
		t.Errorf("stopped at %d segments of %d bytes, below 64 KiB", n, mss)
	}
}

// TestCoalescerComparesAEBitsAndNonDFIDsAsGRODoes: the whole data-offset
// byte (reserved bits, AE) must match, or merging would copy the first
// segment's bits onto the others; without DF the IP IDs must count up from
// the first segment's, as the kernel renumbers them when it segments.
func TestCoalescerComparesAEBitsAndNonDFIDsAsGRODoes(t *testing.T) {
	const mss = 1000
	fix := func(pkt []byte) []byte {
		pkt[10], pkt[11] = 0, 0
		binary.BigEndian.PutUint16(pkt[10:], checksum(pkt[:20], 0))
		pkt[36], pkt[37] = 0, 0
		binary.BigEndian.PutUint16(pkt[36:], checksum(pkt[20:], pseudoSum(flowSrc.Addr(), flowDst.Addr(), 6, len(pkt)-20)))
		return pkt
	}
	ae := segment(1, mss, 0)
	ae[32] |= 0x01
	c := tundev.NewCoalescer(false)
	c.Add(segment(0, mss, 0), false)
	if c.Add(fix(ae), false) {
		t.Error("a segment with AE set merged after one without")
	}

	noDF := func(i int, id uint16) []byte {
		pkt := segment(i, mss, 0)
		pkt[6] = 0
		binary.BigEndian.PutUint16(pkt[4:], id)
		return fix(pkt)
	}
	c = tundev.NewCoalescer(false)
	c.Add(noDF(0, 7), false)
	if !c.Add(noDF(1, 8), false) {
		t.Fatal("non-DF segments with consecutive IDs did not merge")
	}
	if c.Add(noDF(2, 8), false) {
		t.Error("a non-DF segment repeating the previous IP ID merged")
	}
}

func TestCorruptSegmentIsNeverMergedSoTheKernelDropsIt(t *testing.T) {
	c := tundev.NewCoalescer(false)
	good0, bad, good2 := segment(0, 500, 0), segment(1, 500, 0), segment(2, 500, 0)
	bad[100] ^= 0x55
	if !c.Add(good0, false) || c.Add(bad, false) {
		t.Fatal("a segment with a bad checksum was merged")
	}
	c.Group()
	c.Reset()
	c.Add(bad, false)
	if c.Add(good2, false) {
		t.Fatal("a segment was merged into one with a bad checksum")
	}
	h, pkt := written(t, c.Group())
	if h != (tundev.VirtioHdr{}) || !bytes.Equal(pkt, bad) {
		t.Fatalf("the corrupt segment is not written alone and unchanged: %+v", h)
	}

	// A corrupt first packet is found when the second arrives.
	c.Reset()
	c.Add(bad, false)
	if c.Add(segment(2, 500, 0), false) {
		t.Fatal("merged into a corrupt first packet")
	}
}

func TestPartialSegmentsAreTrustedAndMarkedForTheKernel(t *testing.T) {
	partial := func(i int) []byte {
		s := segment(i, 800, 0)
		binary.BigEndian.PutUint16(s[36:], ^checksum(nil, pseudoSum(flowSrc.Addr(), flowDst.Addr(), 6, len(s)-20)))
		return s
	}
	c := tundev.NewCoalescer(false)
	c.Add(partial(0), true)
	h, pkt := written(t, c.Group())
	if h.Flags != tundev.VirtioNeedsCsum || h.CsumStart != 20 || h.CsumOffset != 16 || h.GSOType != tundev.GSONone {
		t.Fatalf("single partial packet: header %+v", h)
	}
	if _, err := parseIP(completed(t, h, pkt)); err != nil {
		t.Fatalf("single partial packet, completed: %v", err)
	}
	c.Reset()
	for i := range 5 {
		if !c.Add(partial(i), true) {
			t.Fatalf("partial segment %d not merged", i)
		}
	}
	h, pkt = written(t, c.Group())
	if _, err := parseIP(completed(t, h, pkt)); err != nil || h.GSOType != tundev.GSOTCPv4 {
		t.Fatalf("merged partial segments: %v (header %+v)", err, h)
	}
}

func TestCoalescerMergesUDPOnlyWithUSO(t *testing.T) {
	udp := func(n int) []byte {
		return buildUDP(make([]byte, 28+n), 0, flowSrc, flowDst, bytes.Repeat([]byte{byte(n)}, n), 1)
	}
	if c := tundev.NewCoalescer(false); !c.Add(udp(500), false) || c.Add(udp(500), false) {
		t.Fatal("UDP merged without USO")
	}
	c := tundev.NewCoalescer(true)
	for _, n := range []int{500, 500, 300} {
		if !c.Add(udp(n), false) {
			t.Fatalf("UDP datagram of %d bytes not merged", n)
		}
	}
	if c.Add(udp(300), false) {
		t.Fatal("merged after a shorter datagram")
	}
	h, pkt := written(t, c.Group())
	if h.GSOType != tundev.GSOUDPL4 || h.GSOSize != 500 || h.CsumOffset != 6 {
		t.Fatalf("header %+v", h)
	}
	p, err := parseIP(completed(t, h, pkt))
	if err != nil || len(p.payload) != 1300 {
		t.Fatalf("merged UDP: %v, %d payload bytes", err, len(p.payload))
	}
}

// superTCP builds what a TUN with TSO hands over: headers with the
// pseudo-header sum in the TCP checksum field, and its virtio header.
func superTCP(payload, mss int) (tundev.VirtioHdr, []byte) {
	return superTCPOf(flowSrc, flowDst, payload, mss)
}

func TestSplitCutsATSOSuperpacketIntoValidSegments(t *testing.T) {
	h, pkt := superTCP(5*1000+123, 1000)
	var s tundev.Split
	if err := s.Init(h, pkt); err != nil {
		t.Fatal(err)
	}
	if s.Segments() != 6 || s.HeaderLen() != 52 || s.SegmentSize() != 1052 {
		t.Fatalf("%d segments, header %d, size %d", s.Segments(), s.HeaderLen(), s.SegmentSize())
	}
	var joined []byte
	for i := range s.Segments() {
		for _, partial := range []bool{false, true} {
			hdr := make([]byte, s.HeaderLen())
			payload := s.Segment(i, hdr, partial)
			seg := append(hdr, payload...)
			if partial {
				seg = completed(t, tundev.VirtioHdr{Flags: tundev.VirtioNeedsCsum, CsumStart: 20, CsumOffset: 16}, seg)
			}
			p, err := parseIP(seg)
			if err != nil {
				t.Fatalf("segment %d (partial %v): %v", i, partial, err)
			}
			wantFlags := byte(tcpACK)
			if i == 5 {
				wantFlags |= tcpPSH
			}
			if p.seq != 7+uint32(i*1000) || p.flags != wantFlags || binary.BigEndian.Uint16(seg[4:]) != binary.BigEndian.Uint16(pkt[4:])+uint16(i) {
				t.Fatalf("segment %d: seq %d flags %#x", i, p.seq, p.flags)
			}
			if !partial {
				joined = append(joined, p.payload...)
			}
		}
	}
	if !bytes.Equal(joined, pkt[52:]) {
		t.Fatal("segments do not carry the superpacket's payload")
	}
}

// wantSplitRejects checks that Split refuses the superpacket h, pkt after
// each of the damages in bad.
func wantSplitRejects(t *testing.T, h tundev.VirtioHdr, pkt []byte, bad map[string]func(*tundev.VirtioHdr, []byte) []byte) {
	t.Helper()
	for name, f := range bad {
		hh, pp := h, append([]byte(nil), pkt...)
		pp = f(&hh, pp)
		var s tundev.Split
		if err := s.Init(hh, pp); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestSplitRejectsInconsistentHeaders(t *testing.T) {
	h, pkt := superTCP(3000, 1000)
	bad := map[string]func(*tundev.VirtioHdr, []byte) []byte{
		"csum_start not the IP header": func(h *tundev.VirtioHdr, p []byte) []byte { h.CsumStart = 24; return p },
		"gso_size 0":                   func(h *tundev.VirtioHdr, p []byte) []byte { h.GSOSize = 0; return p },
		"TCP type on UDP":              func(h *tundev.VirtioHdr, p []byte) []byte { p[9] = 17; return p },
		"IPv6 type":                    func(h *tundev.VirtioHdr, p []byte) []byte { h.GSOType = tundev.GSOTCPv6; return p },
		"no payload":                   func(h *tundev.VirtioHdr, p []byte) []byte { binary.BigEndian.PutUint16(p[2:], 52); return p[:52] },
		"not IPv4":                     func(h *tundev.VirtioHdr, p []byte) []byte { p[0] = 0x60; return p },
		"TCP header past the end":      func(h *tundev.VirtioHdr, p []byte) []byte { binary.BigEndian.PutUint16(p[2:], 30); return p[:30] },
		"truncated":                    func(h *tundev.VirtioHdr, p []byte) []byte { return p[:2000] },
	}
	wantSplitRejects(t, h, pkt, bad)
}

// BenchmarkSplit cuts a 64 KiB TSO superpacket into 45 segments' headers
// (payload not copied) with complete and with partial checksums, over
// IPv4 and (ipv6-*) over IPv6.
func BenchmarkSplit(b *testing.B) {
	benchModes(b, func(b *testing.B, v6, partial bool, hl int) {
		super := superTCP
		if v6 {
			super = superTCP6
		}
		h, pkt := super(45*1420, 1420)
		hdrs := make([]byte, 45*hl)
		var s tundev.Split
		b.SetBytes(int64(len(pkt)))
		b.ReportAllocs()
		for b.Loop() {
			if err := s.Init(h, pkt); err != nil {
				b.Fatal(err)
			}
			for i := range s.Segments() {
				s.Segment(i, hdrs[i*hl:], partial)
			}
		}
	})
}

// benchModes runs fn as the sub-benchmarks complete, partial (checksums),
// ipv6-complete and ipv6-partial; hl is the IP and TCP header length of
// the family's segments.
func benchModes(b *testing.B, fn func(b *testing.B, v6, partial bool, hl int)) {
	for _, v6 := range []bool{false, true} {
		for _, partial := range []bool{false, true} {
			name, hl := map[bool]string{false: "complete", true: "partial"}[partial], 52
			if v6 {
				name, hl = "ipv6-"+name, 72
			}
			b.Run(name, func(b *testing.B) { fn(b, v6, partial, hl) })
		}
	}
}

// BenchmarkCoalesce merges 45 TCP segments of 1420 bytes into one group,
// verifying their checksums (complete) or trusting them (partial), over
// IPv4 and (ipv6-*) over IPv6.
func BenchmarkCoalesce(b *testing.B) {
	benchModes(b, func(b *testing.B, v6, partial bool, hl int) {
		seg := segment
		if v6 {
			seg = segment6
		}
		var segs [][]byte
		for i := range 45 {
			segs = append(segs, seg(i, 1420, 0))
		}
		c := tundev.NewCoalescer(true)
		first := append([]byte(nil), segs[0][:hl]...)
		b.SetBytes(45 * 1420)
		b.ReportAllocs()
		for b.Loop() {
			for _, s := range segs {
				if !c.Add(s, partial) {
					b.Fatal("not merged")
				}
			}
			// Group patches the first header; restore it for the next round.
			c.Group()
			c.Reset()
			copy(segs[0], first)
		}
	})
}
