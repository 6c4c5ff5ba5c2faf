package udp

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

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

// container makes a namespace behind a veth on host ns with address
// addr/24 (gateway addr's .1 on the host side); the host side's transmit
// checksum offload is off, and the host forwards.
func (h *twoHosts) container(t *testing.T, host netns.NsHandle, addr netip.Addr) netns.NsHandle {
	t.Helper()
	c := nstest.NewAnonNetns(t)
	gw := netip.AddrFrom4([4]byte{addr.As4()[0], addr.As4()[1], addr.As4()[2], 1})
	hostEnd, ctrEnd := h.prefix+"ch", h.prefix+"cc"
	err := nstest.In(host, func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostEnd, MTU: 1472}, PeerName: ctrEnd, PeerNamespace: netlink.NsFd(c)}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
			return err
		}
		return setupLink(hostEnd, netip.PrefixFrom(gw, 24))
	})
	if err == nil {
		err = nstest.In(c, func() error {
			if err := setupLink(ctrEnd, netip.PrefixFrom(addr, 24)); err != nil {
				return err
			}
			l, _ := netlink.LinkByName(ctrEnd)
			return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw.AsSlice()})
		})
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
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(dst, 5201).String())
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
		c, err = d.Dial("tcp4", netip.AddrPortFrom(dst, 5201).String())
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
