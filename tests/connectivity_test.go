package tests

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

func TestHostsPingEachOtherAcrossTheOverlay(t *testing.T) {
	b := cluster(t, testbed.Options{}, "")
	ctx := testCtx(t, 2*time.Minute)
	leases := map[netip.Prefix]string{}
	for _, h := range b.Hosts {
		l := lease(t, h)
		if other, dup := leases[l]; dup {
			t.Fatalf("hosts %s and %s hold the same lease %s", other, h.Name, l)
		}
		leases[l] = h.Name
	}
	before := metric(t, ctx, b.Host(1), "tulle_peer_transmit_packets_total", "peer", b.Host(2).Addr.String())
	// Host to host: the bridge address (lease .1) of every other host; the
	// source is the sender's TUN address (lease .0).
	for _, from := range b.Hosts {
		for _, to := range b.Hosts {
			if from == to {
				continue
			}
			gw := to.Container().Gateway.Addr()
			if _, err := from.WaitReachable(ctx, gw, 10*time.Second); err != nil {
				t.Fatal(err)
			}
			if _, err := from.Ping(ctx, gw, 3); err != nil {
				t.Fatal(err)
			}
		}
	}
	after := metric(t, ctx, b.Host(1), "tulle_peer_transmit_packets_total", "peer", b.Host(2).Addr.String())
	if after-before < 3 {
		t.Errorf("host 1 counted %v packets sent to peer %s for >= 4 pings, want >= 3", after-before, b.Host(2).Addr)
	}
	if n := metric(t, ctx, b.Host(1), "tulle_peers"); n != 2 {
		t.Errorf("host 1 tulle_peers = %v, want 2", n)
	}
}

func TestContainersPingAcrossHosts(t *testing.T) {
	b := cluster(t, testbed.Options{}, "")
	ctx := testCtx(t, 2*time.Minute)
	for i := 1; i <= 3; i++ {
		for j := 1; j <= 3; j++ {
			if i != j {
				r := reach(t, ctx, container(t, b, i), container(t, b, j), 3)
				t.Logf("c%d -> c%d: %d/%d, avg %v", i, j, r.Received, r.Sent, r.AvgRTT)
			}
		}
	}
	// Large echoes, fragmented by the container at its MTU, arrive whole.
	if _, err := container(t, b, 1).Ping(ctx, container(t, b, 3).Addr, 2, "-s", "8000"); err != nil {
		t.Fatal(err)
	}
	rx := metric(t, ctx, b.Host(2), "tulle_peer_receive_packets_total", "peer", b.Host(1).Addr.String())
	if rx < 3 {
		t.Errorf("host 2 counted %v packets received from %s, want >= 3", rx, b.Host(1).Addr)
	}
}

func TestTCPTransferOf64MiBArrivesIntact(t *testing.T) {
	b := cluster(t, testbed.Options{}, "")
	ctx := testCtx(t, 3*time.Minute)
	c1, c2, c3 := container(t, b, 1), container(t, b, 2), container(t, b, 3)
	reach(t, ctx, c1, c2, 1)
	tr, err := testbed.TransferTCP(ctx, c1, c2, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("c1 -> c2: %d bytes in %v (%s), SHA-256 %x", tr.Bytes, tr.Elapsed, testbed.FormatBits(tr.BitsPerSecond()), tr.SHA256[:8])
	// The other direction, through another pair of hosts.
	reach(t, ctx, c3, c1, 1)
	tr, err = testbed.TransferTCP(ctx, c3, c1, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("c3 -> c1: %d bytes in %v (%s)", tr.Bytes, tr.Elapsed, testbed.FormatBits(tr.BitsPerSecond()))
	bytesTx := metric(t, ctx, b.Host(1), "tulle_peer_transmit_bytes_total", "peer", b.Host(2).Addr.String())
	if bytesTx < 64<<20 {
		t.Errorf("host 1 counted %v bytes sent to %s, want >= 64 MiB", bytesTx, b.Host(2).Addr)
	}
}

// udpDatagram is sequence number + length + SHA-256 of the rest + payload.
func udpDatagram(seq uint32, size int) []byte {
	d := make([]byte, size)
	binary.BigEndian.PutUint32(d, seq)
	for i := 40; i < size; i++ {
		d[i] = byte(int(seq) + i)
	}
	sum := sha256.Sum256(d[40:])
	copy(d[8:40], sum[:])
	binary.BigEndian.PutUint32(d[4:], uint32(size))
	return d
}

func checkDatagram(d []byte) (uint32, error) {
	if len(d) < 40 {
		return 0, fmt.Errorf("datagram of %d bytes, want >= 40", len(d))
	}
	seq := binary.BigEndian.Uint32(d)
	if size := binary.BigEndian.Uint32(d[4:]); int(size) != len(d) {
		return seq, fmt.Errorf("datagram %d: %d bytes, sent %d", seq, len(d), size)
	}
	sum := sha256.Sum256(d[40:])
	if !bytes.Equal(sum[:], d[8:40]) {
		return seq, fmt.Errorf("datagram %d: payload corrupted", seq)
	}
	return seq, nil
}

// sendIntact sends rounds of datagrams of each size from tx to rx, paced
// (this is about integrity, not loss under load), and checks that each
// arrives once, whole and from from.
func sendIntact(t *testing.T, tx, rx *net.UDPConn, from netip.Addr, sizes []int, rounds int) {
	t.Helper()
	dst := rx.LocalAddr().(*net.UDPAddr).AddrPort()
	want := map[uint32]int{} // sequence number -> size
	seq := uint32(0)
	for r := 0; r < rounds; r++ {
		for _, size := range sizes {
			if _, err := tx.WriteToUDPAddrPort(udpDatagram(seq, size), dst); err != nil {
				t.Fatalf("send datagram %d (%d bytes): %v", seq, size, err)
			}
			want[seq] = size
			seq++
		}
		time.Sleep(2 * time.Millisecond)
	}
	buf := make([]byte, 65536)
	_ = rx.SetReadDeadline(time.Now().Add(5 * time.Second))
	for len(want) > 0 {
		n, src, err := rx.ReadFromUDPAddrPort(buf)
		if err != nil {
			break
		}
		if src.Addr() != from {
			t.Errorf("datagram from %s, want from %s", src, from)
		}
		s, err := checkDatagram(buf[:n])
		if err != nil {
			t.Error(err)
			continue
		}
		if _, ok := want[s]; !ok {
			t.Errorf("datagram %d twice or never sent", s)
		}
		delete(want, s)
	}
	if len(want) > 0 {
		missing := map[int]int{}
		for _, size := range want {
			missing[size]++
		}
		t.Errorf("%d of %d datagrams did not arrive; missing by size: %v", len(want), int(seq), missing)
	}
}

func TestUDPDatagramsArriveIntact(t *testing.T) {
	b := cluster(t, testbed.Options{}, "")
	ctx := testCtx(t, 2*time.Minute)
	c1, c2 := container(t, b, 1), container(t, b, 2)
	reach(t, ctx, c1, c2, 1)

	rx, err := c2.ListenUDP(netip.AddrPortFrom(c2.Addr, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	_ = rx.SetReadBuffer(8 << 20)
	tx, err := c1.ListenUDP(netip.AddrPortFrom(c1.Addr, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()

	// Sizes from tiny to the largest unfragmented one (MTU 1472 - 28) and
	// beyond (IP fragments, each carried on its own and reassembled).
	mtu := b.Host(1).Container().MTU
	sendIntact(t, tx, rx, c1.Addr, []int{40, 100, 512, 1000, mtu - 28, mtu - 27, 4000, 9000}, 25)
	if drops := metric(t, ctx, b.Host(2), "tulle_dropped_packets_total", "direction", "receive"); drops != 0 {
		t.Errorf("host 2 dropped %v received packets", drops)
	}
}

func TestWaterDriverCarriesTraffic(t *testing.T) {
	// Hosts 1 and 2 use the portable water driver, host 3 the default
	// offload driver: both drivers, and each with the other.
	b := testbed.NewT(t, testbed.Options{})
	ctx := testCtx(t, 3*time.Minute)
	if err := b.WriteNetworkConfig(ctx, testbed.DefaultNetworkConfig); err != nil {
		t.Fatal(err)
	}
	for i, driver := range map[int]string{1: "water", 2: "water", 3: "offload"} {
		h := b.Host(i)
		if _, err := h.StartTulled(ctx, "--tun-driver", driver); err != nil {
			t.Fatal(err)
		}
		if _, err := h.SetupContainer(ctx); err != nil {
			t.Fatal(err)
		}
	}
	c1, c2, c3 := container(t, b, 1), container(t, b, 2), container(t, b, 3)
	reach(t, ctx, c1, c2, 3)
	reach(t, ctx, c3, c1, 3)
	for _, p := range [][2]*testbed.Node{{c1, c2}, {c1, c3}, {c3, c2}} {
		tr, err := testbed.TransferTCP(ctx, p[0], p[1], 32<<20)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s -> %s: %d bytes in %v (%s)", p[0].Name, p[1].Name, tr.Bytes, tr.Elapsed, testbed.FormatBits(tr.BitsPerSecond()))
	}

	// The driver that ran, not only the flag given: the data plane logs
	// the driver it opened, and the device shows it. The water driver opens
	// the TUN device without the virtio header (so without offloads), the
	// offload driver with it.
	for i, driver := range map[int]string{1: "water", 2: "water", 3: "offload"} {
		h := b.Host(i)
		log, err := os.ReadFile(h.LogFile)
		if err != nil {
			t.Fatal(err)
		}
		ready := regexp.MustCompile(`msg="data plane ready" .*`).Find(log)
		if want := fmt.Sprintf(" driver=%s offload=%v ", driver, driver == "offload"); !strings.Contains(string(ready), want) {
			t.Errorf("host %s: data plane log %q, want %q", h.Name, ready, want)
		}
		dev, err := h.Exec(ctx, "ip", "-d", "link", "show", "tulle0")
		if err != nil {
			t.Fatal(err)
		}
		if vnet := strings.Contains(dev, " vnet_hdr on "); vnet != (driver == "offload") {
			t.Errorf("host %s (%s driver): TUN device with vnet_hdr %v:\n%s", h.Name, driver, vnet, dev)
		}
	}
}
