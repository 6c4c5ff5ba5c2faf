package main

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/tulle-net/tulle/tests/testbed"
)

// The kernel VXLAN reference, set up as flannel's vxlan backend does
// (pkg/backend/vxlan): a device "flannel.1"-like per host with VNI 1, UDP
// port 8472, learning off, MTU = underlay MTU - 50, the address <subnet>.0/32;
// for every remote subnet a route "<subnet> via <subnet>.0 dev vx onlink",
// a permanent neighbour entry <subnet>.0 -> remote VTEP MAC and an fdb entry
// remote VTEP MAC -> remote underlay address. Its overlay is 198.19.0.0/16
// (host i leases 198.19.i.0/24), apart from Tulle's 198.18.0.0/16, so both
// can stay configured during the whole run.
const (
	vxlanVNI  = 1
	vxlanPort = 8472
	// vxlanOverhead is what VXLAN over IPv4 adds: outer IPv4 20 + UDP 8 +
	// VXLAN 8 + inner Ethernet 14.
	vxlanOverhead = 50
)

// vxlanHost is one host's side of the VXLAN reference.
type vxlanHost struct {
	Host      *testbed.Host
	Dev       string             // the VXLAN device in the host namespace
	MAC       string             // its (fixed) VTEP MAC
	Subnet    netip.Prefix       // 198.19.<i>.0/24
	DevAddr   netip.Addr         // 198.19.<i>.0, on Dev
	Container *testbed.Container // "x<i>": 198.19.<i>.2 behind the bridge 198.19.<i>.1/24
	MTU       int
}

// vxlanNet is the VXLAN reference on every host of a bed, with containers
// like the testbed's (a namespace behind a veth on a bridge) on its subnets.
type vxlanNet struct {
	Hosts []*vxlanHost
}

// setupVXLAN builds the VXLAN reference on the given hosts; what it
// creates goes with the bed.
func setupVXLAN(ctx context.Context, bed *testbed.Bed, hosts []*testbed.Host) (*vxlanNet, error) {
	v := &vxlanNet{}
	for _, h := range hosts {
		if h.Index > 254 {
			return nil, fmt.Errorf("vxlan: host index %d: at most 254", h.Index)
		}
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(h.Index), 0}), 24)
		x := &vxlanHost{
			Host:    h,
			Dev:     bed.Prefix + "vx",
			MAC:     fmt.Sprintf("02:74:6c:76:78:%02x", h.Index),
			Subnet:  subnet,
			DevAddr: subnet.Addr(),
			MTU:     h.MTU - vxlanOverhead,
		}
		if err := x.setup(ctx); err != nil {
			return nil, err
		}
		v.Hosts = append(v.Hosts, x)
	}
	for _, a := range v.Hosts {
		for _, b := range v.Hosts {
			if a == b {
				continue
			}
			if err := a.addPeer(ctx, b); err != nil {
				return nil, err
			}
		}
	}
	return v, nil
}

// setup creates the VXLAN device and the container of one host.
func (x *vxlanHost) setup(ctx context.Context) error {
	h := x.Host
	steps := [][]string{
		// flannel: netlink.Vxlan{VxlanId: 1, SrcAddr: public IP, Port: 8472,
		// Learning: false, VtepDevIndex: the underlay link}, MTU link-50.
		{"-n", h.NS, "link", "add", x.Dev, "address", x.MAC, "mtu", strconv.Itoa(x.MTU), "type", "vxlan",
			"id", strconv.Itoa(vxlanVNI), "dstport", strconv.Itoa(vxlanPort), "local", h.Addr.String(),
			"nolearning", "dev", h.Link},
		{"-n", h.NS, "addr", "add", netip.PrefixFrom(x.DevAddr, 32).String(), "dev", x.Dev},
		{"-n", h.NS, "link", "set", x.Dev, "up"},
	}
	for _, s := range steps {
		if err := ip(ctx, s...); err != nil {
			return fmt.Errorf("vxlan on %s: %w", h.Name, err)
		}
	}
	// The container side, as Docker does from subnet.env (FLANNEL_MTU = 1450).
	c, err := h.AddContainer(ctx, "x", netip.PrefixFrom(x.DevAddr.Next(), x.Subnet.Bits()), x.MTU)
	if err != nil {
		return fmt.Errorf("vxlan on %s: %w", h.Name, err)
	}
	x.Container = c
	return nil
}

// addPeer installs what flannel installs on x for a remote lease of p.
func (x *vxlanHost) addPeer(ctx context.Context, p *vxlanHost) error {
	steps := [][]string{
		{"-n", x.Host.NS, "route", "add", p.Subnet.String(), "via", p.DevAddr.String(), "dev", x.Dev, "onlink"},
		{"-n", x.Host.NS, "neigh", "replace", p.DevAddr.String(), "lladdr", p.MAC, "dev", x.Dev, "nud", "permanent"},
		{"bridge", "-n", x.Host.NS, "fdb", "append", p.MAC, "dev", x.Dev, "dst", p.Host.Addr.String(), "self", "permanent"},
	}
	for _, s := range steps {
		if err := ip(ctx, s...); err != nil {
			return fmt.Errorf("vxlan on %s, peer %s: %w", x.Host.Name, p.Host.Name, err)
		}
	}
	return nil
}
