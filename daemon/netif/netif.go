// Package netif chooses the underlay interface as flanneld does: by name or
// address (--iface, in order, first found wins), then by regular
// expression (--iface-regex, against names and addresses), else the interface of the default route. The
// advertised address is --public-ip when given, else the interface's; the
// TUN MTU is the interface's MTU less the 28 bytes of IPv4 and UDP headers
// (48 for IPv6 and UDP on an IPv6 underlay).
//
// The IPv6 underlay address (PublicIPv6, advertised in a dual-stack
// network) is --public-ipv6 when given, else the IPv6 address --iface
// named, else the interface's first global IPv6 address: never a
// link-local one (it needs a zone, which a lease can not carry), nor a
// temporary (privacy) or deprecated one, which go away.
//
// Everything is read with netlink through a *netlink.Handle, so a caller (a
// test) can look inside another network namespace.
package netif

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"sort"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// EncapOverhead is what the udp encapsulation adds to an inner packet: an
// IPv4 header (20) and a UDP header (8), as flannel counts it.
const EncapOverhead = 28

// EncapOverheadIPv6 is the same over an IPv6 underlay: an IPv6 header (40)
// and a UDP header (8).
const EncapOverheadIPv6 = 48

// minTunMTU is IPv4's minimum MTU (RFC 791).
const minTunMTU = 68

// Spec says how to choose the underlay interface.
type Spec struct {
	Ifaces     []string         // names, IPv4 or IPv6 addresses, tried in order
	Regexes    []*regexp.Regexp // tried after Ifaces, against names, IPv4 and IPv6 addresses
	PublicIP   netip.Addr       // advertised address; zero = the interface's
	PublicIPv6 netip.Addr       // advertised IPv6 underlay address; zero = the interface's, if any
}

// Selection is the chosen underlay.
type Selection struct {
	Name     string
	Index    int
	Addr     netip.Addr // the interface's IPv4 address
	PublicIP netip.Addr // what other hosts send to: Spec.PublicIP or Addr
	// Addr6 is the interface's global IPv6 address (the one --iface named,
	// else the first usable one); zero if it has none.
	Addr6 netip.Addr
	// PublicIPv6 is what other hosts send to over an IPv6 underlay:
	// Spec.PublicIPv6 or Addr6; zero if neither.
	PublicIPv6 netip.Addr
	MTU        int  // the interface's MTU
	Up         bool // the interface is administratively up
	// How says how it was chosen, for the start-up log line:
	// "--iface eth1", "--iface-regex ^eth", "default route".
	How string
}

// TunMTU is the MTU of the TUN device: MTU less EncapOverhead.
func (s Selection) TunMTU() int { return s.MTU - EncapOverhead }

// TunMTUFor is the MTU of the TUN device when the network config's
// IPv6Underlay switch is ipv6Underlay: MTU less EncapOverheadIPv6 when it
// is on and this host has an IPv6 underlay address (some datagrams then
// travel in IPv6), else TunMTU.
func (s Selection) TunMTUFor(ipv6Underlay bool) int {
	if ipv6Underlay && s.PublicIPv6.IsValid() {
		return s.MTU - EncapOverheadIPv6
	}
	return s.TunMTU()
}

// Select chooses the underlay interface in the namespace of h (nil: the
// calling thread's namespace). Errors name what was looked for, e.g.
// "no interface with address 192.0.2.9".
func Select(h *netlink.Handle, spec Spec) (Selection, error) {
	if h == nil {
		h = &netlink.Handle{}
	}
	var (
		sel Selection
		err error
	)
	switch {
	case len(spec.Ifaces) > 0 || len(spec.Regexes) > 0:
		sel, err = selectExplicit(h, spec)
	default:
		sel, err = byDefaultRoute(h)
	}
	if err != nil {
		return Selection{}, err
	}
	if sel.MTU <= 0 {
		return Selection{}, fmt.Errorf("interface %s reports MTU %d", sel.Name, sel.MTU)
	}
	if sel.TunMTU() < minTunMTU {
		return Selection{}, fmt.Errorf("interface %s: MTU %d leaves %d for the overlay, below IPv4's minimum of %d", sel.Name, sel.MTU, sel.TunMTU(), minTunMTU)
	}
	sel.PublicIP = sel.Addr
	if spec.PublicIP.IsValid() {
		sel.PublicIP = spec.PublicIP
	}
	sel.PublicIPv6 = sel.Addr6
	if spec.PublicIPv6.IsValid() {
		sel.PublicIPv6 = spec.PublicIPv6
	}
	return sel, nil
}

func selectExplicit(h *netlink.Handle, spec Spec) (Selection, error) {
	var errs []error
	for _, s := range spec.Ifaces {
		sel, err := byNameOrAddr(h, s)
		if err == nil {
			sel.How = "--iface " + s
			return sel, nil
		}
		errs = append(errs, err)
	}
	for _, re := range spec.Regexes {
		sel, err := byRegexp(h, re)
		if err == nil {
			sel.How = "--iface-regex " + re.String()
			return sel, nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 1 {
		return Selection{}, errs[0]
	}
	return Selection{}, fmt.Errorf("no usable interface among --iface/--iface-regex: %w", errors.Join(errs...))
}

func byNameOrAddr(h *netlink.Handle, s string) (Selection, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		return byAddr(h, a)
	}
	link, err := h.LinkByName(s)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return Selection{}, fmt.Errorf("no interface named %s", s)
		}
		return Selection{}, fmt.Errorf("look up interface %s: %w", s, err)
	}
	return fromLink(h, link, netip.Addr{})
}

// byAddr finds the interface holding a, an IPv4 or an IPv6 address; with an
// IPv6 address, a is the IPv6 underlay address and the IPv4 address is the
// interface's.
func byAddr(h *netlink.Handle, a netip.Addr) (Selection, error) {
	family, name := netlink.FAMILY_V4, "IPv4"
	if a.Is6() {
		family, name = netlink.FAMILY_V6, "IPv6"
	}
	addrs, err := h.AddrList(nil, family)
	if err != nil {
		return Selection{}, fmt.Errorf("list %s addresses: %w", name, err)
	}
	for _, ad := range addrs {
		if ip, ok := netip.AddrFromSlice(ad.IP); ok && ip.Unmap() == a {
			link, err := h.LinkByIndex(ad.LinkIndex)
			if err != nil {
				return Selection{}, fmt.Errorf("interface of address %s (index %d): %w", a, ad.LinkIndex, err)
			}
			if a.Is6() {
				sel, err := fromLink(h, link, netip.Addr{})
				sel.Addr6 = a
				return sel, err
			}
			return fromLink(h, link, a)
		}
	}
	return Selection{}, fmt.Errorf("no interface with address %s", a)
}

// byRegexp finds the first interface (by index) whose name, IPv4 address
// or usable IPv6 address (see usableIPv6) re matches. A matching IPv6
// address is the IPv6 underlay address, as with --iface naming it.
func byRegexp(h *netlink.Handle, re *regexp.Regexp) (Selection, error) {
	links, err := h.LinkList()
	if err != nil {
		return Selection{}, fmt.Errorf("list interfaces: %w", err)
	}
	sort.Slice(links, func(i, j int) bool { return links[i].Attrs().Index < links[j].Attrs().Index })
	for _, link := range links {
		if re.MatchString(link.Attrs().Name) {
			if sel, err := fromLink(h, link, netip.Addr{}); err == nil {
				return sel, nil
			}
			continue
		}
		addrs, err := h.AddrList(link, netlink.FAMILY_V4)
		if err != nil {
			continue
		}
		for _, ad := range addrs {
			if ip, ok := netip.AddrFromSlice(ad.IP); ok && re.MatchString(ip.Unmap().String()) {
				return fromLink(h, link, ip.Unmap())
			}
		}
		addrs, err = h.AddrList(link, netlink.FAMILY_V6)
		if err != nil {
			continue
		}
		for _, ad := range addrs {
			if ip, ok := usableIPv6(ad); ok && re.MatchString(ip.String()) {
				sel, err := fromLink(h, link, netip.Addr{})
				if err != nil {
					break // no IPv4 address: not an underlay
				}
				sel.Addr6 = ip
				return sel, nil
			}
		}
	}
	return Selection{}, fmt.Errorf("no interface name, IPv4 or IPv6 address matches --iface-regex %s", re)
}

func byDefaultRoute(h *netlink.Handle) (Selection, error) {
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return Selection{}, fmt.Errorf("list IPv4 routes: %w", err)
	}
	var best *netlink.Route
	for i := range routes {
		r := &routes[i]
		if !isDefault(r.Dst) {
			continue
		}
		if best == nil || r.Priority < best.Priority {
			best = r
		}
	}
	if best == nil {
		return Selection{}, errors.New("no IPv4 default route to take the interface from: give --iface (a name or an IPv4 address)")
	}
	index := best.LinkIndex
	if index == 0 && len(best.MultiPath) > 0 {
		index = best.MultiPath[0].LinkIndex
	}
	link, err := h.LinkByIndex(index)
	if err != nil {
		return Selection{}, fmt.Errorf("interface of the default route (index %d): %w", index, err)
	}
	var prefer netip.Addr
	if src, ok := netip.AddrFromSlice(best.Src); ok && src.Unmap().Is4() && !src.Unmap().IsUnspecified() {
		prefer = src.Unmap()
	}
	sel, err := fromLink(h, link, prefer)
	if err != nil {
		return Selection{}, err
	}
	sel.How = "default route"
	return sel, nil
}

func isDefault(dst *net.IPNet) bool {
	if dst == nil {
		return true
	}
	ones, _ := dst.Mask.Size()
	return ones == 0 && dst.IP.IsUnspecified()
}

// fromLink fills a Selection for link. The address is want if given (it is
// on the link), else the first global unicast IPv4 address, else the first.
func fromLink(h *netlink.Handle, link netlink.Link, want netip.Addr) (Selection, error) {
	attrs := link.Attrs()
	sel := Selection{
		Name:  attrs.Name,
		Index: attrs.Index,
		MTU:   attrs.MTU,
		Up:    attrs.Flags&net.FlagUp != 0,
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return Selection{}, fmt.Errorf("list IPv4 addresses of %s: %w", attrs.Name, err)
	}
	var first, global netip.Addr
	for _, ad := range addrs {
		ip, ok := netip.AddrFromSlice(ad.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if want.IsValid() && ip == want {
			sel.Addr = ip
			return sel, nil
		}
		if !first.IsValid() {
			first = ip
		}
		if !global.IsValid() && ip.IsGlobalUnicast() {
			global = ip
		}
	}
	switch {
	case global.IsValid():
		sel.Addr = global
	case first.IsValid():
		sel.Addr = first
	default:
		return Selection{}, fmt.Errorf("interface %s has no IPv4 address", attrs.Name)
	}
	sel.Addr6, err = globalIPv6(h, link)
	return sel, err
}

// globalIPv6 is link's first IPv6 address fit to be the IPv6 underlay
// address (usableIPv6), zero if there is none.
func globalIPv6(h *netlink.Handle, link netlink.Link) (netip.Addr, error) {
	addrs, err := h.AddrList(link, netlink.FAMILY_V6)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("list IPv6 addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, ad := range addrs {
		if ip, ok := usableIPv6(ad); ok {
			return ip, nil
		}
	}
	return netip.Addr{}, nil
}

// usableIPv6 returns ad's address if it is fit to be the IPv6 underlay
// address: global scope, not link-local, not temporary (privacy addresses
// change), not deprecated, not a failed duplicate.
func usableIPv6(ad netlink.Addr) (netip.Addr, bool) {
	const unfit = unix.IFA_F_TEMPORARY | unix.IFA_F_DEPRECATED | unix.IFA_F_DADFAILED
	ip, ok := netip.AddrFromSlice(ad.IP)
	if !ok || ip.Is4In6() || !ip.IsGlobalUnicast() || ad.Scope != unix.RT_SCOPE_UNIVERSE || ad.Flags&unfit != 0 {
		return netip.Addr{}, false
	}
	return ip, true
}
