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
	flowSrc6 = netip.MustParseAddrPort("[2001:db8:1:2::7]:40000")
	flowDst6 = netip.MustParseAddrPort("[2001:db8:1:1::5]:5201")
)

// segment6 is segment over IPv6: TCP segment i of a flow, mss payload
// bytes at sequence 1000+i*mss, timestamps, flags ACK (plus extra).
func segment6(i, mss int, extra byte) []byte {
	payload := make([]byte, mss)
	for k := range payload {
		payload[k] = byte(i*7 + k)
	}
	return buildTCP(make([]byte, 40+32+mss), 0, flowSrc6, flowDst6, 1000+uint32(i*mss), 555, tcpACK|extra, tsOpts, payload)
}

// superTCP6 is what a TUN with TSO6 hands over: IPv6 + TCP with the
// pseudo-header sum in the checksum field, and its virtio header.
func superTCP6(payload, mss int) (tundev.VirtioHdr, []byte) {
	return superTCPOf(flowSrc6, flowDst6, payload, mss)
}

// superUDP6 is a USO superpacket over IPv6.
func superUDP6(payload, size int) (tundev.VirtioHdr, []byte) {
	return superUDPOf(flowSrc6, flowDst6, 0, payload, size)
}

// withDestOptions returns a copy of the IPv6 packet pkt with an 8-byte
// destination options header (PadN) before its transport.
func withDestOptions(pkt []byte) []byte {
	p := make([]byte, 0, len(pkt)+8)
	p = append(p, pkt[:40]...)
	p = append(p, pkt[6], 0, 1, 4, 0, 0, 0, 0)
	p = append(p, pkt[40:]...)
	p[6] = 60
	binary.BigEndian.PutUint16(p[4:], uint16(len(p)-40))
	return p
}

func TestSplitCutsTSO6AndUSO6SuperpacketsIntoValidSegments(t *testing.T) {
	for _, c := range []struct {
		name             string
		super            func(payload, size int) (tundev.VirtioHdr, []byte)
		payload, size    int
		segs, hdr, final int
	}{
		{"TCP", superTCP6, 5*1000 + 123, 1000, 6, 72, 123},
		{"UDP", superUDP6, 3000, 1200, 3, 48, 600},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, pkt := c.super(c.payload, c.size)
			var s tundev.Split
			if err := s.Init(h, pkt); err != nil {
				t.Fatal(err)
			}
			if s.Segments() != c.segs || s.HeaderLen() != c.hdr {
				t.Fatalf("%d segments, header %d", s.Segments(), s.HeaderLen())
			}
			segs := resplit(t, &s, pkt) // every segment checked, complete and partial
			last := segs[len(segs)-1]
			if len(last)-c.hdr != c.final || binary.BigEndian.Uint16(last[4:]) != uint16(len(last)-40) {
				t.Fatalf("last segment: %d bytes, payload length %d", len(last), binary.BigEndian.Uint16(last[4:]))
			}
			if last[0]>>4 != 6 || !bytes.Equal(last[:4], pkt[:4]) || last[7] != pkt[7] {
				t.Fatal("the fixed header (version, class, flow label, hop limit) is not the superpacket's")
			}
		})
	}
}

func TestSplitRejectsInconsistentIPv6Headers(t *testing.T) {
	h, pkt := superTCP6(3000, 1000)
	bad := map[string]func(*tundev.VirtioHdr, []byte) []byte{
		"TCPv4 type":              func(h *tundev.VirtioHdr, p []byte) []byte { h.GSOType = tundev.GSOTCPv4; return p },
		"csum_start not 40":       func(h *tundev.VirtioHdr, p []byte) []byte { h.CsumStart = 20; return p },
		"extension header":        func(h *tundev.VirtioHdr, p []byte) []byte { h.CsumStart = 48; return withDestOptions(p) },
		"payload length too long": func(h *tundev.VirtioHdr, p []byte) []byte { return p[:2000] },
		"no payload":              func(h *tundev.VirtioHdr, p []byte) []byte { binary.BigEndian.PutUint16(p[4:], 32); return p[:72] },
		"TCP type on UDP":         func(h *tundev.VirtioHdr, p []byte) []byte { p[6] = 17; return p },
	}
	wantSplitRejects(t, h, pkt, bad)
}

func TestCoalescerMergesIPv6SegmentsIntoOneGSOTCPv6Packet(t *testing.T) {
	const mss = 1400
	for _, partial := range []bool{false, true} {
		c := tundev.NewCoalescer(false)
		var want []byte
		for i := range 8 {
			s := segment6(i, mss, 0)
			if partial {
				binary.BigEndian.PutUint16(s[56:], ^checksum(nil, pseudoSum(flowSrc6.Addr(), flowDst6.Addr(), 6, len(s)-40)))
			}
			want = append(want, s[72:]...)
			if !c.Add(s, partial) {
				t.Fatalf("partial %v: segment %d not merged", partial, i)
			}
		}
		h, pkt := written(t, c.Group())
		if h.GSOType != tundev.GSOTCPv6 || h.GSOSize != mss || h.CsumStart != 40 || h.CsumOffset != 16 ||
			h.HdrLen != 72 || h.Flags != tundev.VirtioNeedsCsum {
			t.Fatalf("partial %v: virtio header %+v", partial, h)
		}
		p, err := parseIP(completed(t, h, pkt))
		if err != nil {
			t.Fatalf("partial %v: merged packet: %v", partial, err)
		}
		if p.seq != 1000 || !bytes.Equal(p.payload, want) || binary.BigEndian.Uint16(pkt[4:]) != uint16(len(pkt)-40) {
			t.Errorf("partial %v: merged seq %d, %d payload bytes (want %d)", partial, p.seq, len(p.payload), len(want))
		}
	}
}

func TestCoalescerKeepsApartIPv6PacketsTheKernelWouldNotMerge(t *testing.T) {
	const mss = 1000
	refresh := func(p []byte) []byte {
		at := len(p) - mss - 32 + 16 // TCP checksum
		p[at], p[at+1] = 0, 0
		src, dst := netip.AddrFrom16([16]byte(p[8:24])), netip.AddrFrom16([16]byte(p[24:40]))
		binary.BigEndian.PutUint16(p[at:], checksum(p[at-16:], pseudoSum(src, dst, 6, len(p)-(at-16))))
		return p
	}
	change := func(f func([]byte)) []byte {
		p := segment6(1, mss, 0)
		f(p)
		return refresh(p)
	}
	for name, pkt := range map[string][]byte{
		"other flow label":    change(func(p []byte) { p[3] ^= 1 }),
		"other traffic class": change(func(p []byte) { p[1] ^= 0x10 }),
		"other hop limit":     change(func(p []byte) { p[7]-- }),
		"other source":        change(func(p []byte) { p[23] ^= 1 }),
		"an IPv4 segment":     segment(1, mss, 0),
		"extension header":    refresh(withDestOptions(segment6(1, mss, 0))),
		"bad checksum":        func() []byte { p := segment6(1, mss, 0); p[200] ^= 3; return p }(),
		"sequence gap":        segment6(2, mss, 0),
	} {
		c := tundev.NewCoalescer(true)
		c.Add(segment6(0, mss, 0), false)
		if c.Add(pkt, false) {
			t.Errorf("%s: merged", name)
		}
	}
	// A first packet with an extension header is never merged into.
	c := tundev.NewCoalescer(true)
	c.Add(refresh(withDestOptions(segment6(0, mss, 0))), false)
	if c.Add(segment6(1, mss, 0), false) {
		t.Error("merged into a packet with an extension header")
	}
	// A UDP datagram without checksum (invalid over IPv6) is not merged.
	c = tundev.NewCoalescer(true)
	noSum := buildUDP(make([]byte, 48+mss), 0, flowSrc6, flowDst6, make([]byte, mss), 0)
	noSum[46], noSum[47] = 0, 0
	c.Add(noSum, false)
	if c.Add(buildUDP(make([]byte, 48+mss), 0, flowSrc6, flowDst6, make([]byte, mss), 0), false) {
		t.Error("merged into a UDP datagram without checksum")
	}
}

func TestCompleteChecksumOfIPv6UDPNeverLeavesZero(t *testing.T) {
	// A datagram whose checksum comes out 0 must carry 0xffff: 0 means "no
	// checksum", which IPv6 forbids.
	pkt := buildUDP(make([]byte, 48+40), 0, flowSrc6, flowDst6, make([]byte, 40), 0)
	pseudo := pseudoSum(flowSrc6.Addr(), flowDst6.Addr(), 17, len(pkt)-40)
	binary.BigEndian.PutUint16(pkt[46:], 0)
	binary.BigEndian.PutUint16(pkt[86:], 0)
	binary.BigEndian.PutUint16(pkt[86:], checksum(pkt[40:], pseudo)) // the rest now sums to 0xffff
	binary.BigEndian.PutUint16(pkt[46:], ^checksum(nil, pseudo))     // partial: the pseudo-header sum
	if err := tundev.CompleteChecksum(pkt, 40, 6); err != nil {
		t.Fatal(err)
	}
	if got := binary.BigEndian.Uint16(pkt[46:]); got != 0xffff {
		t.Fatalf("completed UDP checksum %#04x, want 0xffff", got)
	}
}
