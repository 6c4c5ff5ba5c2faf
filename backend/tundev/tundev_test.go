//go:build linux

package tundev_test

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/tests/nstest"
)

// waitPacket returns the first packet from ch that parses and matches, and
// fails the test on a read error, a bad checksum of a matching flow, or
// after timeout. Packets of other flows are skipped.
func waitPacket(t *testing.T, ch <-chan packet, match func(ipPacket) bool) (packet, ipPacket) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case p := <-ch:
			if p.readError != nil {
				t.Fatalf("queue %d: Read: %v", p.queue, p.readError)
			}
			ip, err := parseIP(p.data)
			if err != nil {
				continue // not ours (or broken: the matching checks catch that)
			}
			if match(ip) {
				return p, ip
			}
		case <-timeout:
			t.Fatal("no matching packet read from the device within 5 s")
		}
	}
}

func TestOffloadDeviceCarriesUDPBothWays(t *testing.T) {
	testCarriesUDPBothWays(t, tundev.DriverOffload)
}

func TestWaterDeviceCarriesUDPBothWays(t *testing.T) {
	testCarriesUDPBothWays(t, tundev.DriverWater)
}

func testCarriesUDPBothWays(t *testing.T, driver string) {
	nstest.EnterNewNetns(t)
	dev := openTUN(t, tundev.Options{Driver: driver})
	wantOffload := driver == tundev.DriverOffload
	if dev.Offload() != wantOffload || dev.Driver() != driver || len(dev.Queues()) != 1 {
		t.Fatalf("driver %s: Offload()=%v Driver()=%q queues=%d", driver, dev.Offload(), dev.Driver(), len(dev.Queues()))
	}
	if dev.Queues()[0].VirtioHeader() != wantOffload {
		t.Fatalf("driver %s: VirtioHeader() = %v", driver, !wantOffload)
	}
	t.Logf("driver %s: offload=%v udp_offload=%v", driver, dev.Offload(), dev.UDPOffload())
	packets := startReaders(t, dev)

	sock, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(tunAddr, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	local := sock.LocalAddr().(*net.UDPAddr).AddrPort()
	peer := netip.AddrPortFrom(peerAddr, 9999)

	// Out: a local datagram routed into the TUN comes out of a read.
	if _, err := sock.WriteToUDPAddrPort([]byte("hello through the tun"), peer); err != nil {
		t.Fatal(err)
	}
	_, ip := waitPacket(t, packets, func(ip ipPacket) bool { return ip.proto == 17 && ip.dst == peer })
	if ip.src != local || string(ip.payload) != "hello through the tun" {
		t.Fatalf("read %v -> %v %q", ip.src, ip.dst, ip.payload)
	}

	// In: a packet written to the TUN is delivered to the local socket.
	from := netip.AddrPortFrom(peerAddr, 7777)
	pkt := buildUDP(make([]byte, 2048), 0, from, local, []byte("hello from the peer"), 1)
	if err := newWriter(dev, dev.Queues()[0]).write(pkt); err != nil {
		t.Fatalf("write: %v", err)
	}
	sock.SetReadDeadline(time.Now().Add(5 * time.Second))
	rb := make([]byte, 2048)
	n, src, err := sock.ReadFromUDPAddrPort(rb)
	if err != nil {
		t.Fatalf("socket did not receive the written packet: %v", err)
	}
	if src != from || string(rb[:n]) != "hello from the peer" {
		t.Fatalf("socket got %q from %v", rb[:n], src)
	}
	if s := dev.Stats(); s != (tundev.Stats{}) {
		t.Errorf("Stats = %+v, want zero", s)
	}
}

func TestOffloadReadSplitsUDPSuperpacket(t *testing.T) {
	nstest.EnterNewNetns(t)
	dev := openTUN(t, tundev.Options{})
	if !dev.UDPOffload() {
		nstest.SkipMissing(t, "kernel did not accept USO (needs Linux >= 6.2)")
	}
	packets := startReaders(t, dev)
	conn, err := udpconn.Listen(netip.AddrPortFrom(tunAddr, 0), udpconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if !conn.GSO() {
		nstest.SkipMissing(t, "no UDP GSO")
	}
	peer := netip.AddrPortFrom(peerAddr, 9999)
	const seg, segs = 1000, 11
	data := bytes.Repeat([]byte("0123456789"), seg*segs/10)
	msgs := []udpconn.Message{{Buf: data, SegSize: seg, Addr: peer}}
	if _, err := conn.WriteBatch(msgs); err != nil || msgs[0].Err != 0 {
		t.Fatalf("WriteBatch: %v, Err %v", err, msgs[0].Err)
	}
	wantUSOSplit(t, packets, peer, data, seg)
}

// wantUSOSplit checks that the datagram train data (segments of seg bytes)
// sent to peer comes out of one read, split into its datagrams.
func wantUSOSplit(t *testing.T, packets <-chan packet, peer netip.AddrPort, data []byte, seg int) {
	t.Helper()
	segs := len(data) / seg
	var got []byte
	for i := 0; i < segs; i++ {
		p, ip := waitPacket(t, packets, func(ip ipPacket) bool { return ip.dst == peer })
		if p.batch != segs {
			t.Errorf("segment %d came in a read of %d packets, want all %d in one (USO split)", i, p.batch, segs)
		}
		if len(ip.payload) != seg {
			t.Fatalf("segment %d: %d bytes, want %d", i, len(ip.payload), seg)
		}
		got = append(got, ip.payload...)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("split segments do not add up to the datagram train sent")
	}
}

// TestOffloadReadSplitsUDPSuperpacketOverIPv6: an IPv6 UDP GSO send (USO6)
// comes out of one read, split into its datagrams.
func TestOffloadReadSplitsUDPSuperpacketOverIPv6(t *testing.T) {
	nstest.EnterNewNetns(t)
	dev := openTUN(t, tundev.Options{})
	if !dev.UDPOffload() {
		nstest.SkipMissing(t, "kernel did not accept USO (needs Linux >= 6.2)")
	}
	addIPv6(t, dev)
	packets := startReaders(t, dev)
	const seg, segs = 1000, 11
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_SEGMENT, seg); err != nil {
		nstest.SkipMissing(t, "no UDP GSO: "+err.Error())
	}
	peer := netip.AddrPortFrom(peerAddr6, 9999)
	data := bytes.Repeat([]byte("0123456789"), seg*segs/10)
	if err := unix.Sendto(fd, data, 0, &unix.SockaddrInet6{Port: int(peer.Port()), Addr: peer.Addr().As16()}); err != nil {
		t.Fatalf("GSO send: %v", err)
	}
	wantUSOSplit(t, packets, peer, data, seg)
}

func TestOffloadWriteCoalescesUDPSegments(t *testing.T) { testWriteCoalescesUDP(t, false) }

func TestOffloadWriteCoalescesUDPSegmentsOverIPv6(t *testing.T) { testWriteCoalescesUDP(t, true) }

func testWriteCoalescesUDP(t *testing.T, v6 bool) {
	nstest.EnterNewNetns(t)
	dev := openTUN(t, tundev.Options{})
	if !dev.UDPOffload() {
		nstest.SkipMissing(t, "kernel did not accept USO (needs Linux >= 6.2)")
	}
	network, local, peer := "udp4", tunAddr, peerAddr
	if v6 {
		addIPv6(t, dev)
		network, local, peer = "udp6", tunAddr6, peerAddr6
	}
	sock, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(local, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	to := sock.LocalAddr().(*net.UDPAddr).AddrPort()
	from := netip.AddrPortFrom(peer, 7000)
	const n = 8
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = buildUDP(make([]byte, 1048), 0, from, to, bytes.Repeat([]byte{byte('a' + i)}, 1000), uint16(i))
	}
	before := rxPackets(t, dev)
	if err := newWriter(dev, dev.Queues()[0]).write(bufs...); err != nil {
		t.Fatalf("write: %v", err)
	}
	if delta := rxPackets(t, dev) - before; delta != 1 {
		t.Errorf("the kernel received %d packets for %d same-flow UDP segments, want 1 (coalesced)", delta, n)
	}
	sock.SetReadDeadline(time.Now().Add(5 * time.Second))
	rb := make([]byte, 65536)
	for i := range n {
		k, src, err := sock.ReadFromUDPAddrPort(rb)
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		if src != from || k != 1000 || rb[0] != byte('a'+i) || rb[999] != byte('a'+i) {
			t.Fatalf("datagram %d: %d bytes from %v starting %q", i, k, src, rb[0])
		}
	}
}

func TestMultiQueueOffloadDeviceUsesEveryQueue(t *testing.T) {
	testMultiQueue(t, tundev.DriverOffload)
}

func TestMultiQueueWaterDeviceUsesEveryQueue(t *testing.T) {
	testMultiQueue(t, tundev.DriverWater)
}

func testMultiQueue(t *testing.T, driver string) {
	nstest.EnterNewNetns(t)
	dev := openTUN(t, tundev.Options{Driver: driver, Queues: 2})
	if len(dev.Queues()) != 2 {
		t.Fatalf("%d queues, want 2", len(dev.Queues()))
	}
	packets := startReaders(t, dev)
	// 32 flows (source ports): the kernel spreads them by hash.
	const flows = 32
	peer := netip.AddrPortFrom(peerAddr, 9999)
	for range flows {
		s, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(tunAddr, 0)))
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.WriteToUDPAddrPort([]byte("flow"), peer)
		s.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	perQueue := make([]int, 2)
	for range flows {
		p, _ := waitPacket(t, packets, func(ip ipPacket) bool { return ip.dst == peer })
		perQueue[p.queue]++
	}
	t.Logf("%s: %d flows read from queue 0: %d, queue 1: %d", driver, flows, perQueue[0], perQueue[1])
	if perQueue[0] == 0 || perQueue[1] == 0 {
		t.Errorf("a queue read nothing: %v", perQueue)
	}

	// Writing through the second queue delivers too.
	sock, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(tunAddr, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	pkt := buildUDP(make([]byte, 100), 0, netip.AddrPortFrom(peerAddr, 1), sock.LocalAddr().(*net.UDPAddr).AddrPort(), []byte("via queue 1"), 9)
	if err := newWriter(dev, dev.Queues()[1]).write(pkt); err != nil {
		t.Fatal(err)
	}
	sock.SetReadDeadline(time.Now().Add(5 * time.Second))
	rb := make([]byte, 100)
	if n, _, err := sock.ReadFromUDPAddrPort(rb); err != nil || string(rb[:n]) != "via queue 1" {
		t.Fatalf("read written packet: %q, %v", rb[:n], err)
	}
}

func TestCloseUnblocksRead(t *testing.T) {
	nstest.EnterNewNetns(t)
	dev := openTUN(t, tundev.Options{Queues: 2})
	done := readersBlocked(t, dev)
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		select {
		case err := <-done:
			if !errors.Is(err, os.ErrClosed) {
				t.Fatalf("ReadPacket after Close: %v, want os.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("ReadPacket still blocked 5 s after Close")
		}
	}
	if _, err := netlink.LinkByName(dev.Name()); err == nil {
		t.Error("device still exists after Close")
	}
	if err := dev.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestInterruptEndsReadsButKeepsTheDevice: Interrupt wakes blocked reads
// and later calls fail too, but the queues stay open and the device stays
// (the owner closes it once its loops have returned).
func TestInterruptEndsReadsButKeepsTheDevice(t *testing.T) {
	nstest.EnterNewNetns(t)
	dev := openTUN(t, tundev.Options{Queues: 2})
	done := readersBlocked(t, dev)
	dev.Interrupt()
	for range 2 {
		select {
		case err := <-done:
			if !errors.Is(err, os.ErrClosed) {
				t.Fatalf("ReadPacket after Interrupt: %v, want os.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("ReadPacket still blocked 5 s after Interrupt")
		}
	}
	pkt := buildUDP(make([]byte, 100), 0, netip.AddrPortFrom(peerAddr, 1), netip.AddrPortFrom(tunAddr, 9), []byte("x"), 1)
	if err := newWriter(dev, dev.Queues()[0]).write(pkt); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("write after Interrupt: %v, want os.ErrClosed", err)
	}
	if _, err := netlink.LinkByName(dev.Name()); err != nil {
		t.Fatalf("device gone after Interrupt: %v", err)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(dev.Name()); err == nil {
		t.Error("device still exists after Close")
	}
}

func TestDeletedOffloadDeviceFailsRead(t *testing.T) {
	testDeletedDeviceFailsRead(t, tundev.DriverOffload)
}

func TestDeletedWaterDeviceFailsRead(t *testing.T) {
	testDeletedDeviceFailsRead(t, tundev.DriverWater)
}

func testDeletedDeviceFailsRead(t *testing.T, driver string) {
	nstest.EnterNewNetns(t)
	dev := openTUN(t, tundev.Options{Driver: driver})
	done := readersBlocked(t, dev)
	link, err := netlink.LinkByName(dev.Name())
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkDel(link); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, tundev.ErrDeviceGone) {
			t.Fatalf("ReadPacket after the link was deleted: %v, want ErrDeviceGone", err)
		}
	case <-time.After(5 * time.Second):
		dev.Close()
		<-done
		t.Fatal("ReadPacket still blocked 5 s after the link was deleted")
	}
}

func TestOpenRejectsBadOptions(t *testing.T) {
	for _, o := range []tundev.Options{
		{Name: "this-name-is-too-long", MTU: 1400},
		{MTU: 20},
		{MTU: 1400, Queues: 300},
		{MTU: 1400, Driver: "wireguard"},
	} {
		if dev, err := tundev.Open(o); err == nil {
			dev.Close()
			t.Errorf("Open(%+v) succeeded", o)
		}
	}
}

func TestWriteRefusedByKernelIsCountedNotFatal(t *testing.T) {
	for _, driver := range []string{tundev.DriverOffload, tundev.DriverWater} {
		testWriteRefused(t, driver)
	}
}

// testWriteRefused writes a non-IP packet and a packet to a device that is
// down: the kernel refuses both, WritePacket counts them and goes on.
func testWriteRefused(t *testing.T, driver string) {
	nstest.EnterNewNetns(t)
	dev := openTUN(t, tundev.Options{Driver: driver})
	w := newWriter(dev, dev.Queues()[0])
	garbage := make([]byte, 40)
	garbage[0] = 0x10 // IP version 1
	ok := buildUDP(make([]byte, 100), 0, netip.AddrPortFrom(peerAddr, 1), netip.AddrPortFrom(tunAddr, 9), []byte("x"), 1)
	if err := w.write(garbage, ok); err != nil {
		t.Fatalf("%s: write(non-IP, valid) = %v, want nil", driver, err)
	}
	if s := dev.Stats(); s.WriteErrors != 1 {
		t.Fatalf("%s: WriteErrors = %d after a non-IP packet, want 1", driver, s.WriteErrors)
	}
	link, err := netlink.LinkByName(dev.Name())
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetDown(link); err != nil {
		t.Fatal(err)
	}
	if err := w.write(ok); err != nil {
		t.Fatalf("%s: write to a down device = %v, want nil", driver, err)
	}
	if s := dev.Stats(); s.WriteErrors != 2 {
		t.Fatalf("%s: WriteErrors = %d after a write to a down device, want 2", driver, s.WriteErrors)
	}
}
