package udp

import (
	"encoding/binary"

	"github.com/tulle-net/tulle/proto"
)

// Partial-checksum mark. Between two Tulle hosts whose leases both
// advertise FeaturePartialChecksum, a TCP or UDP packet whose transport
// checksum the sender's kernel left partial (CHECKSUM_PARTIAL: the field
// holds the pseudo-header sum) is sent as it is, with the reserved bit of
// the inner IPv4 flags set (RFC 791: must be zero, so it is free inside
// the tunnel). The receiver clears the bit and hands the packet to its
// kernel as partial (virtio NEEDS_CSUM), which completes or trusts it as it
// would a local packet: neither host sums the payload, and the outer UDP
// checksum covers the packet on the wire. A packet whose checksum is
// complete is sent unmarked and verified as always, so nothing that was
// corrupt before it reached the sender is ever made to look valid.
//
// The mark is a promise of the sending Tulle host, so both ends check it:
//   - a sender clears the reserved bit of every packet it forwards unless
//     it set the bit itself (an application or a raw socket may set it);
//   - a receiver honours the mark only when both leases, the sender's and
//     its own, advertise the feature (partialWith). A host run with
//     --partial-checksums=false takes the feature out of its lease and so
//     never takes a marked packet as partial, whatever the sender claims:
//     the packet keeps its bit and its checksum, and the kernel verifies it.
//
// IPv6 has no free bit in its fixed header (the flow label and traffic
// class are the application's and the network's), so the mark takes a
// field that is redundant inside a datagram instead: the payload length,
// which the datagram's own length tells. A marked IPv6 packet carries
// payload length 0 and is longer than its fixed header; the receiver
// writes the length back. No packet Tulle forwards unmarked looks so: the
// sender trims every packet to 40 + its payload length (a jumbogram, the
// only other IPv6 packet with payload length 0, is beyond 64 KiB and never
// in a datagram). A marked packet is honoured under the same rule as an
// IPv4 one; one that is not (a receiver without the feature) has a
// payload length that does not match its size and is dropped as
// malformed. So inner IPv6 travels with partial checksums between Tulle
// hosts too, and no byte of the packet is taken from its owner.
const markBit = 0x80 // in IPv4 header byte 6 (flags)

// partialWith reports whether packets to and from p may carry partial
// checksums: p's lease and ours (as p sees it) both advertise
// FeaturePartialChecksum. The TX loop marks, and the RX loop honours marks,
// only then.
func (b *Backend) partialWith(p *peer) bool {
	return p.partialCsum.Load() && b.ownPartial.Load()
}

// setMark sets the mark on the IPv4 header h and fixes its checksum.
func setMark(h []byte) {
	if !marked(h) {
		toggleMark(h)
	}
}

// clearMark clears the mark and fixes the checksum.
func clearMark(h []byte) {
	if marked(h) {
		toggleMark(h)
	}
}

func toggleMark(h []byte) {
	old := uint16(h[6])<<8 | uint16(h[7])
	h[6] ^= markBit
	proto.UpdateChecksumWord(h[10:12], old, uint16(h[6])<<8|uint16(h[7]))
}

// marked reports whether the IPv4 header h carries the mark.
func marked(h []byte) bool { return h[6]&markBit != 0 }

// partialTransport reports whether the IPv4 packet pkt (checked, exactly
// its total length) may carry a partial transport checksum: unfragmented
// TCP or UDP with room for the transport header.
func partialTransport(pkt []byte) bool {
	ihl := proto.IPv4HeaderLength(pkt)
	if proto.IPv4IsFragment(pkt) {
		return false
	}
	switch proto.IPv4Protocol(pkt) {
	case proto.ProtoTCP:
		return len(pkt) >= ihl+proto.TCPHeaderLen
	case proto.ProtoUDP:
		return len(pkt) >= ihl+proto.UDPHeaderLen
	}
	return false
}

// markIPv6 marks the IPv6 header h (payload length 0): its transport
// checksum is partial.
func markIPv6(h []byte) { h[4], h[5] = 0, 0 }

// markedIPv6 reports whether the IPv6 packet pkt (at least its fixed
// header) carries the mark: payload length 0 and more than the header.
func markedIPv6(pkt []byte) bool {
	return pkt[4] == 0 && pkt[5] == 0 && len(pkt) > proto.IPv6HeaderLen
}

// unmarkIPv6 writes the payload length of the marked IPv6 packet pkt back.
func unmarkIPv6(pkt []byte) {
	binary.BigEndian.PutUint16(pkt[4:6], uint16(len(pkt)-proto.IPv6HeaderLen))
}

// partialTransport6 reports whether the IPv6 packet pkt may carry a
// partial transport checksum: TCP or UDP right after the fixed header (the
// kernel sends no partial checksum behind extension headers to a TUN, and
// the receiver's virtio header needs the offset) with room for its header.
func partialTransport6(pkt []byte) bool {
	switch proto.IPv6NextHeader(pkt) {
	case proto.ProtoTCP:
		return len(pkt) >= proto.IPv6HeaderLen+proto.TCPHeaderLen
	case proto.ProtoUDP:
		return len(pkt) >= proto.IPv6HeaderLen+proto.UDPHeaderLen
	}
	return false
}

// transportAt returns where the transport header and its checksum field
// start in pkt, a packet accepted as partial (partialTransport or
// partialTransport6 held).
func transportAt(pkt []byte) (start, csumOffset int) {
	if proto.Version(pkt) == 6 {
		return proto.IPv6HeaderLen, proto.TransportChecksumOffset(proto.IPv6NextHeader(pkt))
	}
	return proto.IPv4HeaderLength(pkt), proto.TransportChecksumOffset(proto.IPv4Protocol(pkt))
}
