package tests

import (
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// serialize builds a packet with lengths and checksums filled in.
func serialize(t *testing.T, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatalf("build packet: %v", err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

func ipv4Header(src, dst netip.Addr, ttl uint8, proto layers.IPProtocol) *layers.IPv4 {
	return &layers.IPv4{
		Version:  4,
		IHL:      5,
		Id:       0x7411,
		Flags:    layers.IPv4DontFragment,
		TTL:      ttl,
		Protocol: proto,
		SrcIP:    src.AsSlice(),
		DstIP:    dst.AsSlice(),
	}
}

// innerUDP is a bare IPv4+UDP packet, as the kernel of a flannel host hands
// it to flanneld (and flanneld puts it, TTL decremented, into its datagram).
func innerUDP(t *testing.T, src netip.AddrPort, dst netip.AddrPort, ttl uint8, payload []byte) []byte {
	t.Helper()
	ip := ipv4Header(src.Addr(), dst.Addr(), ttl, layers.IPProtocolUDP)
	udp := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		t.Fatal(err)
	}
	return serialize(t, ip, udp, gopacket.Payload(payload))
}

// innerEcho is a bare IPv4 ICMP echo request.
func innerEcho(t *testing.T, src, dst netip.Addr, ttl uint8, id, seq uint16, payload []byte) []byte {
	t.Helper()
	ip := ipv4Header(src, dst, ttl, layers.IPProtocolICMPv4)
	icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: id, Seq: seq}
	return serialize(t, ip, icmp, gopacket.Payload(payload))
}

// ipv4HeaderChecksumOK verifies the IPv4 header checksum of a raw packet.
func ipv4HeaderChecksumOK(pkt []byte) bool {
	if len(pkt) < 20 {
		return false
	}
	hl := int(pkt[0]&0x0f) * 4
	if hl < 20 || len(pkt) < hl {
		return false
	}
	var sum uint32
	for i := 0; i < hl; i += 2 {
		sum += uint32(pkt[i])<<8 | uint32(pkt[i+1])
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return sum == 0xffff
}
