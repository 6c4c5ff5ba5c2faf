package tundev

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/tulle-net/tulle/proto"
)

// VirtioHdrLen is the size of the virtio-net header (struct virtio_net_hdr)
// that an offload queue puts in front of every packet it reads and expects
// in front of every packet written to it.
const VirtioHdrLen = 10

// ReadBufferSize is the buffer ReadPacket needs on an offload queue: the
// virtio header and the largest superpacket (the device's default
// gso_max_size, 64 KiB).
const ReadBufferSize = VirtioHdrLen + 1<<16

// Virtio-net header flags and GSO types (include/uapi/linux/virtio_net.h).
const (
	// VirtioNeedsCsum: the transport checksum is partial (the field at
	// CsumStart+CsumOffset holds the pseudo-header sum; the checksum over
	// the bytes from CsumStart is still to be added). Linux's
	// CHECKSUM_PARTIAL.
	VirtioNeedsCsum = 1
	// VirtioDataValid: the kernel already verified the checksum.
	VirtioDataValid = 2

	GSONone  = 0
	GSOTCPv4 = 1
	GSOTCPv6 = 4
	GSOUDPL4 = 5
	GSOECN   = 0x80
)

// VirtioHdr is the virtio-net header of a packet on an offload queue.
type VirtioHdr struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16
	GSOSize    uint16
	CsumStart  uint16
	CsumOffset uint16
}

// DecodeVirtioHdr reads a header from b (len(b) >= VirtioHdrLen). TUN
// devices use the legacy layout in native byte order.
func DecodeVirtioHdr(b []byte) VirtioHdr {
	_ = b[VirtioHdrLen-1]
	return VirtioHdr{
		Flags:      b[0],
		GSOType:    b[1],
		HdrLen:     binary.NativeEndian.Uint16(b[2:]),
		GSOSize:    binary.NativeEndian.Uint16(b[4:]),
		CsumStart:  binary.NativeEndian.Uint16(b[6:]),
		CsumOffset: binary.NativeEndian.Uint16(b[8:]),
	}
}

// Encode writes h into b (len(b) >= VirtioHdrLen).
func (h VirtioHdr) Encode(b []byte) {
	_ = b[VirtioHdrLen-1]
	b[0], b[1] = h.Flags, h.GSOType
	binary.NativeEndian.PutUint16(b[2:], h.HdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.GSOSize)
	binary.NativeEndian.PutUint16(b[6:], h.CsumStart)
	binary.NativeEndian.PutUint16(b[8:], h.CsumOffset)
}

// Errors for packets an offload queue cannot deliver (counted, then dropped).
var (
	errBadGSO       = errors.New("unsupported or inconsistent virtio GSO header")
	errBadCsumRange = errors.New("virtio checksum offset outside the packet")
)

// CompleteChecksum finishes the partial checksum of pkt (a packet read with
// VirtioNeedsCsum): the 16-bit field at start+offset holds the folded
// pseudo-header sum, and the checksum over pkt[start:] replaces it.
func CompleteChecksum(pkt []byte, start, offset int) error {
	at := start + offset
	if start < 0 || offset < 0 || at+2 > len(pkt) {
		return errBadCsumRange
	}
	seed := binary.BigEndian.Uint16(pkt[at:])
	pkt[at], pkt[at+1] = 0, 0
	c := proto.Checksum(pkt[start:], uint64(seed))
	if c == 0 && offset == proto.UDPChecksumOffset && start < len(pkt) && isUDPAt(pkt, start) {
		c = 0xffff // RFC 768: a computed zero is sent as all ones
	}
	binary.BigEndian.PutUint16(pkt[at:], c)
	return nil
}

// isUDPAt reports whether the IP packet pkt carries UDP at start (right
// after its IPv4 header, or right after the IPv6 fixed header).
func isUDPAt(pkt []byte, start int) bool {
	switch {
	case len(pkt) >= proto.IPv4HeaderLen && pkt[0]>>4 == 4:
		return proto.IPv4Protocol(pkt) == proto.ProtoUDP && proto.IPv4HeaderLength(pkt) == start
	case len(pkt) >= proto.IPv6HeaderLen && pkt[0]>>4 == 6:
		return proto.IPv6NextHeader(pkt) == proto.ProtoUDP && start == proto.IPv6HeaderLen
	}
	return false
}

// TCP flags.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpPSH = 0x08
	tcpACK = 0x10
)

// Split cuts a TSO (TCPv4, TCPv6) or USO (UDP over IPv4 or IPv6)
// superpacket into its segments without copying the payload: Segment
// writes the headers of one segment into a caller's buffer and returns the
// segment's payload as a slice of the superpacket. The zero value is ready
// for Init.
type Split struct {
	pkt    []byte
	ihl    int // IP header length (IPv4 with options; IPv6: 40)
	hdrLen int // IP + transport header
	size   int // payload bytes per segment (the last one may be shorter)
	n      int
	v6     bool
	tcp    bool
	seq    uint32
	id     uint16
	pseudo uint16 // folded pseudo-header sum without the length
}

// Init prepares the split of the superpacket pkt read with virtio header h
// (GSOTCPv4, GSOTCPv6 or GSOUDPL4, partial checksum at the transport
// header). An IPv6 superpacket must carry its transport header right after
// the fixed header (the kernel's TCP and UDP send none with extension
// headers but for IPv6 options set by hand; those are refused). It checks
// everything Segment relies on.
func (s *Split) Init(h VirtioHdr, pkt []byte) error {
	*s = Split{}
	var ihl int
	var protocol uint8
	switch {
	case len(pkt) >= proto.IPv4HeaderLen && pkt[0]>>4 == 4:
		ihl, protocol = proto.IPv4HeaderLength(pkt), proto.IPv4Protocol(pkt)
		if total := proto.IPv4TotalLength(pkt); total != len(pkt) {
			return fmt.Errorf("%w: IPv4 total length %d, superpacket %d bytes (truncated?)", errBadGSO, total, len(pkt))
		}
		if ihl < proto.IPv4HeaderLen {
			return fmt.Errorf("%w: IPv4 header length %d", errBadGSO, ihl)
		}
	case len(pkt) >= proto.IPv6HeaderLen && pkt[0]>>4 == 6:
		ihl, protocol = proto.IPv6HeaderLen, proto.IPv6NextHeader(pkt)
		if total := proto.IPv6HeaderLen + proto.IPv6PayloadLength(pkt); total != len(pkt) {
			return fmt.Errorf("%w: IPv6 payload length %d, superpacket %d bytes (truncated?)", errBadGSO, total-proto.IPv6HeaderLen, len(pkt))
		}
		s.v6 = true
	default:
		return fmt.Errorf("%w: GSO type %d on a packet that is neither IPv4 nor IPv6", errBadGSO, h.GSOType)
	}
	if int(h.CsumStart) != ihl || h.GSOSize == 0 {
		return fmt.Errorf("%w: csum_start %d, IP header %d, gso_size %d", errBadGSO, h.CsumStart, ihl, h.GSOSize)
	}
	gsoTCP := uint8(GSOTCPv4)
	if s.v6 {
		gsoTCP = GSOTCPv6
	}
	switch {
	case h.GSOType == gsoTCP && protocol == proto.ProtoTCP && h.CsumOffset == proto.TCPChecksumOffset:
		if len(pkt) < ihl+20 {
			return fmt.Errorf("%w: TCP superpacket of %d bytes", errBadGSO, len(pkt))
		}
		thl := int(pkt[ihl+12]>>4) * 4
		if thl < 20 || ihl+thl > len(pkt) {
			return fmt.Errorf("%w: TCP header length %d", errBadGSO, thl)
		}
		s.tcp = true
		s.hdrLen = ihl + thl
		s.seq = binary.BigEndian.Uint32(pkt[ihl+4:])
	case h.GSOType == GSOUDPL4 && protocol == proto.ProtoUDP && h.CsumOffset == proto.UDPChecksumOffset:
		if len(pkt) < ihl+8 {
			return fmt.Errorf("%w: UDP superpacket of %d bytes", errBadGSO, len(pkt))
		}
		s.hdrLen = ihl + 8
	default:
		return fmt.Errorf("%w: type %d, protocol %d, csum_offset %d", errBadGSO, h.GSOType, protocol, h.CsumOffset)
	}
	payload := len(pkt) - s.hdrLen
	if payload <= 0 {
		return fmt.Errorf("%w: superpacket without payload", errBadGSO)
	}
	s.pkt, s.ihl, s.size = pkt, ihl, int(h.GSOSize)
	s.n = (payload + s.size - 1) / s.size
	if s.v6 {
		s.pseudo = proto.PseudoHeaderSumIPv6(proto.IPv6Src(pkt), proto.IPv6Dst(pkt), protocol, 0)
	} else {
		s.id = binary.BigEndian.Uint16(pkt[4:])
		s.pseudo = proto.PseudoHeaderSum(proto.IPv4Src(pkt), proto.IPv4Dst(pkt), protocol, 0)
	}
	return nil
}

// Segments is the number of segments.
func (s *Split) Segments() int { return s.n }

// HeaderLen is the length of each segment's IP and transport headers.
func (s *Split) HeaderLen() int { return s.hdrLen }

// SegmentSize is the length of every segment but possibly the last
// (headers included).
func (s *Split) SegmentSize() int { return s.hdrLen + s.size }

// Header returns the superpacket's headers (those of the first segment
// before Segment patches a copy of them). Changes made here before calling
// Segment (TTL, flags) are carried into every segment.
func (s *Split) Header() []byte { return s.pkt[:s.hdrLen] }

// Segment writes the IP and transport headers of segment i (0 <= i <
// Segments()) into hdr[:HeaderLen()] and returns the segment's payload, a
// slice of the superpacket. With partial the transport checksum field gets
// the pseudo-header sum (to be completed by whoever sets VirtioNeedsCsum),
// else the complete checksum over the headers and payload.
func (s *Split) Segment(i int, hdr []byte, partial bool) []byte {
	h := hdr[:s.hdrLen]
	copy(h, s.pkt[:s.hdrLen])
	start := s.hdrLen + i*s.size
	end := min(start+s.size, len(s.pkt))
	payload := s.pkt[start:end]
	ihl := s.ihl
	l4len := s.hdrLen - ihl + len(payload)

	if s.v6 {
		binary.BigEndian.PutUint16(h[4:], uint16(l4len))
	} else {
		binary.BigEndian.PutUint16(h[2:], uint16(s.hdrLen+len(payload)))
		binary.BigEndian.PutUint16(h[4:], s.id+uint16(i))
		h[10], h[11] = 0, 0
		binary.BigEndian.PutUint16(h[10:], proto.IPv4HeaderChecksum(h[:ihl]))
	}

	csumAt := ihl + proto.UDPChecksumOffset
	if s.tcp {
		csumAt = ihl + proto.TCPChecksumOffset
		binary.BigEndian.PutUint32(h[ihl+4:], s.seq+uint32(i*s.size))
		if i != s.n-1 {
			h[ihl+13] &^= tcpFIN | tcpPSH // only the last segment ends a push
		}
	} else {
		binary.BigEndian.PutUint16(h[ihl+4:], uint16(l4len))
	}
	pseudo := proto.AddSums(s.pseudo, uint16(l4len))
	if partial {
		binary.BigEndian.PutUint16(h[csumAt:], pseudo)
		return payload
	}
	h[csumAt], h[csumAt+1] = 0, 0
	c := ^proto.Sum(payload, uint64(proto.Sum(h[ihl:], uint64(pseudo))))
	if c == 0 && !s.tcp {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(h[csumAt:], c)
	return payload
}
