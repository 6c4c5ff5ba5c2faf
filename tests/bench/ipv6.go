package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

// IPv6 modes: inner IPv6 TCP over the same IPv4 underlay, Tulle against
// the kernel's VXLAN carrying IPv6, judged against each other as the IPv4
// modes are.
//
//   - vxlan-ipv6: the vxlan mode's devices (VXLAN is layer 2: the same
//     device carries IPv6) with IPv6 added as flannel's dual-stack vxlan
//     routes it: device address 2001:db8:2:<i>::/128, route
//     "2001:db8:2:<j>::/64 via 2001:db8:2:<j>:: onlink", a permanent
//     neighbour entry for it; container x<i> 2001:db8:2:<i>::2 behind the
//     bridge 2001:db8:2:<i>::1/64 (MTU 1450).
//   - tulle-ipv6: tulled --tun-driver offload in a dual-stack network
//     (testbed.DualStackNetworkConfig), container to container over the
//     IPv6 leases (MTU 1472).
//
// With tulle-ipv6 among the modes every Tulle mode runs in a dual-stack
// network (runConfig; IPv4 traffic takes the same path as in an IPv4-only
// one), so that the hosts keep their leases, and the containers their
// addresses, from mode to mode.
const (
	modeVXLANIPv6 = "vxlan-ipv6"
	modeTulleIPv6 = "tulle-ipv6"
)

// vxlanIPv6Net is the kernel VXLAN reference's IPv6 overlay: host i has
// 2001:db8:2:<i>::/64.
var vxlanIPv6Net = netip.MustParsePrefix("2001:db8:2::/48")

// referenceMode is the kernel VXLAN mode a mode is compared with: the one
// carrying the same inner family; "" for the references themselves.
func referenceMode(mode string) string {
	switch mode {
	case modeVXLAN, modeVXLANIPv6:
		return ""
	case modeTulleIPv6:
		return modeVXLANIPv6
	}
	return modeVXLAN
}

// runConfig is the network config a Tulle mode runs with: config as the
// mode wants it (tulleMode), made dual-stack (testbed.IPv6Network) when
// tulle-ipv6 is among the modes, so that no mode's config moves the hosts'
// leases (a dual-stack key does not fit an IPv4-only network, and the
// other way round) and the containers keep their addresses.
func (b *bench) runConfig(config string) string {
	if !contains(b.cfg.Modes, modeTulleIPv6) {
		return config
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(config), &m); err != nil {
		panic(fmt.Sprintf("bench: network config %s: %v", config, err)) // our own constants
	}
	m["EnableIPv6"], m["IPv6Network"], m["IPv6SubnetLen"] = true, testbed.IPv6Network.String(), 64
	out, _ := json.Marshal(m)
	return string(out)
}

// vxlanSubnet6 is host x's IPv6 subnet of the VXLAN reference.
func vxlanSubnet6(x *vxlanHost) netip.Prefix {
	a := vxlanIPv6Net.Addr().As16()
	a[6], a[7] = byte(x.Host.Index>>8), byte(x.Host.Index)
	return netip.PrefixFrom(netip.AddrFrom16(a), 64)
}

// addIPv6 gives the VXLAN reference its IPv6 side (see vxlan-ipv6 above).
func (v *vxlanNet) addIPv6(ctx context.Context) error {
	for _, x := range v.Hosts {
		h, sn := x.Host, vxlanSubnet6(x)
		if err := ip(ctx, "-n", h.NS, "addr", "add", netip.PrefixFrom(sn.Addr(), 128).String(), "dev", x.Dev, "nodad"); err != nil {
			return fmt.Errorf("vxlan IPv6 on %s: %w", h.Name, err)
		}
		if err := h.AddContainerIPv6(ctx, x.Container, netip.PrefixFrom(sn.Addr().Next(), sn.Bits())); err != nil {
			return fmt.Errorf("vxlan IPv6 on %s: %w", h.Name, err)
		}
	}
	for _, x := range v.Hosts {
		for _, p := range v.Hosts {
			if x == p {
				continue
			}
			psn := vxlanSubnet6(p)
			steps := [][]string{
				{"-n", x.Host.NS, "-6", "route", "add", psn.String(), "via", psn.Addr().String(), "dev", x.Dev, "onlink"},
				{"-n", x.Host.NS, "-6", "neigh", "replace", psn.Addr().String(), "lladdr", p.MAC, "dev", x.Dev, "nud", "permanent"},
			}
			for _, s := range steps {
				if err := ip(ctx, s...); err != nil {
					return fmt.Errorf("vxlan IPv6 on %s, peer %s: %w", x.Host.Name, p.Host.Name, err)
				}
			}
		}
	}
	return nil
}

// vxlanIPv6Session is the vxlan-ipv6 mode's traffic ends.
func (b *bench) vxlanIPv6Session() *session {
	x1, x2 := b.vx.Hosts[0], b.vx.Hosts[1]
	sess := &session{reachTimeout: 5 * time.Second}
	sess.set(pathHost, x1.Host.Name, x1.Host.NS, vxlanSubnet6(x1).Addr(), x2.Host.Name, x2.Host.NS, x2.Container.Gateway6.Addr())
	sess.set(pathContainer, x1.Container.Name, x1.Container.NS, x1.Container.Addr6, x2.Container.Name, x2.Container.NS, x2.Container.Addr6)
	return sess
}

// ipv6Targets judges tulle-ipv6 against vxlan-ipv6 with issue 4's
// throughput targets (issue 10: the same ratios as IPv4), on each path.
func ipv6Targets(cfg Config, sum []ModeSummary) []Target {
	var out []Target
	for _, path := range cfg.Paths {
		t := summaryOf(sum, modeTulleIPv6, path)
		if t == nil || t.VsVXLAN == nil {
			continue
		}
		if t.VsVXLAN.TCP1 > 0 {
			out = append(out, Target{path + ": IPv6: TCP 1 stream >= 0.7x kernel VXLAN carrying IPv6", fmt.Sprintf("%.2fx", t.VsVXLAN.TCP1), t.VsVXLAN.TCP1 >= 0.7})
		}
		if t.VsVXLAN.TCPN > 0 {
			out = append(out, Target{fmt.Sprintf("%s: IPv6: TCP %d streams >= 0.6x kernel VXLAN carrying IPv6", path, t.Streams), fmt.Sprintf("%.2fx", t.VsVXLAN.TCPN), t.VsVXLAN.TCPN >= 0.6})
		}
	}
	return out
}
