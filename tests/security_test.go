package tests

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

const flannelPort = 8285

// listener opens a UDP socket in node n on an ephemeral port.
func listener(t *testing.T, n *testbed.Node) *net.UDPConn {
	t.Helper()
	return listenerOn(t, n, n.Addr)
}

// listenerOn opens a UDP socket in node n on its address addr, ephemeral
// port, closed when the test ends.
func listenerOn(t *testing.T, n *testbed.Node, addr netip.Addr) *net.UDPConn {
	t.Helper()
	c, err := n.ListenUDP(netip.AddrPortFrom(addr, 0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func port(c *net.UDPConn) uint16 { return c.LocalAddr().(*net.UDPAddr).AddrPort().Port() }

// expectNothing fails if c receives a datagram within d.
func expectNothing(t *testing.T, c *net.UDPConn, d time.Duration, why string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 2048)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err == nil {
		t.Fatalf("%s: the container received %q from %s", why, buf[:n], from)
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal(err)
	}
}

// expectDatagram waits up to d for one datagram on c and returns it and
// its source.
func expectDatagram(t *testing.T, c *net.UDPConn, d time.Duration) ([]byte, netip.AddrPort) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 65536)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("no datagram within %v: %v", d, err)
	}
	return buf[:n], from
}

// sendTo sends payload from conn to host h's port 8285.
func sendTo(t *testing.T, conn *net.UDPConn, h *testbed.Host, payload []byte, count int) {
	t.Helper()
	dst := netip.AddrPortFrom(h.Addr, flannelPort)
	for i := 0; i < count; i++ {
		if _, err := conn.WriteToUDPAddrPort(payload, dst); err != nil {
			t.Fatalf("send to %s: %v", dst, err)
		}
	}
}

func dropped(t *testing.T, ctx context.Context, h *testbed.Host, reason string) float64 {
	t.Helper()
	return metric(t, ctx, h, "tulle_dropped_packets_total", "direction", "receive", "reason", reason)
}

func TestDatagramFromNonPeerIsDroppedAndCounted(t *testing.T) {
	b := cluster(t, testbed.Options{}, "")
	ctx := testCtx(t, time.Minute)
	h1 := b.Host(1)
	c1, c2 := container(t, b, 1), container(t, b, 2)
	rx := listener(t, c1)

	// A namespace on the underlay that holds no lease sends what looks like
	// container 2's traffic, from flannel's port, to host 1.
	stranger, err := b.AddNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := stranger.ListenUDP(netip.AddrPortFrom(stranger.Addr, flannelPort))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	before := dropped(t, ctx, h1, "unknown_sender")
	const n = 5
	pkt := innerUDP(t, netip.AddrPortFrom(c2.Addr, 4000), netip.AddrPortFrom(c1.Addr, port(rx)), 62, []byte("from a stranger"))
	sendTo(t, conn, h1, pkt, n)

	if v, took, err := waitMetric(t, ctx, h1, 5*time.Second, func(v float64) bool { return v >= before+n },
		"tulle_dropped_packets_total", "direction", "receive", "reason", "unknown_sender"); err != nil {
		t.Fatalf("unknown_sender drops %v -> %v, want +%d: %v", before, v, n, err)
	} else {
		t.Logf("host 1 counted %v unknown_sender drops (%v)", v-before, took)
	}
	expectNothing(t, rx, time.Second, "datagram from a non-peer")
}

func TestSpoofedInnerSourceIsDroppedAndCounted(t *testing.T) {
	b := cluster(t, testbed.Options{}, "")
	ctx := testCtx(t, time.Minute)
	h1 := b.Host(1)
	c1, c2, c3 := container(t, b, 1), container(t, b, 2), container(t, b, 3)
	rx := listener(t, c1)

	// Host 2 is a peer (it holds a lease), and sends from an ordinary port:
	// a receiver must not care about the source port.
	h2sock, err := b.Host(2).ListenUDP(netip.AddrPortFrom(b.Host(2).Addr, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer h2sock.Close()
	dstC1 := netip.AddrPortFrom(c1.Addr, port(rx))

	t.Run("inner source in the sender's own subnet is delivered", func(t *testing.T) {
		want := []byte("genuine, from container 2")
		pkt := innerUDP(t, netip.AddrPortFrom(c2.Addr, 4001), dstC1, 62, want)
		sendTo(t, h2sock, h1, pkt, 1)
		got, from := expectDatagram(t, rx, 5*time.Second)
		if string(got) != string(want) || from != netip.AddrPortFrom(c2.Addr, 4001) {
			t.Fatalf("received %q from %s, want %q from %s:4001", got, from, want, c2.Addr)
		}
	})

	t.Run("inner source in another host's subnet is dropped", func(t *testing.T) {
		before := dropped(t, ctx, h1, "spoofed_source")
		const n = 5
		pkt := innerUDP(t, netip.AddrPortFrom(c3.Addr, 4002), dstC1, 62, []byte("host 2 pretending to be container 3"))
		sendTo(t, h2sock, h1, pkt, n)
		if v, _, err := waitMetric(t, ctx, h1, 5*time.Second, func(v float64) bool { return v >= before+n },
			"tulle_dropped_packets_total", "direction", "receive", "reason", "spoofed_source"); err != nil {
			t.Fatalf("spoofed_source drops %v -> %v, want +%d: %v", before, v, n, err)
		}
		expectNothing(t, rx, time.Second, "spoofed inner source")
	})

	t.Run("inner destination outside the receiver's subnet is dropped", func(t *testing.T) {
		before := dropped(t, ctx, h1, "foreign_destination")
		// Host 1 must not relay host 2's packet to container 3.
		pkt := innerUDP(t, netip.AddrPortFrom(c2.Addr, 4003), netip.AddrPortFrom(c3.Addr, 9), 62, []byte("relay me"))
		sendTo(t, h2sock, h1, pkt, 3)
		if v, _, err := waitMetric(t, ctx, h1, 5*time.Second, func(v float64) bool { return v >= before+3 },
			"tulle_dropped_packets_total", "direction", "receive", "reason", "foreign_destination"); err != nil {
			t.Fatalf("foreign_destination drops %v -> %v, want +3: %v", before, v, err)
		}
	})
}
