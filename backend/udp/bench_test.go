package udp

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// BenchmarkTCPStream measures one TCP stream from host A to host B: over
// the bare veth, over the kernel's VXLAN (VNI 1, port 8472, as flannel's
// vxlan backend: the reference), and through two Tulle data planes with
// each TUN driver (Tulle leases: partial checksums between them). MB/s is
// the goodput; compare the sub-benchmarks of one run, as the machine is
// shared. The TCP endpoints run in this process and share its CPUs with the
// data planes, so the ratios differ from tests/bench's (iperf3 in its own
// processes); use this one for profiles (-cpuprofile).
func BenchmarkTCPStream(b *testing.B) { benchModes(b, 1) }

// BenchmarkTCPStreams4 is BenchmarkTCPStream with 4 parallel streams.
func BenchmarkTCPStreams4(b *testing.B) { benchModes(b, 4) }

func benchModes(b *testing.B, streams int) {
	for _, mode := range []string{"veth", "vxlan", "offload", "water"} {
		b.Run(mode, func(b *testing.B) {
			h := newTwoHosts(b)
			src, dst := hostA, hostB
			switch mode {
			case "veth":
			case "vxlan":
				src, dst = netip.MustParseAddr("198.18.100.1"), netip.MustParseAddr("198.18.100.2")
				h.vxlan(b, h.a, h.vethA, hostA, hostB, src)
				h.vxlan(b, h.b, h.prefix+"vb", hostB, hostA, dst)
			default:
				startBackend(b, h.a, h.tunName("a"), leaseA, hostA, mode, 0, tulleLease(leaseB, hostB))
				startBackend(b, h.b, h.tunName("b"), leaseB, hostB, mode, 0, tulleLease(leaseA, hostA))
				src, dst = leaseA.Addr(), leaseB.Addr()
			}
			benchStreams(b, h.a, h.b, src, dst, streams)
		})
	}
}

// vxlan makes a VXLAN device in ns over underlay link dev, with address
// addr/24 and every frame sent to remote (a static all-zeros FDB entry).
func (h *twoHosts) vxlan(b *testing.B, ns netns.NsHandle, dev string, local, remote, addr netip.Addr) {
	err := nstest.In(ns, func() error {
		under, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: h.prefix + "x", MTU: 1450},
			VxlanId:   1, VtepDevIndex: under.Attrs().Index, SrcAddr: local.AsSlice(), Port: 8472,
		}
		if err := netlink.LinkAdd(vx); err != nil {
			return fmt.Errorf("add vxlan: %w", err)
		}
		if err := setupLink(vx.Name, netip.PrefixFrom(addr, 24)); err != nil {
			return err
		}
		return netlink.NeighAppend(&netlink.Neigh{
			LinkIndex: vx.Attrs().Index, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT,
			Flags: netlink.NTF_SELF, IP: remote.AsSlice(), HardwareAddr: make(net.HardwareAddr, 6),
		})
	})
	if err != nil {
		b.Fatal(err)
	}
}

// benchStreams sends 1 MiB per op, spread over streams TCP connections,
// from src in nsSrc to dst in nsDst.
func benchStreams(b *testing.B, nsSrc, nsDst netns.NsHandle, src, dst netip.Addr, streams int) {
	var ln net.Listener
	if err := nstest.In(nsDst, func() error {
		var err error
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(dst, 5201).String())
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	received := make(chan int64, streams)
	for range streams {
		go func() {
			c, err := ln.Accept()
			if err != nil {
				received <- 0
				return
			}
			n, _ := io.Copy(io.Discard, c)
			c.Close()
			received <- n
		}()
	}
	conns := make([]net.Conn, streams)
	for i := range conns {
		if err := nstest.In(nsSrc, func() error {
			d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
			var err error
			conns[i], err = d.Dial("tcp4", netip.AddrPortFrom(dst, 5201).String())
			return err
		}); err != nil {
			b.Fatal(err)
		}
	}
	const chunk = 1 << 20
	buf := make([]byte, chunk/streams)
	b.SetBytes(int64(len(buf) * streams))
	work := make(chan struct{}, streams)
	errs := make(chan error, streams)
	for _, c := range conns {
		go func() {
			for range work {
				if _, err := c.Write(buf); err != nil {
					errs <- err
					return
				}
				errs <- nil
			}
		}()
	}
	b.ResetTimer()
	for b.Loop() {
		for range streams {
			work <- struct{}{}
		}
		for range streams {
			if err := <-errs; err != nil {
				b.Fatal(err)
			}
		}
	}
	b.StopTimer()
	close(work)
	var total int64
	for _, c := range conns {
		c.Close()
	}
	for range streams {
		total += <-received
	}
	if want := int64(b.N) * int64(len(buf)*streams); total < want {
		b.Fatalf("received %d bytes, sent %d", total, want)
	}
}
