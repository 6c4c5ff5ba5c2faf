package udp

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// BenchmarkTCPStream measures one TCP stream from host A to host B: over
// the bare veth, over the kernel's VXLAN (VNI 1, port 8472, as flannel's
// vxlan backend: the reference), and through two Tulle data planes with
// each TUN driver. MB/s is the goodput; compare the sub-benchmarks of one
// run, as the machine is shared. The TCP endpoints run in this process and
// share its CPUs with the data planes.
func BenchmarkTCPStream(b *testing.B) {
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
				startBackend(b, h.a, h.tunName("a"), leaseA, hostA, mode, 0, lease(leaseB, hostB))
				startBackend(b, h.b, h.tunName("b"), leaseB, hostB, mode, 0, lease(leaseA, hostA))
				src, dst = leaseA.Addr(), leaseB.Addr()
			}
			benchStream(b, h.a, h.b, src, dst)
		})
	}
}

// vxlan makes a VXLAN device in ns over underlay link dev, with address
// addr/24 and every frame sent to remote (a static all-zeros FDB entry).
func (h *twoHosts) vxlan(b *testing.B, ns netns.NsHandle, dev string, local, remote, addr netip.Addr) {
	err := inNetns(ns, func() error {
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

func benchStream(b *testing.B, nsSrc, nsDst netns.NsHandle, src, dst netip.Addr) {
	var ln net.Listener
	if err := inNetns(nsDst, func() error {
		var err error
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(dst, 5201).String())
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	done := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- 0
			return
		}
		n, _ := io.Copy(io.Discard, c)
		c.Close()
		done <- n
	}()
	var c net.Conn
	if err := inNetns(nsSrc, func() error {
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
		var err error
		c, err = d.Dial("tcp4", netip.AddrPortFrom(dst, 5201).String())
		return err
	}); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.Close()
	if n := <-done; n < int64(b.N)*int64(len(buf)) {
		b.Fatalf("received %d bytes, sent %d", n, int64(b.N)*int64(len(buf)))
	}
}
