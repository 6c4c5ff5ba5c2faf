package ipmasq

import (
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/nstest"
)

// The masquerade test network; the rules run in "host":
//
//	[container] 198.18.79.2 --- 198.18.79.1 [host] 192.0.2.1 --- 192.0.2.2 [outside]
//	                                        [host] 198.18.80.1 --- 198.18.80.2 [peer]
//
// outside has no route back to 198.18.0.0/16, so only a masqueraded
// datagram can even be answered; peer stands for a container on another
// host of the overlay.
const masqNamespacesEnv = "TULLE_IPMASQ_TEST_NETNS" // "host,container,outside,peer"

func TestContainerTrafficIsMasqueradedOnlyWhenLeavingTheOverlay(t *testing.T) {
	if !nstest.InChild() {
		host := nstest.NewNetns(t)
		container, outside, peer := nstest.NewNetns(t), nstest.NewNetns(t), nstest.NewNetns(t)
		host.Veth(t, "198.18.79.1/24", container, "198.18.79.2/24")
		host.Veth(t, "192.0.2.1/24", outside, "192.0.2.2/24")
		host.Veth(t, "198.18.80.1/24", peer, "198.18.80.2/24")
		container.DefaultRoute(t, "198.18.79.1")
		peer.DefaultRoute(t, "198.18.80.1")
		t.Setenv(masqNamespacesEnv, host.Name+","+container.Name+","+outside.Name+","+peer.Name)
		host.RunTestInNetns(t, t.Name())
		return
	}
	names := strings.Split(os.Getenv(masqNamespacesEnv), ",")
	if len(names) != 4 {
		t.Fatalf("%s=%q", masqNamespacesEnv, os.Getenv(masqNamespacesEnv))
	}
	hostNS, containerNS, outsideNS, peerNS := names[0], names[1], names[2], names[3]
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := New(network, lease, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Ensure(); err != nil {
		t.Fatal(err)
	}

	// source sends one datagram from srcNS (bound to bind, if valid) to dst
	// in dstNS and returns the source address dstNS sees.
	source := func(srcNS string, bind netip.Addr, dstNS string, dst netip.AddrPort) netip.Addr {
		t.Helper()
		var rx *net.UDPConn
		if err := nstest.Do(dstNS, func() (err error) {
			rx, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(dst))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer rx.Close()
		var tx *net.UDPConn
		if err := nstest.Do(srcNS, func() (err error) {
			var laddr *net.UDPAddr
			if bind.IsValid() {
				laddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(bind, 0))
			}
			tx, err = net.ListenUDP("udp4", laddr)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer tx.Close()
		if _, err := tx.WriteToUDPAddrPort([]byte("hello"), dst); err != nil {
			t.Fatal(err)
		}
		_ = rx.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 64)
		_, from, err := rx.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("%s -> %s: nothing arrived: %v", srcNS, dst, err)
		}
		return from.Addr()
	}

	if got := source(containerNS, netip.Addr{}, outsideNS, netip.MustParseAddrPort("192.0.2.2:5000")); got != netip.MustParseAddr("192.0.2.1") {
		t.Errorf("container -> outside arrived from %s, want the host's 192.0.2.1 (masqueraded)", got)
	}
	if got := source(containerNS, netip.Addr{}, peerNS, netip.MustParseAddrPort("198.18.80.2:5001")); got != netip.MustParseAddr("198.18.79.2") {
		t.Errorf("container -> overlay peer arrived from %s, want the container's own 198.18.79.2", got)
	}
	// The host itself, from its underlay address, to a remote container:
	// masqueraded to an overlay address the peer can answer.
	if got := source(hostNS, netip.MustParseAddr("192.0.2.1"), peerNS, netip.MustParseAddrPort("198.18.80.2:5002")); got != netip.MustParseAddr("198.18.80.1") {
		t.Errorf("host (192.0.2.1) -> overlay peer arrived from %s, want 198.18.80.1 (masqueraded)", got)
	}

	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	if got := source(containerNS, netip.Addr{}, outsideNS, netip.MustParseAddrPort("192.0.2.2:5003")); got != netip.MustParseAddr("198.18.79.2") {
		t.Errorf("after Remove: container -> outside arrived from %s, want 198.18.79.2 (no masquerade left)", got)
	}
}
