package testbed

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"
)

// The bed's dual-stack pieces without tulled: hosts reach each other over
// the IPv6 underlay, and a container built as Docker would with
// --fixed-cidr-v6 is reached from its host over IPv6 by ping, TCP and UDP.
func TestIPv6UnderlayAndContainerIPv6(t *testing.T) {
	RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b := NewT(t, Options{Hosts: 2, NoEtcd: true})
	h1, h2 := b.Host(1), b.Host(2)
	for _, h := range []*Host{h1, h2} {
		if _, err := h.AddIPv6Underlay(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if h2.Addr6 != netip.MustParseAddr("2001:db8:ffff::2") {
		t.Fatalf("host 2's IPv6 underlay address %s", h2.Addr6)
	}
	if _, err := h1.Ping(ctx, h2.Addr6, 2); err != nil {
		t.Fatal(err)
	}

	c, err := h1.AddContainer(ctx, "v", netip.MustParsePrefix("198.18.1.1/24"), 1472)
	if err != nil {
		t.Fatal(err)
	}
	if err := h1.AddContainerIPv6(ctx, c, netip.MustParsePrefix("2001:db8:1:1::1/64")); err != nil {
		t.Fatal(err)
	}
	if c.Addr6 != netip.MustParseAddr("2001:db8:1:1::2") || c.Gateway6.Addr() != netip.MustParseAddr("2001:db8:1:1::1") {
		t.Fatalf("container IPv6 %s via %s", c.Addr6, c.Gateway6)
	}
	if _, err := h1.Ping(ctx, c.Addr6, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := TransferTCPTo(ctx, &h1.Node, &c.Node, c.Addr6, 1<<20); err != nil {
		t.Fatal(err)
	}
	rx, err := c.ListenUDP(netip.AddrPortFrom(c.Addr6, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	tx, err := h1.ListenUDP(netip.AddrPortFrom(netip.IPv6Unspecified(), 0))
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	if _, err := tx.WriteToUDPAddrPort([]byte("six"), rx.LocalAddr().(*net.UDPAddr).AddrPort()); err != nil {
		t.Fatal(err)
	}
	_ = rx.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	n, from, err := rx.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "six" || from.Addr() != c.Gateway6.Addr() {
		t.Fatalf("UDP over IPv6: %q from %s: %v", buf[:n], from, err)
	}
}
