package proto

import (
	"encoding/binary"
	"net/netip"
)

// ICMPv6 types and codes Tulle sends.
const (
	ICMPv6TypeDestinationUnreachable = 1
	ICMPv6TypePacketTooBig           = 2
	ICMPv6TypeTimeExceeded           = 3
	ICMPv6CodeNoRoute                = 0 // destination unreachable: no route to destination
	ICMPv6CodeAddressUnreachable     = 3 // destination unreachable: address unreachable
	// IPv6MinMTU is the smallest link MTU IPv6 allows (RFC 8200); an ICMPv6
	// error never exceeds it.
	IPv6MinMTU = 1280

	// EncapOverheadIPv6 is what the overlay adds to an inner packet on an
	// IPv6 underlay: the outer IPv6 and UDP headers.
	EncapOverheadIPv6 = IPv6HeaderLen + UDPHeaderLen

	// MaxIPv6Len is the largest IPv6 packet without a jumbo payload option
	// (the payload length field is 16 bits).
	MaxIPv6Len = IPv6HeaderLen + 1<<16 - 1
)

// IPv6 extension header types (RFC 8200 4), the ones IPv6Transport steps
// over.
const (
	ipv6HopByHop    = 0
	ipv6Routing     = 43
	ipv6Fragment    = 44
	ipv6ESP         = 50
	ipv6AH          = 51
	ipv6NoNext      = 59
	ipv6DestOptions = 60
	// ipv6MaxExtHeaders bounds the walk: a packet with more extension
	// headers than this is treated as carrying no transport header.
	ipv6MaxExtHeaders = 8
)

// CheckIPv6 checks that b starts with an IPv6 fixed header (version 6) and
// holds the whole packet (40 + payload length bytes; a jumbogram, payload
// length 0 with a hop-by-hop option, is reported as ErrShort unless b holds
// exactly the header). It returns the packet's total length; bytes of b
// beyond it are not part of the packet. After a nil error every IPv6*
// accessor may be used on b.
func CheckIPv6(b []byte) (total int, err error) {
	if len(b) < IPv6HeaderLen {
		return 0, ErrShort
	}
	if b[0]>>4 != 6 {
		return 0, ErrVersion
	}
	total = IPv6HeaderLen + int(binary.BigEndian.Uint16(b[4:6]))
	if total > len(b) {
		return 0, ErrShort
	}
	return total, nil
}

// The accessors below need len(b) >= IPv6HeaderLen (CheckIPv6 ensures it);
// they read the fixed header only, never an extension header.

// IPv6PayloadLength returns the payload length field (the bytes after the
// fixed header, extension headers included).
func IPv6PayloadLength(b []byte) int { return int(binary.BigEndian.Uint16(b[4:6])) }

// IPv6Src returns the source address as 16 bytes.
func IPv6Src(b []byte) [16]byte { return [16]byte(b[8:24]) }

// IPv6Dst returns the destination address as 16 bytes.
func IPv6Dst(b []byte) [16]byte { return [16]byte(b[24:40]) }

// IPv6SrcWords returns the source address as two big-endian 64-bit
// numbers, the form route tables index by.
func IPv6SrcWords(b []byte) (hi, lo uint64) {
	return binary.BigEndian.Uint64(b[8:16]), binary.BigEndian.Uint64(b[16:24])
}

// IPv6DstWords returns the destination address as two 64-bit numbers.
func IPv6DstWords(b []byte) (hi, lo uint64) {
	return binary.BigEndian.Uint64(b[24:32]), binary.BigEndian.Uint64(b[32:40])
}

// IPv6DstAddr returns the destination address (no allocation).
func IPv6DstAddr(b []byte) netip.Addr { return netip.AddrFrom16(IPv6Dst(b)) }

// IPv6SrcAddr returns the source address (no allocation).
func IPv6SrcAddr(b []byte) netip.Addr { return netip.AddrFrom16(IPv6Src(b)) }

// IPv6NextHeader returns the next header field of the fixed header.
func IPv6NextHeader(b []byte) uint8 { return b[6] }

// IPv6HopLimit returns the hop limit.
func IPv6HopLimit(b []byte) uint8 { return b[7] }

// AddrWords returns an IPv6 address as two big-endian 64-bit numbers; ok
// is false for anything that is not an IPv6 address (IPv4, zero). An
// IPv4-mapped IPv6 address is IPv6 here.
func AddrWords(a netip.Addr) (hi, lo uint64, ok bool) {
	if !a.Is6() {
		return 0, 0, false
	}
	b := a.As16()
	return binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:]), true
}

// WordsAddr is the inverse of AddrWords.
func WordsAddr(hi, lo uint64) netip.Addr {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], hi)
	binary.BigEndian.PutUint64(b[8:], lo)
	return netip.AddrFrom16(b)
}

// DecrementHopLimit lowers the hop limit of the IPv6 packet in b by one (IPv6
// has no header checksum). It returns false, leaving b unchanged, when the
// hop limit would reach 0.
func DecrementHopLimit(b []byte) bool {
	if b[7] <= 1 {
		return false
	}
	b[7]--
	return true
}

// IPv6Transport walks the extension headers of the IPv6 packet pkt (which
// CheckIPv6 accepted; bytes beyond its total length are not read) and
// returns the upper-layer protocol and the offset of its header. ok is
// false when there is no upper-layer header to look at: a non-first
// fragment, ESP, "no next header", more than 8 extension headers, or one
// that runs past the packet. A returned offset may equal the packet's
// length (an upper layer of no bytes); the caller checks the room it needs.
func IPv6Transport(pkt []byte) (proto uint8, off int, ok bool) {
	total, err := CheckIPv6(pkt)
	if err != nil {
		return 0, 0, false
	}
	next, off := IPv6NextHeader(pkt), IPv6HeaderLen
	for range ipv6MaxExtHeaders {
		var size int
		switch next {
		case ipv6HopByHop, ipv6Routing, ipv6DestOptions:
			if off+2 > total {
				return 0, 0, false
			}
			size = (int(pkt[off+1]) + 1) * 8
		case ipv6Fragment:
			if off+8 > total {
				return 0, 0, false
			}
			if binary.BigEndian.Uint16(pkt[off+2:off+4])&0xfff8 != 0 {
				return 0, 0, false // a non-first fragment: no upper-layer header
			}
			size = 8
		case ipv6AH:
			if off+2 > total {
				return 0, 0, false
			}
			size = (int(pkt[off+1]) + 2) * 4
		case ipv6ESP, ipv6NoNext:
			return 0, 0, false
		default:
			return next, off, true
		}
		if off+size > total {
			return 0, 0, false
		}
		next, off = pkt[off], off+size
	}
	return 0, 0, false
}

// PseudoHeaderSumIPv6 returns the folded ones' complement sum of the IPv6
// pseudo-header (RFC 8200 8.1) for an upper-layer packet of length bytes
// with next header proto between src and dst.
func PseudoHeaderSumIPv6(src, dst [16]byte, proto uint8, length int) uint16 {
	s := onesSum(src[:], 0)
	s = onesSum(dst[:], s)
	return fold(s + uint64(proto) + uint64(length))
}

// ICMPv6ErrorAllowed reports whether the IPv6 packet pkt may be answered
// with an ICMPv6 error (RFC 4443 2.4 e): well formed, source neither
// unspecified, multicast nor loopback, and not itself an ICMPv6 error
// (type < 128), wherever its ICMPv6 header sits behind extension headers.
// A packet whose upper layer cannot be found (a non-first fragment, ESP)
// may be answered. A multicast destination is allowed for Packet Too Big
// (RFC 4443 2.4 e.2) and refused by ICMPv6DestinationUnreachable.
func ICMPv6ErrorAllowed(pkt []byte) bool {
	total, err := CheckIPv6(pkt)
	if err != nil {
		return false
	}
	src := IPv6SrcAddr(pkt)
	if src.IsUnspecified() || src.IsMulticast() || src.IsLoopback() {
		return false
	}
	if p, off, ok := IPv6Transport(pkt); ok && p == ProtoICMPv6 && off < total && pkt[off] < 128 {
		return false
	}
	return true
}

// ICMPv6PacketTooBig builds into dst an IPv6 packet holding an ICMPv6
// "packet too big" message (RFC 4443 3.2) about pkt with the given MTU
// (raised to IPv6MinMTU if below), sent from address from to pkt's source.
// It quotes as much of pkt as keeps the message within IPv6MinMTU. It
// returns the length written, ErrNoICMPError or ErrShortBuffer;
// len(dst) >= IPv6MinMTU is always enough.
func ICMPv6PacketTooBig(dst []byte, from [16]byte, pkt []byte, mtu int) (int, error) {
	if mtu < IPv6MinMTU {
		mtu = IPv6MinMTU
	}
	return icmpv6Error(dst, from, pkt, ICMPv6TypePacketTooBig, 0, uint32(mtu))
}

// ICMPv6DestinationUnreachable builds an ICMPv6 "destination unreachable"
// (type 1) error with the given code (ICMPv6CodeNoRoute,
// ICMPv6CodeAddressUnreachable) about pkt. It is not sent about a packet
// to a multicast destination (RFC 4443 2.4 e.3). Same contract as
// ICMPv6PacketTooBig.
func ICMPv6DestinationUnreachable(dst []byte, from [16]byte, pkt []byte, code uint8) (int, error) {
	if len(pkt) >= IPv6HeaderLen && pkt[24] == 0xff {
		return 0, ErrNoICMPError
	}
	return icmpv6Error(dst, from, pkt, ICMPv6TypeDestinationUnreachable, code, 0)
}

// icmpv6Error writes IPv6 header + ICMPv6 header (type, code, the 32-bit
// word after the checksum) + as much of pkt as fits in IPv6MinMTU.
func icmpv6Error(dst []byte, from [16]byte, pkt []byte, typ, code uint8, rest uint32) (int, error) {
	if !ICMPv6ErrorAllowed(pkt) {
		return 0, ErrNoICMPError
	}
	total, _ := CheckIPv6(pkt)
	quote := min(total, IPv6MinMTU-IPv6HeaderLen-ICMPHeaderLen)
	n := IPv6HeaderLen + ICMPHeaderLen + quote
	if len(dst) < n {
		return 0, ErrShortBuffer
	}
	plen := ICMPHeaderLen + quote
	h := dst[:IPv6HeaderLen]
	binary.BigEndian.PutUint32(h[0:4], 6<<28)
	binary.BigEndian.PutUint16(h[4:6], uint16(plen))
	h[6] = ProtoICMPv6
	h[7] = icmpTTL
	copy(h[8:24], from[:])
	copy(h[24:40], pkt[8:24])

	m := dst[IPv6HeaderLen:n]
	m[0], m[1], m[2], m[3] = typ, code, 0, 0
	binary.BigEndian.PutUint32(m[4:8], rest)
	copy(m[ICMPHeaderLen:], pkt[:quote])
	// Pseudo-header: source, destination, upper-layer length, next header.
	pseudo := onesSum(h[8:40], 0) + uint64(plen) + ProtoICMPv6
	binary.BigEndian.PutUint16(m[2:4], Checksum(m, pseudo))
	return n, nil
}
