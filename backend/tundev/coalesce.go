package tundev

import (
	"bytes"
	"encoding/binary"

	"github.com/tulle-net/tulle/proto"
)

// MaxCoalesce is the most packets a Coalescer merges into one superpacket.
const MaxCoalesce = 128

// Coalescer merges consecutive TCP segments of one flow (and, where the
// kernel takes USO, UDP datagrams of one flow) into superpackets that an
// offload queue writes with one system call each, as the kernel's GRO
// would, for IPv4 and IPv6: same addresses, ports, TOS/traffic class,
// TTL/hop limit, DF (IPv4), flow label (IPv6); TCP segments in sequence
// with the same ACK, window and options, flags ACK (PSH only on the last);
// each segment the size of the first except a shorter last one; at most 64
// KiB and MaxCoalesce segments. IPv4 with options and IPv6 with extension
// headers are never merged. It copies nothing: a group is the first
// packet (its headers patched when the group is taken) followed by the
// payloads of the others, as slices of the caller's buffers.
//
// Packets whose checksum is complete are verified before they are merged
// (merging a corrupt segment would let the kernel trust its payload); one
// that fails stays alone, so the kernel drops it. Packets marked partial
// carry the pseudo-header sum in their checksum field (as read from a TUN
// with VirtioNeedsCsum) and are trusted.
//
// Add trusts the IPv4 header checksum (the caller checked it, as the RX
// loop does) and a partial mark (the caller made sure the packet is
// unfragmented TCP or UDP with room for its header, right after the IP
// header).
//
// Use: for each packet, if !Add(pkt, partial) { write(Group()); Reset();
// Add(pkt, partial) }; at the end write(Group()) if Pending(). A
// Coalescer allocates nothing after NewCoalescer.
type Coalescer struct {
	udp bool
	hdr [VirtioHdrLen]byte
	iov [][]byte // iov[0] = hdr, iov[1] = first packet, then payloads

	count   int // packets in the group
	kind    uint8
	v6      bool // the group is IPv6
	closed  bool // nothing may be appended
	psh     bool // the last segment carries PSH
	partial bool // the first packet's checksum is partial
	checked bool // the first packet's checksum was verified
	ihl     int  // IP header length: 20 or 40
	hdrLen  int
	size    int    // payload bytes of the first segment
	total   int    // IP length of the merged packet
	nextSeq uint32 // TCP: sequence number the next segment must have
	bad     *byte  // the last packet that failed verification
}

const (
	kindOther = iota
	kindTCP
	kindUDP
)

// NewCoalescer makes a Coalescer; udp enables merging UDP datagrams (only
// where the device took USO, Device.UDPOffload).
func NewCoalescer(udp bool) *Coalescer {
	c := &Coalescer{udp: udp, iov: make([][]byte, 0, MaxCoalesce+1)}
	c.iov = append(c.iov, c.hdr[:])
	return c
}

// Pending reports whether a group is waiting for Group.
func (c *Coalescer) Pending() bool { return c.count > 0 }

// Packets returns the number of packets in the pending group.
func (c *Coalescer) Packets() int { return c.count }

// Reset drops the pending group (after it was written) and the references
// to the caller's buffers.
func (c *Coalescer) Reset() {
	clear(c.iov[1:])
	c.iov = c.iov[:1]
	c.count = 0
}

// Add offers the IPv4 or IPv6 packet pkt (exactly its IP length). It
// returns true if pkt started or joined the pending group, false if it
// cannot join it: then take the group, Reset and Add pkt again (which
// always succeeds).
func (c *Coalescer) Add(pkt []byte, partial bool) bool {
	if c.count == 0 {
		c.start(pkt, partial)
		return true
	}
	if c.closed || c.count == MaxCoalesce || !c.joins(pkt) {
		return false
	}
	if !partial && !c.verify(pkt) {
		c.bad = &pkt[0] // start will keep it alone
		return false
	}
	if c.count == 1 && !c.partial && !c.checked {
		if !c.verify(c.iov[1]) {
			c.closed = true
			return false
		}
		c.checked = true
	}
	p := len(pkt) - c.hdrLen
	c.iov = append(c.iov, pkt[c.hdrLen:])
	c.count++
	c.total += p
	if c.kind == kindTCP {
		c.nextSeq += uint32(p)
		if pkt[c.ihl+13]&tcpPSH != 0 {
			c.psh, c.closed = true, true
		}
	}
	if p < c.size {
		c.closed = true
	}
	return true
}

// start makes pkt the first packet of a new group.
func (c *Coalescer) start(pkt []byte, partial bool) {
	c.iov = append(c.iov[:1], pkt)
	c.count, c.kind, c.closed, c.psh, c.partial, c.checked = 1, kindOther, true, false, partial, false
	c.total = len(pkt)
	if len(pkt) == 0 {
		return
	}
	if c.bad == &pkt[0] { // failed verification: alone, so the kernel drops it
		c.bad = nil
		return
	}
	var protocol uint8
	switch {
	case len(pkt) >= proto.IPv4HeaderLen && pkt[0] == 0x45:
		if proto.IPv4IsFragment(pkt) || int(binary.BigEndian.Uint16(pkt[2:])) != len(pkt) {
			return
		}
		c.v6, c.ihl, protocol = false, proto.IPv4HeaderLen, pkt[9]
	case len(pkt) >= proto.IPv6HeaderLen && pkt[0]>>4 == 6:
		if proto.IPv6HeaderLen+proto.IPv6PayloadLength(pkt) != len(pkt) {
			return
		}
		c.v6, c.ihl, protocol = true, proto.IPv6HeaderLen, pkt[6]
	default:
		return
	}
	ihl := c.ihl
	switch protocol {
	case proto.ProtoTCP:
		if len(pkt) < ihl+proto.TCPHeaderLen {
			return
		}
		thl := int(pkt[ihl+12]>>4) * 4
		flags := pkt[ihl+13]
		if thl < 20 || ihl+thl >= len(pkt) || (flags != tcpACK && flags != tcpACK|tcpPSH) {
			return
		}
		c.kind, c.hdrLen = kindTCP, ihl+thl
		c.size = len(pkt) - c.hdrLen
		c.nextSeq = binary.BigEndian.Uint32(pkt[ihl+4:]) + uint32(c.size)
		c.closed = flags&tcpPSH != 0
	case proto.ProtoUDP:
		if !c.udp || len(pkt) <= ihl+proto.UDPHeaderLen || int(binary.BigEndian.Uint16(pkt[ihl+4:])) != len(pkt)-ihl ||
			(!partial && pkt[ihl+6] == 0 && pkt[ihl+7] == 0) {
			return // no checksum: nothing to verify before merging, so do not merge
		}
		c.kind, c.hdrLen = kindUDP, ihl+proto.UDPHeaderLen
		c.size = len(pkt) - c.hdrLen
		c.closed = false
	}
}

// joins reports whether pkt may follow the group (checksums aside).
func (c *Coalescer) joins(pkt []byte) bool {
	first := c.iov[1]
	ihl := c.ihl
	if len(pkt) <= c.hdrLen {
		return false
	}
	if c.v6 {
		// Version, traffic class and flow label; next header and hop
		// limit; addresses and ports.
		if !bytes.Equal(pkt[0:4], first[0:4]) || pkt[6] != first[6] || pkt[7] != first[7] ||
			proto.IPv6HeaderLen+proto.IPv6PayloadLength(pkt) != len(pkt) || !bytes.Equal(pkt[8:44], first[8:44]) {
			return false
		}
	} else {
		if pkt[0] != 0x45 || pkt[9] != first[9] || proto.IPv4IsFragment(pkt) ||
			pkt[1] != first[1] || pkt[8] != first[8] || pkt[6]&0xe0 != first[6]&0xe0 ||
			int(binary.BigEndian.Uint16(pkt[2:])) != len(pkt) ||
			!bytes.Equal(pkt[12:24], first[12:24]) { // addresses and ports
			return false
		}
		// Without DF the IP ID matters (fragments are reassembled by it), and
		// the kernel's segmentation numbers the segments from the first one's:
		// merge only segments already numbered so, as the kernel's GRO does.
		if !proto.IPv4DontFragment(first) && binary.BigEndian.Uint16(pkt[4:]) != binary.BigEndian.Uint16(first[4:])+uint16(c.count) {
			return false
		}
	}
	p := len(pkt) - c.hdrLen
	if p > c.size || c.total+p > proto.MaxIPv4Len {
		return false
	}
	// The transport headers, at constant offsets from here on.
	t, ft := pkt[ihl:c.hdrLen], first[ihl:c.hdrLen]
	if c.kind == kindUDP {
		return int(binary.BigEndian.Uint16(t[4:6])) == len(pkt)-ihl
	}
	_, _ = t[19], ft[19]
	// Byte 12 whole: the data offset, and the reserved and AE (accurate
	// ECN) bits, which merging would copy from the first segment onto all.
	flags := t[13]
	return t[12] == ft[12] && (flags == tcpACK || flags == tcpACK|tcpPSH) &&
		binary.BigEndian.Uint32(t[4:8]) == c.nextSeq &&
		binary.BigEndian.Uint32(t[8:12]) == binary.BigEndian.Uint32(ft[8:12]) && // ACK number
		binary.BigEndian.Uint16(t[14:16]) == binary.BigEndian.Uint16(ft[14:16]) && // window
		bytes.Equal(t[20:], ft[20:]) // options
}

// verify checks the transport checksum of an unfragmented TCP or UDP
// packet of the group's family, its transport right after the IP header.
func (c *Coalescer) verify(pkt []byte) bool {
	l4 := pkt[c.ihl:]
	return proto.Sum(l4, uint64(pseudoHeader(pkt, c.v6, len(l4)))) == 0xffff
}

// pseudoHeader is the pseudo-header sum of pkt (IPv6 if v6, else IPv4, its
// transport right after the IP header) for a transport of length bytes.
func pseudoHeader(pkt []byte, v6 bool, length int) uint16 {
	if v6 {
		return proto.PseudoHeaderSumIPv6(proto.IPv6Src(pkt), proto.IPv6Dst(pkt), pkt[6], length)
	}
	return proto.PseudoHeaderSum(proto.IPv4Src(pkt), proto.IPv4Dst(pkt), pkt[9], length)
}

// Group finishes the pending group and returns what to write: the virtio
// header followed by the packet's pieces. A group of one packet is written
// as it came (with VirtioNeedsCsum if its checksum is partial); a merged
// group gets the first packet's headers patched (lengths, IPv4 checksum,
// PSH, the pseudo-header sum for the new length) and a GSO header.
func (c *Coalescer) Group() [][]byte {
	first := c.iov[1]
	if c.count == 1 {
		h := VirtioHdr{}
		if c.partial {
			h = partialHdr(first)
		}
		h.Encode(c.hdr[:])
		return c.iov
	}
	ihl := c.ihl
	l4len := c.total - ihl
	gsoTCP := uint8(GSOTCPv4)
	if c.v6 {
		binary.BigEndian.PutUint16(first[4:], uint16(l4len))
		gsoTCP = GSOTCPv6
	} else {
		binary.BigEndian.PutUint16(first[2:], uint16(c.total))
		first[10], first[11] = 0, 0
		binary.BigEndian.PutUint16(first[10:], proto.IPv4HeaderChecksum(first[:20]))
	}
	h := VirtioHdr{Flags: VirtioNeedsCsum, HdrLen: uint16(c.hdrLen), GSOSize: uint16(c.size), CsumStart: uint16(ihl)}
	csumAt := ihl + proto.TCPChecksumOffset
	if c.kind == kindTCP {
		h.GSOType, h.CsumOffset = gsoTCP, proto.TCPChecksumOffset
		if c.psh {
			first[ihl+13] |= tcpPSH
		}
	} else {
		h.GSOType, h.CsumOffset = GSOUDPL4, proto.UDPChecksumOffset
		csumAt = ihl + proto.UDPChecksumOffset
		binary.BigEndian.PutUint16(first[ihl+4:], uint16(l4len))
	}
	binary.BigEndian.PutUint16(first[csumAt:], pseudoHeader(first, c.v6, l4len))
	h.Encode(c.hdr[:])
	return c.iov
}

// partialHdr is the virtio header of a single TCP or UDP packet whose
// checksum field holds the pseudo-header sum (for IPv6, the transport
// right after the fixed header).
func partialHdr(pkt []byte) VirtioHdr {
	start, protocol := proto.IPv6HeaderLen, pkt[6]
	if pkt[0]>>4 == 4 {
		start, protocol = proto.IPv4HeaderLength(pkt), proto.IPv4Protocol(pkt)
	}
	h := VirtioHdr{Flags: VirtioNeedsCsum, CsumStart: uint16(start),
		CsumOffset: uint16(proto.TransportChecksumOffset(protocol))}
	h.HdrLen = h.CsumStart + h.CsumOffset + 2
	return h
}
