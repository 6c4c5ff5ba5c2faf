package proto

import (
	"encoding/binary"
	"net/netip"
)

// ICMPv6 types Tulle sends.
const (
	ICMPv6TypePacketTooBig = 2
	// IPv6MinMTU is the smallest link MTU IPv6 allows (RFC 8200); an ICMPv6
	// error never exceeds it.
	IPv6MinMTU = 1280
)

// CheckIPv6 checks that b starts with an IPv6 fixed header (version 6) and
// holds the whole packet (40 + payload length bytes; a jumbogram, payload
// length 0 with a hop-by-hop option, is reported as ErrShort unless b holds
// exactly the header). It returns the packet's total length.
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

// The accessors below need len(b) >= IPv6HeaderLen (CheckIPv6 ensures it).

// IPv6Src returns the source address as 16 bytes.
func IPv6Src(b []byte) [16]byte { return [16]byte(b[8:24]) }

// IPv6Dst returns the destination address as 16 bytes.
func IPv6Dst(b []byte) [16]byte { return [16]byte(b[24:40]) }

// IPv6DstAddr returns the destination address (no allocation).
func IPv6DstAddr(b []byte) netip.Addr { return netip.AddrFrom16(IPv6Dst(b)) }

// IPv6SrcAddr returns the source address (no allocation).
func IPv6SrcAddr(b []byte) netip.Addr { return netip.AddrFrom16(IPv6Src(b)) }

// IPv6NextHeader returns the next header field of the fixed header.
func IPv6NextHeader(b []byte) uint8 { return b[6] }

// IPv6HopLimit returns the hop limit.
func IPv6HopLimit(b []byte) uint8 { return b[7] }

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

// ICMPv6ErrorAllowed reports whether the IPv6 packet pkt may be answered
// with an ICMPv6 error (RFC 4443 2.4 e): well formed, source neither
// unspecified nor multicast, and not itself an ICMPv6 error (type < 128)
// when the ICMPv6 header directly follows the fixed header. A multicast
// destination is allowed for Packet Too Big (RFC 4443 2.4 e.2).
func ICMPv6ErrorAllowed(pkt []byte) bool {
	total, err := CheckIPv6(pkt)
	if err != nil {
		return false
	}
	src := IPv6SrcAddr(pkt)
	if src.IsUnspecified() || src.IsMulticast() || src.IsLoopback() {
		return false
	}
	if IPv6NextHeader(pkt) == ProtoICMPv6 && total > IPv6HeaderLen && pkt[IPv6HeaderLen] < 128 {
		return false
	}
	return true
}

// ICMPv6PacketTooBig builds into dst an IPv6 packet holding an ICMPv6
// "packet too big" message (RFC 4443 3.2) about pkt with the given MTU, sent
// from address from to pkt's source. It quotes as much of pkt as keeps the
// message within IPv6MinMTU. It returns the length written, ErrNoICMPError
// or ErrShortBuffer; len(dst) >= IPv6MinMTU is always enough.
func ICMPv6PacketTooBig(dst []byte, from [16]byte, pkt []byte, mtu int) (int, error) {
	if !ICMPv6ErrorAllowed(pkt) {
		return 0, ErrNoICMPError
	}
	if mtu < IPv6MinMTU {
		mtu = IPv6MinMTU
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
	m[0], m[1], m[2], m[3] = ICMPv6TypePacketTooBig, 0, 0, 0
	binary.BigEndian.PutUint32(m[4:8], uint32(mtu))
	copy(m[ICMPHeaderLen:], pkt[:quote])
	// Pseudo-header: source, destination, upper-layer length, next header.
	pseudo := onesSum(h[8:40], 0) + uint64(plen) + ProtoICMPv6
	binary.BigEndian.PutUint16(m[2:4], Checksum(m, pseudo))
	return n, nil
}
