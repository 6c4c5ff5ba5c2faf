package policy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/tulle-net/tulle/tests/nstest"
)

// lab is host 2 of the testbed in miniature, in anonymous namespaces: the
// host (ip_forward on) with a bridge 198.18.2.1/24 and two containers on
// it, c2 (198.18.2.2) and c2b (198.18.2.3); and "far", a namespace behind a
// routed veth that holds the other hosts' containers c1 (198.18.1.2) and c3
// (198.18.3.2), as the overlay would deliver them.
type lab struct {
	host, c2, c2b, far netns.NsHandle
	enf                *Enforcer
}

var (
	c1Addr  = netip.MustParseAddr("198.18.1.2")
	c2Addr  = netip.MustParseAddr("198.18.2.2")
	c2bAddr = netip.MustParseAddr("198.18.2.3")
	c3Addr  = netip.MustParseAddr("198.18.3.2")
)

func newLab(t *testing.T) *lab {
	t.Helper()
	l := &lab{host: nstest.NewAnonNetns(t), c2: nstest.NewAnonNetns(t), c2b: nstest.NewAnonNetns(t), far: nstest.NewAnonNetns(t)}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(nstest.In(l.host, func() error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("bridge: %w", err)
		}
		if err := addrUp(br, "198.18.2.1/24"); err != nil {
			return err
		}
		for _, c := range []struct {
			name string
			ns   netns.NsHandle
		}{{"v2", l.c2}, {"v2b", l.c2b}} {
			v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: c.name, MasterIndex: br.Index}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(c.ns))}
			if err := netlink.LinkAdd(v); err != nil {
				return fmt.Errorf("veth %s: %w", c.name, err)
			}
			if err := netlink.LinkSetUp(v); err != nil {
				return err
			}
		}
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vfar"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(l.far))}
		if err := netlink.LinkAdd(v); err != nil {
			return fmt.Errorf("veth far: %w", err)
		}
		if err := addrUp(v, "192.0.2.1/24"); err != nil {
			return err
		}
		for _, dst := range []string{"198.18.1.0/24", "198.18.3.0/24"} {
			if err := netlink.RouteAdd(&netlink.Route{Dst: ipnet(dst), Gw: net.ParseIP("192.0.2.2"), LinkIndex: v.Index}); err != nil {
				return fmt.Errorf("route %s: %w", dst, err)
			}
		}
		// br_netfilter sends bridged IPv4 through the inet forward hook
		// (the default in a new namespace; as Docker and Kubernetes want it).
		if _, err := EnsureBridgeFiltering(); err != nil {
			return err
		}
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	}))
	for _, c := range []struct {
		ns   netns.NsHandle
		addr string
	}{{l.c2, "198.18.2.2/24"}, {l.c2b, "198.18.2.3/24"}} {
		must(nstest.In(c.ns, func() error {
			eth, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			if err := addrUp(eth, c.addr); err != nil {
				return err
			}
			return netlink.RouteAdd(&netlink.Route{Gw: net.ParseIP("198.18.2.1"), LinkIndex: eth.Attrs().Index})
		}))
	}
	must(nstest.In(l.far, func() error {
		eth, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := addrUp(eth, "192.0.2.2/24"); err != nil {
			return err
		}
		for _, a := range []string{"198.18.1.2/32", "198.18.3.2/32"} {
			if err := netlink.AddrAdd(eth, &netlink.Addr{IPNet: ipnet(a)}); err != nil {
				return err
			}
		}
		return netlink.RouteAdd(&netlink.Route{Dst: ipnet("198.18.2.0/24"), Gw: net.ParseIP("192.0.2.1"), LinkIndex: eth.Attrs().Index})
	}))
	l.enf = NewEnforcer(int(l.host))
	return l
}

func addrUp(link netlink.Link, cidr string) error {
	if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: ipnet(cidr)}); err != nil {
		return fmt.Errorf("address %s on %s: %w", cidr, link.Attrs().Name, err)
	}
	return netlink.LinkSetUp(link)
}

func ipnet(cidr string) *net.IPNet {
	ip, n, err := net.ParseCIDR(cidr)
	if err != nil {
		panic(err)
	}
	n.IP = ip
	return n
}

// nsOf returns the namespace an address of the lab lives in.
func (l *lab) nsOf(a netip.Addr) netns.NsHandle {
	switch a {
	case c2Addr:
		return l.c2
	case c2bAddr:
		return l.c2b
	}
	return l.far
}

// listen serves TCP on addr:port (accepting and closing) until the test
// ends.
func (l *lab) listen(t *testing.T, a netip.Addr, port uint16) {
	t.Helper()
	var ln net.Listener
	err := nstest.In(l.nsOf(a), func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(a, port).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
}

// connect dials dst:port from src with a timeout; nil means connected. A
// policy drop shows as a timeout (the SYN is dropped, nothing answers).
func (l *lab) connect(src, dst netip.Addr, port uint16, timeout time.Duration) error {
	return nstest.In(l.nsOf(src), func() error {
		d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(dst, port).String())
		if err != nil {
			return err
		}
		return c.Close()
	})
}

// Timeouts of a probe: an allowed connect answers within milliseconds; a
// dropped one is declared refused after refusedAfter.
const (
	allowedWithin = 5 * time.Second
	refusedAfter  = 400 * time.Millisecond
)

func (l *lab) wantConnects(t *testing.T, src, dst netip.Addr, port uint16) {
	t.Helper()
	if err := l.connect(src, dst, port, allowedWithin); err != nil {
		t.Errorf("%s -> %s:%d: want connected, got %v", src, dst, port, err)
	}
}

func (l *lab) wantRefused(t *testing.T, src, dst netip.Addr, port uint16) {
	t.Helper()
	err := l.connect(src, dst, port, refusedAfter)
	if err == nil {
		t.Errorf("%s -> %s:%d: connected, want dropped by policy", src, dst, port)
		return
	}
	if !isTimeout(err) {
		t.Errorf("%s -> %s:%d: want a timeout (dropped), got %v", src, dst, port, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// hostInput is what host 2 of the lab compiles from.
func hostInput(policies ...*Policy) Input {
	in := threeHosts(2)
	in.Local = in.Local[:1] // the lab's host has only the IPv4 lease
	in.Policies = policies
	return in
}
