package testbed

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// A second L2 segment, for direct routing: hosts on the bed's switch
// (192.0.2.0/24) and hosts on a second switch (198.51.100.0/24), joined by
// a router namespace with an address on both and forwarding on. Each side
// routes the other segment via the router, so a host on the other segment
// is reachable but not on-link:
//
//	[ns switch]  192.0.2.0/24                 [ns switch2]  198.51.100.0/24
//	  |  etcd .250, host1 .1, host2 .2          |  host3 .3
//	  +---- 192.0.2.254 [ns router] 198.51.100.254 ----+

// Addresses of the second segment.
var (
	// SecondPrefix is the second segment's underlay network.
	SecondPrefix = netip.MustParsePrefix("198.51.100.0/24")
	// RouterAddr is the router's address on the bed's own segment.
	RouterAddr = netip.MustParseAddr("192.0.2.254")
	// SecondRouterAddr is the router's address on the second segment.
	SecondRouterAddr = netip.MustParseAddr("198.51.100.254")

	// With IPv6 on the segments (Segment.AddIPv6): the bed's own segment is
	// IPv6UnderlayPrefix, the second one SecondIPv6Prefix, and the router
	// has an address on each.
	SecondIPv6Prefix  = netip.MustParsePrefix("2001:db8:fffe::/64")
	RouterAddr6       = netip.MustParseAddr("2001:db8:ffff::fe")
	SecondRouterAddr6 = netip.MustParseAddr("2001:db8:fffe::fe")
)

// Segment is the second segment of a bed (see AddSegment).
type Segment struct {
	SwitchNS string // namespace of its switch bridge
	Router   *Node  // the router; Link and Addr are its side on the bed's segment
	bed      *Bed
	bridge   string
}

// AddSegment adds the second segment: a switch namespace with a bridge, a
// router namespace attached to both switches (RouterAddr, SecondRouterAddr)
// with ip_forward on, and on the etcd node and every host the bed has so
// far a route to SecondPrefix via the router. Nodes added to the bed's own
// segment later need RouteToSecond.
func (b *Bed) AddSegment(ctx context.Context) (*Segment, error) {
	s := &Segment{SwitchNS: b.Prefix + "-sw2", bed: b, bridge: b.Prefix + "bs"}
	if err := b.addNetns(ctx, s.SwitchNS); err != nil {
		return nil, err
	}
	for _, step := range [][]string{
		{"-n", s.SwitchNS, "link", "add", s.bridge, "type", "bridge"},
		{"-n", s.SwitchNS, "link", "set", s.bridge, "up"},
	} {
		if err := ipCmd(ctx, step...); err != nil {
			return nil, fmt.Errorf("testbed: second segment: %w", err)
		}
	}
	r, err := b.attach(ctx, "router", b.Prefix+"-rt", b.Prefix+"ra", b.Prefix+"pa", RouterAddr, defaultMTU)
	if err != nil {
		return nil, err
	}
	s.Router = r
	if err := s.attach(ctx, r.NS, b.Prefix+"rb", b.Prefix+"pb", SecondRouterAddr, defaultMTU); err != nil {
		return nil, fmt.Errorf("testbed: router: %w", err)
	}
	if err := setSysctl(ctx, r.NS, "net/ipv4/ip_forward", "1"); err != nil {
		return nil, fmt.Errorf("testbed: router: %w", err)
	}
	b.mu.Lock()
	nodes := make([]*Node, 0, len(b.Hosts)+1)
	if b.Etcd != nil {
		nodes = append(nodes, b.Etcd)
	}
	for _, h := range b.Hosts {
		nodes = append(nodes, &h.Node)
	}
	b.mu.Unlock()
	for _, n := range nodes {
		if err := s.RouteToSecond(ctx, n); err != nil {
			return nil, err
		}
	}
	b.logf("testbed %s: second segment %s behind router %s / %s", b.Prefix, SecondPrefix, RouterAddr, SecondRouterAddr)
	return s, nil
}

// RouteToSecond routes SecondPrefix via the router on n, a node of the
// bed's own segment.
func (s *Segment) RouteToSecond(ctx context.Context, n *Node) error {
	if err := ipCmd(ctx, "-n", n.NS, "route", "add", SecondPrefix.String(), "via", RouterAddr.String(), "dev", n.Link); err != nil {
		return fmt.Errorf("testbed: node %s: %w", n.Name, err)
	}
	return nil
}

// attach links namespace ns to the segment's switch with a veth (link in
// ns, port on the switch) and puts addr/24 on it.
func (s *Segment) attach(ctx context.Context, ns, link, port string, addr netip.Addr, mtu int) error {
	m := strconv.Itoa(mtu)
	for _, step := range [][]string{
		{"-n", ns, "link", "add", link, "mtu", m, "type", "veth", "peer", "name", port, "mtu", m, "netns", s.SwitchNS},
		{"-n", s.SwitchNS, "link", "set", port, "master", s.bridge, "up"},
		{"-n", ns, "addr", "add", netip.PrefixFrom(addr, SecondPrefix.Bits()).String(), "dev", link},
		{"-n", ns, "link", "set", link, "up"},
	} {
		if err := ipCmd(ctx, step...); err != nil {
			return fmt.Errorf("attach %s to the second segment: %w", ns, err)
		}
	}
	return nil
}

// AddHost adds a host on the second segment with the bed's next index i
// (198.51.100.<i>, underlay MTU mtu, 0 = 1500), ip_forward on and a route to
// the bed's own segment via the router. tulled is not started; the host is
// one of the bed's Hosts (StartAll starts it).
func (s *Segment) AddHost(ctx context.Context, mtu int) (*Host, error) {
	b := s.bed
	if mtu == 0 {
		mtu = defaultMTU
	}
	b.mu.Lock()
	idx := len(b.Hosts) + 1
	b.mu.Unlock()
	if idx > 253 {
		return nil, fmt.Errorf("testbed: second segment: host index %d does not fit %s", idx, SecondPrefix)
	}
	addr := SecondPrefix.Addr().As4()
	addr[3] = byte(idx)
	name := fmt.Sprintf("h%d", idx)
	n := &Node{Name: name, NS: fmt.Sprintf("%s-h%d", b.Prefix, idx), Link: fmt.Sprintf("%su%d", b.Prefix, idx),
		Addr: netip.AddrFrom4(addr), MTU: mtu, bed: b}
	if err := b.addNetns(ctx, n.NS); err != nil {
		return nil, err
	}
	if err := s.attach(ctx, n.NS, n.Link, fmt.Sprintf("%ss%d", b.Prefix, idx), n.Addr, mtu); err != nil {
		return nil, fmt.Errorf("testbed: host %s: %w", name, err)
	}
	if err := ipCmd(ctx, "-n", n.NS, "route", "add", UnderlayPrefix.String(), "via", SecondRouterAddr.String(), "dev", n.Link); err != nil {
		return nil, fmt.Errorf("testbed: host %s: %w", name, err)
	}
	return b.addHostOn(ctx, n, idx)
}

// AddIPv6 carries IPv6 on both segments: the router gets RouterAddr6 and
// SecondRouterAddr6 and forwards IPv6, and every host the bed has gets an
// IPv6 underlay address on its segment (AddIPv6Underlay's
// 2001:db8:ffff::<index> on the bed's own, 2001:db8:fffe::<index> on the
// second) and a route to the other segment's IPv6 prefix via the router:
// reachable, not on-link. Call it once every host is added and before
// tulled starts (tulled takes its interface's global IPv6 address as its
// PublicIPv6).
func (s *Segment) AddIPv6(ctx context.Context) error {
	b := s.bed
	r := s.Router
	for _, step := range [][]string{
		{"-n", r.NS, "addr", "add", netip.PrefixFrom(RouterAddr6, IPv6UnderlayPrefix.Bits()).String(), "dev", r.Link, "nodad"},
		{"-n", r.NS, "addr", "add", netip.PrefixFrom(SecondRouterAddr6, SecondIPv6Prefix.Bits()).String(), "dev", b.Prefix + "rb", "nodad"},
	} {
		if err := ipCmd(ctx, step...); err != nil {
			return fmt.Errorf("testbed: router: IPv6: %w", err)
		}
	}
	if err := setSysctl(ctx, r.NS, "net/ipv6/conf/all/forwarding", "1"); err != nil {
		return fmt.Errorf("testbed: router: %w", err)
	}
	b.mu.Lock()
	hosts := append([]*Host(nil), b.Hosts...)
	b.mu.Unlock()
	for _, h := range hosts {
		if !SecondPrefix.Contains(h.Addr) {
			if _, err := h.AddIPv6Underlay(ctx); err != nil {
				return err
			}
			if err := ipCmd(ctx, "-n", h.NS, "route", "add", SecondIPv6Prefix.String(), "via", RouterAddr6.String(), "dev", h.Link); err != nil {
				return fmt.Errorf("testbed: host %s: %w", h.Name, err)
			}
			continue
		}
		a := SecondIPv6Prefix.Addr().As16()
		a[14], a[15] = byte(h.Index>>8), byte(h.Index)
		addr := netip.AddrFrom16(a)
		for _, step := range [][]string{
			{"-n", h.NS, "addr", "add", netip.PrefixFrom(addr, SecondIPv6Prefix.Bits()).String(), "dev", h.Link, "nodad"},
			{"-n", h.NS, "route", "add", IPv6UnderlayPrefix.String(), "via", SecondRouterAddr6.String(), "dev", h.Link},
		} {
			if err := ipCmd(ctx, step...); err != nil {
				return fmt.Errorf("testbed: host %s: IPv6 underlay: %w", h.Name, err)
			}
		}
		h.mu.Lock()
		h.Addr6 = addr
		h.mu.Unlock()
	}
	b.logf("testbed %s: IPv6 on both segments (%s, %s) behind router %s / %s", b.Prefix, IPv6UnderlayPrefix, SecondIPv6Prefix, RouterAddr6, SecondRouterAddr6)
	return nil
}

// SetSysctl writes value to /proc/sys/<path> in the node's namespace
// ("net/ipv4/conf/all/rp_filter", "1").
func (n *Node) SetSysctl(ctx context.Context, path, value string) error {
	return setSysctl(ctx, n.NS, path, value)
}

// PutLease writes value (a lease's JSON, as a host would write it) at the
// key of subnet, attached to an etcd lease of ttl (0: no etcd lease), and
// returns the etcd lease ID (0 without one).
func (b *Bed) PutLease(ctx context.Context, subnet netip.Prefix, value string, ttl time.Duration) (clientv3.LeaseID, error) {
	return b.putLeaseKey(ctx, FlannelLeaseKey(subnet), value, ttl)
}

// DeleteLease deletes the key of subnet's lease.
func (b *Bed) DeleteLease(ctx context.Context, subnet netip.Prefix) error {
	c, err := b.EtcdClient()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.Delete(ctx, FlannelLeaseKey(subnet)); err != nil {
		return fmt.Errorf("testbed %s: delete %s: %w", b.Prefix, FlannelLeaseKey(subnet), err)
	}
	return nil
}

// RoutesOfProtocol lists the node's main-table routes (IPv4 and IPv6) of
// routing protocol proto (`ip route show proto <proto>`) as "<dst> via <gw> dev
// <link>", sorted.
func (n *Node) RoutesOfProtocol(proto int) ([]string, error) {
	var out []string
	err := InNetns(n.NS, func() error {
		rs, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: netlink.RouteProtocol(proto)}, netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			return err
		}
		for _, r := range rs {
			dev := strconv.Itoa(r.LinkIndex)
			if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
				dev = l.Attrs().Name
			}
			out = append(out, fmt.Sprintf("%v via %v dev %s", r.Dst, r.Gw, dev))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("node %s: routes of protocol %d: %w", n.Name, proto, err)
	}
	sort.Strings(out)
	return out, nil
}

// RouteTo is what the node's kernel does with a packet to dst (`ip route
// get`): the gateway (zero when none) and the outgoing link's name.
func (n *Node) RouteTo(dst netip.Addr) (gw netip.Addr, dev string, err error) {
	err = InNetns(n.NS, func() error {
		rs, err := netlink.RouteGet(dst.AsSlice())
		if err != nil {
			return err
		}
		if len(rs) != 1 {
			return fmt.Errorf("%d routes", len(rs))
		}
		gw, _ = netip.AddrFromSlice(rs[0].Gw)
		dev = strconv.Itoa(rs[0].LinkIndex)
		if l, err := netlink.LinkByIndex(rs[0].LinkIndex); err == nil {
			dev = l.Attrs().Name
		}
		return nil
	})
	if err != nil {
		return netip.Addr{}, "", fmt.Errorf("node %s: route to %v: %w", n.Name, dst, err)
	}
	return gw.Unmap(), dev, nil
}
