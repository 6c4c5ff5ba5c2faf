package udp

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/tools"
)

// TestTCPThroughPeersIsIntactWithPartialAndCompleteChecksums carries TCP
// both ways between a client on host A and a server in a "container" on
// host B, behind a veth whose transmit checksum offload is off: host B's
// kernel must compute every checksum the tunnel left partial, and the
// container's kernel verifies it. So a wrong partial sum (or a complete
// checksum taken for a partial one) fails the transfer. Run with both
// hosts advertising partial checksums, with only A (B is flannel-like and
// must get complete checksums), with neither, and with B on the water
// driver (it completes partial checksums itself before writing).
func TestTCPThroughPeersIsIntactWithPartialAndCompleteChecksums(t *testing.T) {
	for _, c := range []struct {
		name         string
		aTulle, bTul bool
		bDriver      string
	}{
		{"both-tulle", true, true, "offload"},
		{"a-tulle-b-flannel", true, false, "offload"},
		{"both-flannel", false, false, "offload"},
		{"both-tulle-b-water", true, true, "water"},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newTwoHosts(t)
			peerOf := func(tulle bool, s netip.Prefix, pub netip.Addr) subnet.Event {
				if tulle {
					return tulleLease(s, pub)
				}
				return lease(s, pub)
			}
			// Each host's own lease is what the other sees of it.
			startBackendLease(t, h.a, h.tunName("a"), peerOf(c.aTulle, leaseA, hostA).Lease, "offload", 2, peerOf(c.bTul, leaseB, hostB))
			startBackendLease(t, h.b, h.tunName("b"), peerOf(c.bTul, leaseB, hostB).Lease, c.bDriver, 2, peerOf(c.aTulle, leaseA, hostA))
			server := netip.MustParseAddr("198.18.2.2")
			ctr := h.container(t, h.b, server)
			transferBothWays(t, h.a, ctr, leaseA.Addr(), server, 4<<20)
		})
	}
}

// container makes a namespace behind a veth on host ns with the addresses
// addrs: an IPv4 one as addr/24 with gateway addr's .1 on the host side,
// an IPv6 one as addr/64 with gateway <prefix>::1 (IPv6 turned on for the
// veth, without duplicate address detection). The host side's transmit
// checksum offload is off, and the host forwards both families.
func (h *twoHosts) container(t *testing.T, host netns.NsHandle, addrs ...netip.Addr) netns.NsHandle {
	t.Helper()
	c := nstest.NewAnonNetns(t)
	hostEnd, ctrEnd := h.prefix+"ch", h.prefix+"cc"
	type side struct{ addr, gw netip.Prefix }
	var sides []side
	for _, a := range addrs {
		if a.Is4() {
			b := a.As4()
			sides = append(sides, side{netip.PrefixFrom(a, 24), netip.PrefixFrom(netip.AddrFrom4([4]byte{b[0], b[1], b[2], 1}), 24)})
		} else {
			p := netip.PrefixFrom(a, 64).Masked()
			sides = append(sides, side{netip.PrefixFrom(a, 64), netip.PrefixFrom(p.Addr().Next(), 64)})
		}
	}
	// setup gives link name the addresses (of the gateway side if gw).
	setup := func(name string, gw bool) error {
		for _, sd := range sides {
			if sd.addr.Addr().Is6() {
				if err := enableIPv6(name); err != nil {
					return err
				}
			}
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		for _, sd := range sides {
			a := sd.addr
			if gw {
				a = sd.gw
			}
			if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipNet(a), Flags: unix.IFA_F_NODAD}); err != nil {
				return fmt.Errorf("%s: add %v: %w", name, a, err)
			}
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		if gw {
			return nil
		}
		for _, sd := range sides {
			if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: sd.gw.Addr().AsSlice()}); err != nil {
				return fmt.Errorf("%s: default route via %v: %w", name, sd.gw.Addr(), err)
			}
		}
		return nil
	}
	err := nstest.In(host, func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostEnd, MTU: 1472}, PeerName: ctrEnd, PeerNamespace: netlink.NsFd(c)}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		for _, f := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(f, []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return setup(hostEnd, true)
	})
	if err == nil {
		err = nstest.In(c, func() error { return setup(ctrEnd, false) })
	}
	if err != nil {
		t.Fatal(err)
	}
	out, err := tools.Command(context.Background(), "nsenter", fmt.Sprintf("--net=/proc/%d/fd/%d", os.Getpid(), int(host)),
		"ethtool", "-K", hostEnd, "tx", "off").CombinedOutput()
	if err != nil {
		nstest.SkipMissing(t, fmt.Sprintf("cannot turn checksum offload off with ethtool (%v: %s)", err, out))
	}
	return c
}

// enableIPv6 turns IPv6 on for link name of the calling thread's namespace
// (nstest turns it off on new links), with no duplicate address detection.
func enableIPv6(name string) error {
	for _, kv := range [][2]string{{"accept_dad", "0"}, {"disable_ipv6", "0"}} {
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/"+kv[0], []byte(kv[1]), 0o644); err != nil {
			return fmt.Errorf("%s: IPv6 %s=%s: %w", name, kv[0], kv[1], err)
		}
	}
	return nil
}

// transferBothWays sends n random bytes from a client in nsClient (source
// address src) to a server in nsServer (dst) and back, and checks both
// arrive intact.
func transferBothWays(t *testing.T, nsClient, nsServer netns.NsHandle, src, dst netip.Addr, n int) {
	t.Helper()
	data := make([]byte, n)
	r := rand.New(rand.NewPCG(7, 8))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	want := sha256.Sum256(data)
	var ln net.Listener
	if err := nstest.In(nsServer, func() error {
		var err error
		ln, err = net.Listen(tcpNet(dst), netip.AddrPortFrom(dst, 5201).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	echoed := make(chan error, 1)
	go func() { // the server hashes what it gets and sends it back
		c, err := ln.Accept()
		if err != nil {
			echoed <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		got := make([]byte, n)
		if _, err := io.ReadFull(c, got); err != nil {
			echoed <- fmt.Errorf("server read: %w", err)
			return
		}
		if sha256.Sum256(got) != want {
			echoed <- fmt.Errorf("server received %d bytes that differ from those sent", n)
			return
		}
		_, err = c.Write(got)
		echoed <- err
	}()
	var c net.Conn
	if err := nstest.In(nsClient, func() error {
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), Timeout: 5 * time.Second}
		var err error
		c, err = d.Dial(tcpNet(dst), netip.AddrPortFrom(dst, 5201).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	go c.Write(data)
	back := make([]byte, n)
	if _, err := io.ReadFull(c, back); err != nil {
		c.Close()
		t.Fatalf("client read back: %v (server: %v)", err, <-echoed)
	}
	if err := <-echoed; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, data) {
		t.Fatal("data came back changed")
	}
}

// tcpNet is "tcp4" or "tcp6", the family of a.
func tcpNet(a netip.Addr) string {
	if a.Is4() {
		return "tcp4"
	}
	return "tcp6"
}

// TestMarkedPacketWithCorruptChecksumIsDroppedUnlessBothLeasesAdvertise
// injects, from host A's underlay address (as any host on the underlay
// could), a marked inner UDP packet whose checksum is wrong into host B's
// data plane, with one of the two hosts on partial checksums and the
// other off. B must not take the mark: the packet reaches B's kernel with
// its checksum to verify, and the kernel drops it (counted in its
// Udp InCsumErrors; Tulle counts it as received from A, as it accepted
// the datagram). A correct marked packet goes through unchanged, so the
// path itself works.
func TestMarkedPacketWithCorruptChecksumIsDroppedUnlessBothLeasesAdvertise(t *testing.T) {
	for _, c := range []struct {
		name             string
		senderOn, recvOn bool
	}{
		{"sender-on-receiver-off", true, false},
		{"sender-off-receiver-on", false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newTwoHosts(t)
			leaseOf := func(on bool, s netip.Prefix, pub netip.Addr) subnet.Event {
				if on {
					return tulleLease(s, pub)
				}
				return lease(s, pub)
			}
			b := startBackendLease(t, h.b, h.tunName("b"), leaseOf(c.recvOn, leaseB, hostB).Lease, "offload", 1, leaseOf(c.senderOn, leaseA, hostA))
			local := netip.AddrPortFrom(leaseB.Addr(), 9999)
			app := listenUDP(t, h.b, local)
			injector := listenUDP(t, h.a, netip.AddrPortFrom(hostA, 0))
			to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(hostB, subnet.DefaultPort))
			from := netip.MustParseAddrPort("198.18.1.5:4444")

			good := innerUDPChecksummed(from, local, []byte("intact"))
			setMark(good)
			if _, err := injector.WriteToUDP(good, to); err != nil {
				t.Fatal(err)
			}
			if got, _ := readUDP(t, app, 5*time.Second); string(got) != "intact" {
				t.Fatalf("the correct marked packet arrived as %q", got)
			}

			before := udpInCsumErrors(t, h.b)
			bad := innerUDPChecksummed(from, local, []byte("corrupt"))
			binary.BigEndian.PutUint16(bad[26:], binary.BigEndian.Uint16(bad[26:])^0x5a5a) // wrong, not zero
			setMark(bad)
			if _, err := injector.WriteToUDP(bad, to); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 5*time.Second, "B's kernel to drop the packet with the corrupt checksum (Udp InCsumErrors +1)", func() bool {
				return udpInCsumErrors(t, h.b) == before+1
			})
			app.SetReadDeadline(time.Now())
			if n, _, err := app.ReadFromUDPAddrPort(make([]byte, 100)); err == nil {
				t.Fatalf("the application received %d bytes of the packet with the corrupt checksum", n)
			}
			if got := strings.Count(collectText(t, b), `tulle_peer_receive_packets_total{peer="192.0.2.1",subnet="198.18.1.0/24"} 2`+"\n"); got != 1 {
				t.Errorf("B did not count both datagrams as received from A (accepted, for the kernel to verify):\n%s", collectText(t, b))
			}
		})
	}
}

// innerUDPChecksummed is innerUDP with a correct UDP checksum.
func innerUDPChecksummed(src, dst netip.AddrPort, payload []byte) []byte {
	p := innerUDP(src, dst, payload)
	s, d := src.Addr().As4(), dst.Addr().As4()
	c := proto.Checksum(p[20:], uint64(proto.PseudoHeaderSum(s, d, proto.ProtoUDP, len(p)-20)))
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(p[26:], c)
	return p
}

// udpInCsumErrors reads the kernel's Udp InCsumErrors counter of ns.
func udpInCsumErrors(t testing.TB, ns netns.NsHandle) uint64 { return udpSNMP(t, ns, "InCsumErrors") }

// udpSNMP reads the kernel's Udp counter name of ns (/proc/net/snmp).
func udpSNMP(t testing.TB, ns netns.NsHandle, name string) uint64 {
	t.Helper()
	var v uint64
	err := nstest.In(ns, func() error {
		// thread-self: /proc/self/net is the netns of the main thread.
		data, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		var names []string
		for line := range strings.Lines(string(data)) {
			fields := strings.Fields(line)
			if len(fields) == 0 || fields[0] != "Udp:" {
				continue
			}
			if names == nil {
				names = fields
				continue
			}
			for i, n := range names {
				if n == name && i < len(fields) {
					v, err = strconv.ParseUint(fields[i], 10, 64)
					return err
				}
			}
		}
		return fmt.Errorf("no Udp %s in /proc/net/snmp", name)
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}
