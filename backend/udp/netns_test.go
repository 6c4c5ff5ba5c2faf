package udp

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
)

// twoHosts is the smallest underlay: namespaces A and B joined by a veth,
// A = 192.0.2.1/24, B = 192.0.2.2/24 and 192.0.2.3/24 (the second address
// plays a stranger).
type twoHosts struct {
	prefix string
	a, b   netns.NsHandle
	vethA  string
}

var (
	hostA    = netip.MustParseAddr("192.0.2.1")
	hostB    = netip.MustParseAddr("192.0.2.2")
	stranger = netip.MustParseAddr("192.0.2.3")
	network  = netip.MustParsePrefix("198.18.0.0/16")
	leaseA   = netip.MustParsePrefix("198.18.1.0/24")
	leaseB   = netip.MustParsePrefix("198.18.2.0/24")
)

func newTwoHosts(t testing.TB) *twoHosts {
	t.Helper()
	nstest.RequireRoot(t)
	h := &twoHosts{prefix: fmt.Sprintf("tl%d", os.Getpid()%100000)}
	h.a, h.b = nstest.NewAnonNetns(t), nstest.NewAnonNetns(t)
	h.vethA = h.prefix + "va"
	err := nstest.In(h.a, func() error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: h.vethA, MTU: 1500},
			PeerName:      h.prefix + "vb",
			PeerNamespace: netlink.NsFd(h.b),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		return setupLink(h.vethA, netip.PrefixFrom(hostA, 24))
	})
	if err == nil {
		err = nstest.In(h.b, func() error {
			return setupLink(h.prefix+"vb", netip.PrefixFrom(hostB, 24), netip.PrefixFrom(stranger, 24))
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func setupLink(name string, addrs ...netip.Prefix) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipNet(a)}); err != nil {
			return fmt.Errorf("%s: add %v: %w", name, a, err)
		}
	}
	return netlink.LinkSetUp(l)
}

// logBuffer collects a backend's log; it is printed if the test fails.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startBackend makes a Backend in ns for a Tulle host with lease own and
// public IP pub, applies peers, runs it, and stops and closes it in
// Cleanup.
func startBackend(t testing.TB, ns netns.NsHandle, name string, own netip.Prefix, pub netip.Addr, driver string, workers int, peers ...subnet.Event) *Backend {
	t.Helper()
	return startBackendLease(t, ns, name, tulleLease(own, pub).Lease, driver, workers, peers...)
}

// startBackendLease is startBackend with our own lease as given (its
// BackendData decides the features we offer).
func startBackendLease(t testing.TB, ns netns.NsHandle, name string, own subnet.Lease, driver string, workers int, peers ...subnet.Event) *Backend {
	t.Helper()
	return startBackendWith(t, ns, name, own, driver, workers, nil, peers...)
}

// startBackendWith is startBackendLease with the options changed by mods
// (dual stack, the IPv6 underlay).
func startBackendWith(t testing.TB, ns netns.NsHandle, name string, own subnet.Lease, driver string, workers int, mods []func(*Options), peers ...subnet.Event) *Backend {
	t.Helper()
	pub := own.Attrs.PublicIP
	logs := &logBuffer{}
	var b *Backend
	err := nstest.In(ns, func() error {
		opts := Options{
			TunName:   name,
			Driver:    driver,
			Workers:   workers,
			Port:      subnet.DefaultPort,
			PublicIP:  pub,
			MTU:       1500 - proto.EncapOverhead,
			Network:   network,
			SubnetLen: 24,
			Lease:     own,
			Logger:    slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		}
		for _, m := range mods {
			m(&opts)
		}
		var err error
		b, err = New(opts)
		return err
	})
	if err != nil {
		t.Fatalf("New in %s: %v", name, err)
	}
	b.Apply(peers)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run of %s: %v", name, err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Run of %s did not return within 10s of cancel", name)
		}
		if err := b.Close(); err != nil {
			t.Errorf("Close of %s: %v", name, err)
		}
		if t.Failed() {
			t.Logf("log of %s:\n%s", name, logs.String())
		}
	})
	return b
}

// lease is the lease event of a flannel host (no BackendData).
func lease(s netip.Prefix, pub netip.Addr) subnet.Event {
	return subnet.Event{Type: subnet.EventAdded, Lease: subnet.Lease{Subnet: s, Attrs: subnet.LeaseAttrs{PublicIP: pub}}}
}

// tulleLease is the lease event of a Tulle host advertising partial checksums.
func tulleLease(s netip.Prefix, pub netip.Addr) subnet.Event {
	ev := lease(s, pub)
	ev.Lease.Attrs.BackendData = []byte(`{"tulle":{"version":"test","features":["` + FeaturePartialChecksum + `"]}}`)
	return ev
}

// listenUDP opens a UDP socket on addr inside ns.
func listenUDP(t testing.TB, ns netns.NsHandle, addr netip.AddrPort) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := nstest.In(ns, func() error {
		var err error
		c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		t.Fatalf("listen %v: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readUDP reads one datagram or fails after timeout.
func readUDP(t testing.TB, c *net.UDPConn, timeout time.Duration) ([]byte, netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 70000)
	c.SetReadDeadline(time.Now().Add(timeout))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("read on %v: %v", c.LocalAddr(), err)
	}
	return buf[:n], from
}

// expectNothing fails if c receives a datagram within d.
func expectNothing(t testing.TB, c *net.UDPConn, d time.Duration) {
	t.Helper()
	buf := make([]byte, 70000)
	c.SetReadDeadline(time.Now().Add(d))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err == nil {
		t.Fatalf("unexpected datagram of %d bytes from %v", n, from)
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal(err)
	}
}

// innerUDP builds an IPv4/UDP packet src -> dst with payload and TTL 64,
// UDP checksum 0 (none).
func innerUDP(src, dst netip.AddrPort, payload []byte) []byte {
	size := 28 + len(payload)
	b := make([]byte, size)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(size))
	b[8] = 64
	b[9] = proto.ProtoUDP
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint16(b[10:], proto.IPv4HeaderChecksum(b[:20]))
	binary.BigEndian.PutUint16(b[20:], src.Port())
	binary.BigEndian.PutUint16(b[22:], dst.Port())
	binary.BigEndian.PutUint16(b[24:], uint16(size-20))
	copy(b[28:], payload)
	return b
}

// dropped returns the drop counter of a direction and reason, summed over
// the families.
func dropped(b *Backend, direction string, r dropReason) uint64 {
	var sum uint64
	for f := range numFamilies {
		sum += droppedOf(b, direction, f, r)
	}
	return sum
}

// droppedOf is the drop counter of a direction, family and reason.
func droppedOf(b *Backend, direction string, f family, r dropReason) uint64 {
	var sum uint64
	for _, w := range b.workers {
		if direction == "transmit" {
			sum += w.tx.stats.drops[f][r].Load()
			continue
		}
		for _, rx := range w.receivers() {
			sum += rx.stats.drops[f][r].Load()
		}
	}
	return sum
}

// connectedDgram opens in ns a datagram socket of dst's family with the
// option level/opt set to value, bound to local (when valid) and
// connected to dst; it is closed when the test ends.
func connectedDgram(t *testing.T, ns netns.NsHandle, local netip.Addr, dst netip.AddrPort, level, opt, value int) int {
	t.Helper()
	fd := -1
	err := nstest.In(ns, func() error {
		var err error
		if dst.Addr().Is4() {
			fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		} else {
			fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		}
		if err != nil {
			return err
		}
		if err := unix.SetsockoptInt(fd, level, opt, value); err != nil {
			return err
		}
		if local.IsValid() {
			if err := unix.Bind(fd, sockaddr(netip.AddrPortFrom(local, 0))); err != nil {
				return err
			}
		}
		return unix.Connect(fd, sockaddr(dst))
	})
	if fd >= 0 {
		t.Cleanup(func() { unix.Close(fd) })
	}
	if err != nil {
		t.Fatalf("datagram socket to %v in the namespace: %v", dst, err)
	}
	return fd
}

// sockaddr is ap as a unix.Sockaddr of its family.
func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

// sentDrop is a datagram that sock sends to A's port, and the reason A
// must count it as a receive drop under.
type sentDrop struct {
	name   string
	sock   *net.UDPConn
	pkt    []byte
	reason dropReason
}

// wantReceiveDrops sends each case's datagram with send and waits until
// b counts one more receive drop of the case's reason, in family f (in
// any family when f is numFamilies).
func wantReceiveDrops(t *testing.T, b *Backend, f family, send func(*net.UDPConn, []byte), cases []sentDrop) {
	t.Helper()
	count := func(r dropReason) uint64 {
		if f == numFamilies {
			return dropped(b, "receive", r)
		}
		return droppedOf(b, "receive", f, r)
	}
	for _, c := range cases {
		what := c.name + " counted as " + c.reason.String()
		if f != numFamilies {
			what = c.name + " counted as " + f.String() + "/" + c.reason.String()
		}
		before := count(c.reason)
		send(c.sock, c.pkt)
		waitFor(t, 2*time.Second, what, func() bool {
			return count(c.reason) == before+1
		})
	}
}

// waitFor polls cond every 10 ms until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
