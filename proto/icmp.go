package proto

import (
	"encoding/binary"
	"errors"
)

// ICMPv4 types and codes Tulle sends.
const (
	ICMPv4TypeEchoReply    = 0
	ICMPv4TypeUnreachable  = 3
	ICMPv4TypeSourceQuench = 4
	ICMPv4TypeRedirect     = 5
	ICMPv4TypeEchoRequest  = 8
	ICMPv4TypeTimeExceeded = 11
	ICMPv4TypeParamProblem = 12
	ICMPv4CodeNetUnreach   = 0
	ICMPv4CodeHostUnreach  = 1
	ICMPv4CodeFragNeeded   = 4
	ICMPv4CodeTTLExceeded  = 0
)

// ErrShortBuffer: the destination buffer cannot hold the message.
var ErrShortBuffer = errors.New("buffer too small for the ICMP message")

// ErrNoICMPError: the packet must not be answered with an ICMP error
// (RFC 1122 3.2.2: it is itself an ICMP error, a non-first fragment, or from
// or to a broadcast, multicast or unspecified address), or it is malformed.
var ErrNoICMPError = errors.New("packet must not get an ICMP error")

// icmpTOS is the TOS byte Linux puts on ICMP errors (internetwork control).
const icmpTOS = 0xc0

// icmpTTL is the TTL of the ICMP errors built here.
const icmpTTL = 64

// ICMPv4ErrorAllowed reports whether the IPv4 packet pkt may be answered with
// an ICMP error message (RFC 1122 3.2.2 and RFC 1812 4.3.2.7): it must be a
// well-formed IPv4 packet, not an ICMP error itself, not a non-first
// fragment, and neither its source nor its destination may be unspecified,
// multicast or the limited broadcast address; the source may not be
// loopback.
func ICMPv4ErrorAllowed(pkt []byte) bool {
	total, err := CheckIPv4(pkt)
	if err != nil || IPv4FragmentOffset(pkt) != 0 {
		return false
	}
	src, dst := IPv4SrcUint32(pkt), IPv4DstUint32(pkt)
	if src == 0 || src>>28 == 0xe || src>>24 == 127 || src >= 0xf0000000 ||
		dst == 0 || dst>>28 == 0xe || dst == 0xffffffff {
		return false
	}
	if IPv4Protocol(pkt) == ProtoICMP {
		ihl := IPv4HeaderLength(pkt)
		if total <= ihl {
			return false // no ICMP type to look at
		}
		switch pkt[ihl] {
		case ICMPv4TypeUnreachable, ICMPv4TypeSourceQuench, ICMPv4TypeRedirect, ICMPv4TypeTimeExceeded, ICMPv4TypeParamProblem:
			return false
		}
	}
	return true
}

// ICMPv4FragmentationNeeded builds into dst an IPv4 packet holding an ICMP
// "destination unreachable, fragmentation needed and DF set" error (type 3,
// code 4, RFC 1191) about pkt, advertising next-hop MTU mtu, sent from
// address from to pkt's source. It quotes pkt's IP header and the first 8
// bytes of its payload (RFC 792). It returns the length written, or
// ErrNoICMPError (see ICMPv4ErrorAllowed) or ErrShortBuffer; len(dst) >=
// 56 + IPv4 options of pkt is always enough.
func ICMPv4FragmentationNeeded(dst []byte, from [4]byte, pkt []byte, mtu int) (int, error) {
	if mtu < 68 || mtu > MaxIPv4Len {
		mtu = 68 // RFC 791 minimum; a nonsense MTU must not reach the wire
	}
	return icmpv4Error(dst, from, pkt, ICMPv4TypeUnreachable, ICMPv4CodeFragNeeded, uint32(mtu))
}

// ICMPv4DestinationUnreachable builds an ICMP "destination unreachable"
// (type 3) error with the given code (ICMPv4CodeNetUnreach,
// ICMPv4CodeHostUnreach) about pkt. Same contract as
// ICMPv4FragmentationNeeded.
func ICMPv4DestinationUnreachable(dst []byte, from [4]byte, pkt []byte, code uint8) (int, error) {
	return icmpv4Error(dst, from, pkt, ICMPv4TypeUnreachable, code, 0)
}

// ICMPv4TimeExceeded builds an ICMP "time exceeded in transit" (type 11,
// code 0) error about pkt. Same contract as ICMPv4FragmentationNeeded.
func ICMPv4TimeExceeded(dst []byte, from [4]byte, pkt []byte) (int, error) {
	return icmpv4Error(dst, from, pkt, ICMPv4TypeTimeExceeded, ICMPv4CodeTTLExceeded, 0)
}

// icmpv4Error writes IPv4 header + ICMP header (type, code, the 32-bit "rest
// of header" word) + pkt's header and 8 payload bytes into dst.
func icmpv4Error(dst []byte, from [4]byte, pkt []byte, typ, code uint8, rest uint32) (int, error) {
	if !ICMPv4ErrorAllowed(pkt) {
		return 0, ErrNoICMPError
	}
	ihl := IPv4HeaderLength(pkt)
	quote := min(IPv4TotalLength(pkt), ihl+8)
	n := IPv4HeaderLen + ICMPHeaderLen + quote
	if len(dst) < n {
		return 0, ErrShortBuffer
	}
	h := dst[:IPv4HeaderLen]
	h[0] = 0x45
	h[1] = icmpTOS
	binary.BigEndian.PutUint16(h[2:4], uint16(n))
	binary.BigEndian.PutUint32(h[4:8], 0) // ID 0, no flags: never fragmented at this size
	h[8] = icmpTTL
	h[9] = ProtoICMP
	h[10], h[11] = 0, 0
	copy(h[12:16], from[:])
	copy(h[16:20], pkt[12:16])
	binary.BigEndian.PutUint16(h[10:12], IPv4HeaderChecksum(h))

	m := dst[IPv4HeaderLen:n]
	m[0], m[1], m[2], m[3] = typ, code, 0, 0
	binary.BigEndian.PutUint32(m[4:8], rest)
	copy(m[ICMPHeaderLen:], pkt[:quote])
	binary.BigEndian.PutUint16(m[2:4], Checksum(m, 0))
	return n, nil
}
