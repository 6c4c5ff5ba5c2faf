package tests

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/tulle-net/tulle/tests/testbed"
)

// flannelHost is a namespace on the underlay that plays a flanneld udp host:
// it holds a lease written to etcd exactly as flanneld writes it, and its
// socket is bound to port 8285 as flanneld's is.
type flannelHost struct {
	node   *testbed.Node
	subnet netip.Prefix
	sock   *net.UDPConn
}

// flannelSubnet lies in the network but far from the subnets tulled picks
// (random among the first 100 free ones).
var flannelSubnet = netip.MustParsePrefix("198.18.250.0/24")

// clusterWithFlannelHost builds the 3-host cluster plus a flannel host whose
// lease is in etcd before the Tulle hosts start, and waits until host 1
// knows it as a peer.
func clusterWithFlannelHost(t *testing.T) (*testbed.Bed, *flannelHost) {
	t.Helper()
	b := testbed.NewT(t, testbed.Options{})
	ctx := testCtx(t, 2*time.Minute)
	if err := b.WriteNetworkConfig(ctx, testbed.DefaultNetworkConfig); err != nil {
		t.Fatal(err)
	}
	fl := addFlannelHost(t, ctx, b)
	if err := b.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	if _, _, err := waitMetric(t, ctx, b.Host(1), 5*time.Second, func(v float64) bool { return v == 3 }, "tulle_peers"); err != nil {
		t.Fatalf("host 1 does not count the flannel host as a peer: %v", err)
	}
	return b, fl
}

// addFlannelHost adds a node to b's underlay that plays a flannel host:
// its lease of flannelSubnet in etcd, its socket on port 8285.
func addFlannelHost(t *testing.T, ctx context.Context, b *testbed.Bed) *flannelHost {
	t.Helper()
	node, err := b.AddNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.PutFlannelLease(ctx, flannelSubnet, node.Addr, 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	sock, err := node.ListenUDP(netip.AddrPortFrom(node.Addr, flannelPort))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sock.Close() })
	return &flannelHost{node: node, subnet: flannelSubnet, sock: sock}
}

func TestDatagramCraftedAsFlannelSendsItIsDelivered(t *testing.T) {
	b, fl := clusterWithFlannelHost(t)
	ctx := testCtx(t, time.Minute)
	c1 := container(t, b, 1)
	rx := listener(t, c1)

	// What flanneld sends for a container of its host: the bare IPv4 packet
	// (TTL already decremented by its kernel's forwarding and by flanneld)
	// as the whole payload of a datagram from port 8285 to port 8285.
	src := netip.AddrPortFrom(fl.subnet.Addr().Next().Next(), 40000)
	want := []byte("hello from a flannel host")
	pkt := innerUDP(t, src, netip.AddrPortFrom(c1.Addr, port(rx)), 62, want)
	sendTo(t, fl.sock, b.Host(1), pkt, 1)
	got, from := expectDatagram(t, rx, 5*time.Second)
	if !bytes.Equal(got, want) || from != src {
		t.Fatalf("container 1 received %q from %s, want %q from %s", got, from, want, src)
	}
	if v := metric(t, ctx, b.Host(1), "tulle_peer_receive_packets_total", "peer", fl.node.Addr.String()); v < 1 {
		t.Errorf("host 1 counted %v packets from the flannel host, want >= 1", v)
	}
}

func TestTulleSendsWhatFlannelExpects(t *testing.T) {
	b, fl := clusterWithFlannelHost(t)
	ctx := testCtx(t, time.Minute)
	h1 := b.Host(1)
	c1 := container(t, b, 1)

	capture, err := fl.node.Capture()
	if err != nil {
		t.Fatal(err)
	}
	defer capture.Close()

	// The flannel host's container pings container 1; container 1's reply
	// travels container -> host 1's kernel (TTL 64 -> 63) -> tulle0 ->
	// tulled (63 -> 62, as flanneld decrements) -> UDP to port 8285.
	peer := fl.subnet.Addr().Next().Next()
	const id, seq = 0x5151, 7
	payload := []byte("tulle speaks flannel's wire format")
	sendTo(t, fl.sock, h1, innerEcho(t, peer, c1.Addr, 62, id, seq, payload), 1)

	// 1. What the flannel host's socket on 8285 receives: the bare reply.
	_ = fl.sock.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65536)
	n, from, err := fl.sock.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("no datagram from host 1 at the flannel host: %v", err)
	}
	inner := append([]byte(nil), buf[:n]...)
	if from.Addr() != h1.Addr {
		t.Errorf("datagram from %s, want from host 1 (%s)", from, h1.Addr)
	}
	p := gopacket.NewPacket(inner, layers.LayerTypeIPv4, gopacket.Default)
	ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	icmp, _ := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
	if ip == nil || icmp == nil {
		t.Fatalf("payload is not a bare IPv4 ICMP packet: %x\n%v", inner, p)
	}
	if got, want := netip.AddrFrom4([4]byte(ip.SrcIP.To4())), c1.Addr; got != want {
		t.Errorf("inner source %s, want container 1 %s", got, want)
	}
	if got := netip.AddrFrom4([4]byte(ip.DstIP.To4())); got != peer {
		t.Errorf("inner destination %s, want %s", got, peer)
	}
	if ip.TTL != 62 {
		t.Errorf("inner TTL %d, want 62 (64 from the container, -1 host 1's forwarding, -1 tulled's send as flanneld)", ip.TTL)
	}
	if int(ip.Length) != len(inner) {
		t.Errorf("inner total length %d, datagram payload %d bytes: want exactly the packet, no header or trailer", ip.Length, len(inner))
	}
	if !ipv4HeaderChecksumOK(inner) {
		t.Errorf("inner IPv4 header checksum is wrong after the TTL decrement: %x", inner[:20])
	}
	if icmp.TypeCode.Type() != layers.ICMPv4TypeEchoReply || icmp.Id != id || icmp.Seq != seq || !bytes.Equal(icmp.Payload, payload) {
		t.Errorf("inner ICMP %v id %#x seq %d payload %q; want an echo reply id %#x seq %d payload %q",
			icmp.TypeCode, icmp.Id, icmp.Seq, icmp.Payload, id, seq, payload)
	}

	// 2. What is on the wire: outer IPv4 host 1 -> flannel host, DF, UDP to
	// port 8285, and the payload above.
	deadline := time.Now().Add(5 * time.Second)
	for {
		frame, err := capture.Next(time.Until(deadline))
		if err != nil {
			t.Fatalf("the datagram was not seen on the flannel host's link: %v", err)
		}
		fp := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
		oip, _ := fp.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		oudp, _ := fp.Layer(layers.LayerTypeUDP).(*layers.UDP)
		if oip == nil || oudp == nil || !oip.SrcIP.Equal(h1.Addr.AsSlice()) || !oip.DstIP.Equal(fl.node.Addr.AsSlice()) {
			continue
		}
		if oudp.DstPort != flannelPort {
			t.Errorf("outer UDP destination port %d, want %d", oudp.DstPort, flannelPort)
		}
		if oip.Flags&layers.IPv4DontFragment == 0 {
			t.Errorf("outer IPv4 without DF (flags %v); flannel's datagrams carry DF", oip.Flags)
		}
		if !bytes.Equal(oudp.Payload, inner) {
			t.Errorf("captured UDP payload %x differs from the received datagram %x", oudp.Payload, inner)
		}
		t.Logf("on the wire: %s:%d -> %s:%d, %d bytes of payload, inner TTL %d", oip.SrcIP, oudp.SrcPort, oip.DstIP, oudp.DstPort, len(oudp.Payload), ip.TTL)
		break
	}
	if v := metric(t, ctx, h1, "tulle_peer_transmit_packets_total", "peer", fl.node.Addr.String()); v < 1 {
		t.Errorf("host 1 counted %v packets to the flannel host, want >= 1", v)
	}
}
