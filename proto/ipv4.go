package proto

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

// Sizes of the headers Tulle deals with.
const (
	IPv4HeaderLen = 20 // IPv4 header without options
	IPv6HeaderLen = 40 // IPv6 fixed header
	UDPHeaderLen  = 8
	ICMPHeaderLen = 8
	TCPHeaderLen  = 20 // TCP header without options

	// Offsets of the checksum field in the TCP and UDP headers.
	TCPChecksumOffset = 16
	UDPChecksumOffset = 6

	// EncapOverhead is what the overlay adds to an inner packet on the
	// underlay: the outer IPv4 and UDP headers (flannel's "MTU - 28").
	EncapOverhead = IPv4HeaderLen + UDPHeaderLen

	// MaxIPv4Len is the largest IPv4 packet (the total length field is 16 bits).
	MaxIPv4Len = 1<<16 - 1
)

// IP protocol numbers used here.
const (
	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoICMPv6 = 58
)

// Errors returned by CheckIPv4 and CheckIPv6. They are fixed values: a check
// never allocates.
var (
	// ErrShort: the buffer is shorter than the header or than the length the
	// header claims (a truncated packet).
	ErrShort = errors.New("packet shorter than its header says")
	// ErrVersion: the version nibble is not the one expected.
	ErrVersion = errors.New("wrong IP version")
	// ErrHeaderLen: the IPv4 IHL is below 5 or beyond the total length.
	ErrHeaderLen = errors.New("bad IPv4 header length")
	// ErrTotalLen: the IPv4 total length is smaller than the header.
	ErrTotalLen = errors.New("bad IPv4 total length")
)

// Version returns the IP version nibble of the packet in b (4 or 6 for IP), or
// 0 if b is empty.
func Version(b []byte) int {
	if len(b) == 0 {
		return 0
	}
	return int(b[0] >> 4)
}

// CheckIPv4 checks that b starts with a well-formed IPv4 header: version 4,
// IHL >= 5, total length >= the header and <= len(b). It returns the packet's
// total length; bytes of b beyond it are not part of the packet. It does not
// verify the header checksum (see IPv4HeaderChecksumValid). After a nil
// error every IPv4* accessor may be used on b.
func CheckIPv4(b []byte) (total int, err error) {
	if len(b) < IPv4HeaderLen {
		return 0, ErrShort
	}
	if b[0]>>4 != 4 {
		return 0, ErrVersion
	}
	ihl := int(b[0]&0x0f) * 4
	if ihl < IPv4HeaderLen {
		return 0, ErrHeaderLen
	}
	total = int(binary.BigEndian.Uint16(b[2:4]))
	if total < ihl {
		if total < IPv4HeaderLen {
			return 0, ErrTotalLen
		}
		return 0, ErrHeaderLen
	}
	if total > len(b) {
		return 0, ErrShort
	}
	return total, nil
}

// The accessors below need len(b) >= IPv4HeaderLen (CheckIPv4 ensures it);
// they panic on a shorter slice like any out-of-range index.

// IPv4HeaderLength returns the header length in bytes (IHL * 4).
func IPv4HeaderLength(b []byte) int { return int(b[0]&0x0f) * 4 }

// IPv4TotalLength returns the total length field.
func IPv4TotalLength(b []byte) int { return int(binary.BigEndian.Uint16(b[2:4])) }

// IPv4TTL returns the time-to-live field.
func IPv4TTL(b []byte) uint8 { return b[8] }

// IPv4Protocol returns the protocol field (ProtoTCP, ProtoUDP, ...).
func IPv4Protocol(b []byte) uint8 { return b[9] }

// IPv4DontFragment reports whether the DF flag is set.
func IPv4DontFragment(b []byte) bool { return b[6]&0x40 != 0 }

// TransportChecksumOffset returns where the checksum field sits in the
// header of transport protocol p: TCPChecksumOffset or UDPChecksumOffset,
// -1 for any other protocol.
func TransportChecksumOffset(p uint8) int {
	switch p {
	case ProtoTCP:
		return TCPChecksumOffset
	case ProtoUDP:
		return UDPChecksumOffset
	}
	return -1
}

// IPv4IsFragment reports whether the packet in b is a fragment: more
// fragments follow (MF) or its fragment offset is not zero.
func IPv4IsFragment(b []byte) bool { return binary.BigEndian.Uint16(b[6:8])&0x3fff != 0 }

// IPv4FragmentOffset returns the fragment offset in bytes (0 for an
// unfragmented packet and for the first fragment).
func IPv4FragmentOffset(b []byte) int {
	return int(binary.BigEndian.Uint16(b[6:8])&0x1fff) * 8
}

// IPv4Src returns the source address as 4 bytes.
func IPv4Src(b []byte) [4]byte { return [4]byte(b[12:16]) }

// IPv4Dst returns the destination address as 4 bytes.
func IPv4Dst(b []byte) [4]byte { return [4]byte(b[16:20]) }

// IPv4SrcUint32 returns the source address as a big-endian number, the form
// route tables index by.
func IPv4SrcUint32(b []byte) uint32 { return binary.BigEndian.Uint32(b[12:16]) }

// IPv4DstUint32 returns the destination address as a big-endian number.
func IPv4DstUint32(b []byte) uint32 { return binary.BigEndian.Uint32(b[16:20]) }

// IPv4SrcAddr returns the source address (no allocation).
func IPv4SrcAddr(b []byte) netip.Addr { return netip.AddrFrom4(IPv4Src(b)) }

// IPv4DstAddr returns the destination address (no allocation).
func IPv4DstAddr(b []byte) netip.Addr { return netip.AddrFrom4(IPv4Dst(b)) }

// AddrUint32 returns an IPv4 address as a big-endian number; ok is false for
// anything that is not a plain IPv4 address (IPv6, 4-in-6, zero).
func AddrUint32(a netip.Addr) (v uint32, ok bool) {
	if !a.Is4() {
		return 0, false
	}
	b := a.As4()
	return binary.BigEndian.Uint32(b[:]), true
}

// Uint32Addr is the inverse of AddrUint32.
func Uint32Addr(v uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// IPv4HeaderChecksum computes the checksum of the IPv4 header h (the header
// bytes only, IHL*4 of them), treating the checksum field as zero.
func IPv4HeaderChecksum(h []byte) uint16 {
	sum := onesSum(h[:10], 0)
	sum = onesSum(h[12:], sum)
	return ^fold(sum)
}

// IPv4HeaderChecksumValid reports whether the header checksum of the IPv4
// packet in b is correct. It needs len(b) >= IPv4HeaderLength(b), which
// CheckIPv4 ensures.
func IPv4HeaderChecksumValid(b []byte) bool {
	return fold(onesSum(b[:IPv4HeaderLength(b)], 0)) == 0xffff
}

// DecrementTTL lowers the TTL of the IPv4 packet in b by one and patches the
// header checksum incrementally (RFC 1624, eqn. 3), as flannel does on send
// and again on receive. It returns false, leaving b unchanged, when the TTL
// would reach 0: the packet must then be dropped (time exceeded).
func DecrementTTL(b []byte) bool {
	ttl := b[8]
	if ttl <= 1 {
		return false
	}
	old := uint16(ttl)<<8 | uint16(b[9])
	b[8] = ttl - 1
	UpdateChecksumWord(b[10:12], old, old-0x100)
	return true
}

// updateChecksum returns checksum hc after the 16-bit word old became new:
// HC' = ~(~HC + ~m + m') (RFC 1624, eqn. 3).
func updateChecksum(hc, old, new uint16) uint16 {
	sum := uint32(^hc) + uint32(^old) + uint32(new)
	return ^fold(uint64(sum))
}

// UpdateChecksumWord patches the checksum stored big-endian in field (2
// bytes) after a 16-bit word of the data it covers changed from old to
// new (RFC 1624, eqn. 3).
func UpdateChecksumWord(field []byte, old, new uint16) {
	binary.BigEndian.PutUint16(field, updateChecksum(binary.BigEndian.Uint16(field), old, new))
}
