package proto_test

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/tulle-net/tulle/proto"
)

func ipv6Packet(t testing.TB, src, dst string, payload []byte) []byte {
	t.Helper()
	ip := &layers.IPv6{
		Version:    6,
		HopLimit:   64,
		NextHeader: layers.IPProtocolUDP,
		SrcIP:      netip.MustParseAddr(src).AsSlice(),
		DstIP:      netip.MustParseAddr(dst).AsSlice(),
	}
	udp := &layers.UDP{SrcPort: 4000, DstPort: 5000}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		t.Fatal(err)
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, ip, udp, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestCheckIPv6ReadsAddressesAndRejectsTruncated(t *testing.T) {
	pkt := ipv6Packet(t, "2001:db8::1", "2001:db8:0:2::7", make([]byte, 30))
	total, err := proto.CheckIPv6(pkt)
	if err != nil || total != 40+8+30 {
		t.Fatalf("CheckIPv6 = %d, %v", total, err)
	}
	if proto.IPv6SrcAddr(pkt) != netip.MustParseAddr("2001:db8::1") || proto.IPv6DstAddr(pkt) != netip.MustParseAddr("2001:db8:0:2::7") {
		t.Errorf("addresses %v %v", proto.IPv6SrcAddr(pkt), proto.IPv6DstAddr(pkt))
	}
	if _, err := proto.CheckIPv6(pkt[:len(pkt)-1]); !errors.Is(err, proto.ErrShort) {
		t.Errorf("truncated: %v", err)
	}
	if _, err := proto.CheckIPv6(ipv4Packet(t, "198.18.1.1", "198.18.1.2", 1, false, make([]byte, 40))); !errors.Is(err, proto.ErrVersion) {
		t.Errorf("IPv4 as IPv6: %v", err)
	}
	if !proto.DecrementHopLimit(pkt) || proto.IPv6HopLimit(pkt) != 63 {
		t.Error("hop limit not decremented")
	}
}

func TestICMPv6PacketTooBigVerifies(t *testing.T) {
	pkt := ipv6Packet(t, "2001:db8::1", "2001:db8:0:2::7", make([]byte, 1400))
	buf := make([]byte, proto.IPv6MinMTU)
	from := netip.MustParseAddr("2001:db8:0:2::7").As16()
	n, err := proto.ICMPv6PacketTooBig(buf, from, pkt, 1400)
	if err != nil {
		t.Fatal(err)
	}
	if n != proto.IPv6MinMTU {
		t.Errorf("length %d, want %d (quote up to the minimum MTU)", n, proto.IPv6MinMTU)
	}
	p := gopacket.NewPacket(buf[:n], layers.LayerTypeIPv6, gopacket.Default)
	icmp, _ := p.Layer(layers.LayerTypeICMPv6).(*layers.ICMPv6)
	if icmp == nil {
		t.Fatalf("no ICMPv6 layer: %v", p)
	}
	if icmp.TypeCode.Type() != layers.ICMPv6TypePacketTooBig {
		t.Errorf("type %v", icmp.TypeCode)
	}
	// Verify the checksum independently: sum over pseudo-header + message is 0.
	var pseudo []byte
	pseudo = append(pseudo, buf[8:40]...)
	pseudo = append(pseudo, 0, 0, byte((n-40)>>8), byte(n-40), 0, 0, 0, proto.ProtoICMPv6)
	if proto.Checksum(append(pseudo, buf[40:n]...), 0) != 0 {
		t.Error("ICMPv6 checksum does not verify")
	}
	if proto.IPv6DstAddr(buf) != netip.MustParseAddr("2001:db8::1") {
		t.Errorf("dst %v", proto.IPv6DstAddr(buf))
	}
	if proto.ICMPv6ErrorAllowed(buf[:n]) {
		t.Error("an ICMPv6 error must not be answerable")
	}
}

func FuzzCheckIPv6(f *testing.F) {
	f.Add(ipv6Packet(f, "2001:db8::1", "2001:db8::2", []byte("x")))
	f.Fuzz(func(t *testing.T, b []byte) {
		total, err := proto.CheckIPv6(b)
		if err != nil {
			return
		}
		if total > len(b) || total < 40 {
			t.Fatalf("total %d len %d", total, len(b))
		}
		buf := make([]byte, proto.IPv6MinMTU)
		n, err := proto.ICMPv6PacketTooBig(buf, [16]byte{0x20, 0x01, 0x0d, 0xb8, 15: 1}, b, 1300)
		if err == nil {
			if tot, cerr := proto.CheckIPv6(buf[:n]); cerr != nil || tot != n || n > proto.IPv6MinMTU {
				t.Fatalf("built message: %d %v n=%d", tot, cerr, n)
			}
		}
	})
}
