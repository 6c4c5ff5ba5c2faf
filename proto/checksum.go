package proto

import (
	"encoding/binary"
	"math/bits"
)

// The Internet checksum (RFC 1071) is a ones' complement sum of 16-bit
// words. It is the same whatever the byte order the words are added in, as
// long as the result is swapped back at the end (RFC 1071 2.B), so the hot
// loop adds 64-bit native-order words with carry: 8 bytes per add instead
// of 2. Partial sums handed between functions (the uint64 "unfolded" sums
// below) are in network byte order, 16-bit-foldable.

// sumNative adds b to the native-order accumulator ac with end-around carry.
// Odd trailing bytes are padded with zero on the right (in network order).
func sumNative(b []byte, ac uint64) uint64 {
	var c uint64
	for len(b) >= 64 {
		ac, c = bits.Add64(ac, binary.NativeEndian.Uint64(b[0:8]), 0)
		ac, c = bits.Add64(ac, binary.NativeEndian.Uint64(b[8:16]), c)
		ac, c = bits.Add64(ac, binary.NativeEndian.Uint64(b[16:24]), c)
		ac, c = bits.Add64(ac, binary.NativeEndian.Uint64(b[24:32]), c)
		ac, c = bits.Add64(ac, binary.NativeEndian.Uint64(b[32:40]), c)
		ac, c = bits.Add64(ac, binary.NativeEndian.Uint64(b[40:48]), c)
		ac, c = bits.Add64(ac, binary.NativeEndian.Uint64(b[48:56]), c)
		ac, c = bits.Add64(ac, binary.NativeEndian.Uint64(b[56:64]), c)
		ac += c // cannot overflow: ac <= 2^64-2 after an add that carried
		b = b[64:]
	}
	for len(b) >= 8 {
		ac, c = bits.Add64(ac, binary.NativeEndian.Uint64(b), 0)
		ac += c
		b = b[8:]
	}
	if len(b) >= 4 {
		ac, c = bits.Add64(ac, uint64(binary.NativeEndian.Uint32(b)), 0)
		ac += c
		b = b[4:]
	}
	if len(b) >= 2 {
		ac, c = bits.Add64(ac, uint64(binary.NativeEndian.Uint16(b)), 0)
		ac += c
		b = b[2:]
	}
	if len(b) == 1 {
		var last [2]byte
		last[0] = b[0]
		ac, c = bits.Add64(ac, uint64(binary.NativeEndian.Uint16(last[:])), 0)
		ac += c
	}
	return ac
}

// fold64 folds a 64-bit ones' complement sum to 16 bits.
func fold64(ac uint64) uint16 {
	ac = (ac >> 32) + (ac & 0xffffffff) // <= 2^33
	ac = (ac >> 16) + (ac & 0xffff)     // <= 2^17 + ...
	ac = (ac >> 16) + (ac & 0xffff)
	ac = (ac >> 16) + (ac & 0xffff)
	return uint16(ac)
}

// nativeToNet converts a folded native-order 16-bit sum to network order.
func nativeToNet(s uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], s)
	return binary.BigEndian.Uint16(b[:])
}

// netToNative is the inverse of nativeToNet.
func netToNative(s uint16) uint16 { return nativeToNet(s) }

// onesSum adds b as big-endian 16-bit words (an odd last byte padded with
// zero) to sum, a network-order partial sum, and returns the new partial
// sum (folded to 16 bits, so callers may keep adding to it).
func onesSum(b []byte, sum uint64) uint64 {
	ac := uint64(netToNative(fold(sum)))
	return uint64(nativeToNet(fold64(sumNative(b, ac))))
}

// fold reduces a sum of 16- and 32-bit words to a 16-bit ones' complement sum.
func fold(sum uint64) uint16 {
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

// Checksum returns the Internet checksum (RFC 1071) of b, seeded with the
// unfolded partial sum initial (0, or a pseudo-header sum such as
// PseudoHeaderSum returns): the value to store in a checksum field.
func Checksum(b []byte, initial uint64) uint16 {
	return ^fold(onesSum(b, initial))
}

// Sum returns the ones' complement sum of b added to initial, folded to 16
// bits and not inverted: the form a partial checksum is kept in (Linux's
// CHECKSUM_PARTIAL convention stores the folded pseudo-header sum in the
// checksum field; a checksum over data whose field holds such a sum yields
// the complete checksum).
func Sum(b []byte, initial uint64) uint16 {
	return fold(onesSum(b, initial))
}

// PseudoHeaderSum returns the folded ones' complement sum of the IPv4
// pseudo-header (RFC 793 3.1, RFC 768) for a transport segment of length
// bytes with protocol proto between src and dst.
func PseudoHeaderSum(src, dst [4]byte, proto uint8, length int) uint16 {
	s := uint64(binary.BigEndian.Uint16(src[0:2])) + uint64(binary.BigEndian.Uint16(src[2:4])) +
		uint64(binary.BigEndian.Uint16(dst[0:2])) + uint64(binary.BigEndian.Uint16(dst[2:4])) +
		uint64(proto) + uint64(length)
	return fold(s)
}

// AddSums adds two folded ones' complement sums.
func AddSums(a, b uint16) uint16 { return fold(uint64(a) + uint64(b)) }
