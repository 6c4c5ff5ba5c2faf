package proto_test

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/tulle-net/tulle/proto"
)

// decodeICMPv4 decodes msg with gopacket and checks both checksums.
func decodeICMPv4(t *testing.T, msg []byte) (*layers.IPv4, *layers.ICMPv4) {
	t.Helper()
	p := gopacket.NewPacket(msg, layers.LayerTypeIPv4, gopacket.Default)
	if el := p.ErrorLayer(); el != nil {
		t.Fatalf("gopacket: %v", el.Error())
	}
	ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	icmp, _ := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
	if ip == nil || icmp == nil {
		t.Fatalf("not IPv4+ICMPv4: %v", p)
	}
	if !proto.IPv4HeaderChecksumValid(msg) {
		t.Error("IPv4 header checksum invalid")
	}
	if err, res := icmp.VerifyChecksum(); err != nil || !res.Valid {
		t.Errorf("ICMP checksum: %v %+v", err, res)
	}
	return ip, icmp
}

func TestICMPv4FragmentationNeededQuotesHeaderAndCarriesMTU(t *testing.T) {
	pkt := ipv4Packet(t, "198.18.1.5", "198.18.2.7", 63, true, make([]byte, 1400))
	from := [4]byte{198, 18, 2, 7}
	buf := make([]byte, 100)
	n, err := proto.ICMPv4FragmentationNeeded(buf, from, pkt, 1372)
	if err != nil {
		t.Fatal(err)
	}
	if n != 20+8+28 {
		t.Errorf("length %d, want 56", n)
	}
	ip, icmp := decodeICMPv4(t, buf[:n])
	if !ip.SrcIP.Equal(from[:]) || !ip.DstIP.Equal(netip.MustParseAddr("198.18.1.5").AsSlice()) {
		t.Errorf("addresses %v -> %v", ip.SrcIP, ip.DstIP)
	}
	if icmp.TypeCode != layers.CreateICMPv4TypeCode(3, 4) {
		t.Errorf("type/code %v", icmp.TypeCode)
	}
	if mtu := binary.BigEndian.Uint16(buf[20+6:]); mtu != 1372 {
		t.Errorf("next-hop MTU %d, want 1372", mtu)
	}
	if string(icmp.Payload) != string(pkt[:28]) {
		t.Errorf("quote % x, want % x", icmp.Payload, pkt[:28])
	}
}

func TestICMPv4TimeExceededAndUnreachableDecode(t *testing.T) {
	pkt := ipv4Packet(t, "198.18.1.5", "198.18.9.1", 1, false, []byte("abc"))
	buf := make([]byte, 100)
	n, err := proto.ICMPv4TimeExceeded(buf, [4]byte{198, 18, 9, 1}, pkt)
	if err != nil {
		t.Fatal(err)
	}
	_, icmp := decodeICMPv4(t, buf[:n])
	if icmp.TypeCode != layers.CreateICMPv4TypeCode(11, 0) {
		t.Errorf("type/code %v", icmp.TypeCode)
	}
	n, err = proto.ICMPv4DestinationUnreachable(buf, [4]byte{198, 18, 9, 1}, pkt, proto.ICMPv4CodeHostUnreach)
	if err != nil {
		t.Fatal(err)
	}
	_, icmp = decodeICMPv4(t, buf[:n])
	if icmp.TypeCode != layers.CreateICMPv4TypeCode(3, 1) {
		t.Errorf("type/code %v", icmp.TypeCode)
	}
	if len(icmp.Payload) != 20+8 {
		t.Errorf("quote is %d bytes, want header + 8 = 28", len(icmp.Payload))
	}
	short := pkt[:23] // header + 3 bytes of payload
	binary.BigEndian.PutUint16(short[2:], 23)
	binary.BigEndian.PutUint16(short[10:], 0)
	binary.BigEndian.PutUint16(short[10:], proto.IPv4HeaderChecksum(short[:20]))
	n, err = proto.ICMPv4TimeExceeded(buf, [4]byte{198, 18, 9, 1}, short)
	if err != nil {
		t.Fatal(err)
	}
	if n != 20+8+23 || string(buf[28:n]) != string(short) {
		t.Errorf("quote of a 23-byte packet: %d bytes, want the whole packet", n-28)
	}
}

func TestICMPv4ErrorIsNotSentAboutErrorsFragmentsOrBroadcast(t *testing.T) {
	buf := make([]byte, 100)
	from := [4]byte{198, 18, 2, 7}
	icmpErr := make([]byte, 100)
	n, err := proto.ICMPv4TimeExceeded(icmpErr, from, ipv4Packet(t, "198.18.1.5", "198.18.2.7", 1, false, nil))
	if err != nil {
		t.Fatal(err)
	}
	fragment := ipv4Packet(t, "198.18.1.5", "198.18.2.7", 64, false, make([]byte, 64))
	binary.BigEndian.PutUint16(fragment[6:], 10) // offset 80 bytes
	cases := map[string][]byte{
		"an ICMP error":        icmpErr[:n],
		"a non-first fragment": fragment,
		"a broadcast":          ipv4Packet(t, "198.18.1.5", "255.255.255.255", 64, false, nil),
		"a multicast":          ipv4Packet(t, "198.18.1.5", "224.0.0.1", 64, false, nil),
		"from 0.0.0.0":         ipv4Packet(t, "0.0.0.0", "198.18.2.7", 64, false, nil),
		"malformed":            {0x45, 0, 0},
	}
	for name, pkt := range cases {
		if _, err := proto.ICMPv4FragmentationNeeded(buf, from, pkt, 1400); !errors.Is(err, proto.ErrNoICMPError) {
			t.Errorf("%s: err = %v, want ErrNoICMPError", name, err)
		}
	}
	echo := ipv4Packet(t, "198.18.1.5", "198.18.2.7", 64, false, nil)
	echo[9] = proto.ProtoICMP
	echo[20] = proto.ICMPv4TypeEchoRequest
	if !proto.ICMPv4ErrorAllowed(echo) {
		t.Error("an echo request must be answerable with an error")
	}
	if _, err := proto.ICMPv4FragmentationNeeded(buf[:40], from, echo, 1400); !errors.Is(err, proto.ErrShortBuffer) {
		t.Errorf("short buffer: err = %v", err)
	}
}

func TestICMPv4BuildDoesNotAllocate(t *testing.T) {
	pkt := ipv4Packet(t, "198.18.1.5", "198.18.2.7", 63, true, make([]byte, 1400))
	buf := make([]byte, 100)
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := proto.ICMPv4FragmentationNeeded(buf, [4]byte{198, 18, 2, 7}, pkt, 1372); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("allocs = %v", allocs)
	}
}

func BenchmarkICMPv4FragmentationNeeded(b *testing.B) {
	pkt := ipv4Packet(b, "198.18.1.5", "198.18.2.7", 63, true, make([]byte, 1400))
	buf := make([]byte, 100)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := proto.ICMPv4FragmentationNeeded(buf, [4]byte{198, 18, 2, 7}, pkt, 1372); err != nil {
			b.Fatal(err)
		}
	}
}

func FuzzICMPv4Error(f *testing.F) {
	f.Add(ipv4Packet(f, "198.18.1.5", "198.18.2.7", 63, true, make([]byte, 40)), uint16(1372))
	f.Add([]byte{0x46, 0, 0, 24, 0, 0, 0, 0, 1, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 1, 1, 1}, uint16(0))
	f.Fuzz(func(t *testing.T, pkt []byte, mtu uint16) {
		buf := make([]byte, 128)
		n, err := proto.ICMPv4FragmentationNeeded(buf, [4]byte{198, 18, 0, 1}, pkt, int(mtu))
		if err != nil {
			if proto.ICMPv4ErrorAllowed(pkt) && !errors.Is(err, proto.ErrShortBuffer) {
				t.Fatalf("allowed packet refused: %v", err)
			}
			return
		}
		total, cerr := proto.CheckIPv4(buf[:n])
		if cerr != nil || total != n || !proto.IPv4HeaderChecksumValid(buf[:n]) {
			t.Fatalf("built message does not check: %v total %d n %d", cerr, total, n)
		}
		if proto.Checksum(buf[20:n], 0) != 0 {
			t.Fatal("ICMP checksum does not verify")
		}
		if proto.IPv4Dst(buf) != proto.IPv4Src(pkt) {
			t.Fatal("not addressed to the packet's source")
		}
		if proto.ICMPv4ErrorAllowed(buf[:n]) {
			t.Fatal("an ICMP error must not itself be answerable")
		}
	})
}
