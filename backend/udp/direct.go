package udp

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/subnet"
)

// Direct routing (opt-in: "Backend": {"Type": "udp", "DirectRouting": true},
// flannel's vxlan option name). A peer whose PublicIP is on-link (the
// kernel reaches it through our underlay interface with no gateway) and
// whose lease advertises FeatureDirect gets a kernel route
//
//	<peer subnet> via <peer PublicIP> dev <underlay> proto 84
//
// which is more specific than <Network> dev tulle0 and so wins: its
// packets leave unencapsulated, forwarded by the kernel at the underlay's
// speed, and never pass through Tulle. Every other peer, and every flannel
// host (its lease advertises nothing), keeps the UDP path. The peer stays
// in the route table too, so anything that still reaches the TUN device
// (a route not yet added, or removed by hand) goes by UDP and is accepted
// by its trust checks.
//
// In a dual-stack network the IPv6 lease of a peer we carry IPv6 to (see
// grantIPv6) gets its own route, decided apart from the IPv4 one:
//
//	<peer IPv6 subnet> via <peer PublicIPv6> dev <underlay> proto 84
//
// when the peer's lease advertises FeatureDirectIPv6 and its PublicIPv6 is
// on-link. Without an IPv6 underlay on both ends the IPv6 lease keeps the
// UDP path: Linux has no IPv6 route through an IPv4 gateway (RTA_VIA, and
// nexthop objects, take IPv4 routes through IPv6 gateways only; an IPv6
// route is refused with "IPv6 does not support RTA_VIA attribute"), and a
// peer's link-local address is not in its lease.
//
// Routes are symmetric: we route a family to a peer directly only while
// our own lease advertises that family's feature as well, so the peer
// routes back to us the same way and a strict rp_filter (the reverse path
// of a packet that arrives on the underlay must be the underlay) holds on
// both ends.
//
// The routes carry RouteProtocol. Whatever of that protocol lies inside
// the networks is ours: on the first lease batch the kernel's routes are
// reconciled with the leases (a killed tulled leaves its routes behind;
// those of peers that left meanwhile are removed, the rest kept, missing
// ones added); Close removes them all; with DirectRouting off, New removes
// any a previous run left. On-link is decided when a lease arrives or
// changes, not when the underlay's routes change later. Routes are keyed
// by their destination, a netip.Prefix that carries its family.

// RouteProtocol is the rtm_protocol of the routes Tulle owns
// (`ip route show proto 84`). 84 ('T') is unassigned in iproute2's
// rt_protos (0-4, 8-18, 42, 99, 186-192 are taken) and not used by the
// routing daemons we know (Calico's Felix uses 80).
const RouteProtocol netlink.RouteProtocol = 84

// FeatureDirect is the feature a Tulle host lists in its lease's
// BackendData ({"tulle":{"features":["direct-routing"]}}) when it takes
// direct traffic: its network config enables DirectRouting and its PublicIP
// is an address of its underlay interface (CheckDirect).
const FeatureDirect = "direct-routing"

// FeatureDirectIPv6 is the feature a Tulle host lists in a dual-stack
// network when it takes direct IPv6 traffic on its PublicIPv6: its network
// config enables DirectRouting and its PublicIPv6 is an address of its
// underlay interface (CheckDirect). Peers on its segment then route its
// IPv6 lease via its PublicIPv6.
const FeatureDirectIPv6 = "direct-routing-ipv6"

// dumpRetries bounds the retries of a route dump the kernel interrupted
// (routes changed under it).
const dumpRetries = 5

// directRouter owns the direct routes of one Backend.
type directRouter struct {
	mu       sync.Mutex
	nl       *netlink.Handle // bound to the network namespace of New
	enabled  bool
	link     int    // underlay interface index
	linkName string // for logs
	networks []netip.Prefix
	log      *slog.Logger

	own  bool // our own lease advertises FeatureDirect
	own6 bool // our own lease advertises FeatureDirectIPv6
	// offered are the routes peers' leases offer, before our own and the
	// on-link checks: destination (a peer's lease of either family) ->
	// gateway (its PublicIP or PublicIPv6).
	offered map[netip.Prefix]netip.Addr
	// offered6 is the IPv6 lease each peer (by IPv4 lease) offers, so that
	// its entry in offered goes when the peer's lease changes or goes.
	offered6 map[netip.Prefix]netip.Prefix
	routes   map[netip.Prefix]netip.Addr // our routes in the kernel: destination -> gateway
	synced   bool                        // the kernel's routes were reconciled with a lease snapshot
	closed   bool
}

// newDirectRouter prepares direct routing for opts in the network namespace
// of the calling thread. With DirectRouting off it only removes the routes a
// previous run left.
func newDirectRouter(opts Options) (*directRouter, error) {
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("direct routes: open netlink: %w", err)
	}
	r := &directRouter{
		nl:       nl,
		enabled:  opts.DirectRouting,
		link:     opts.Underlay,
		networks: []netip.Prefix{opts.Network},
		log:      opts.Logger,
		own:      hasFeature(opts.Lease.Attrs.BackendData, FeatureDirect),
		own6:     hasFeature(opts.Lease.Attrs.BackendData, FeatureDirectIPv6),
		offered:  map[netip.Prefix]netip.Addr{},
		offered6: map[netip.Prefix]netip.Prefix{},
		routes:   map[netip.Prefix]netip.Addr{},
	}
	if opts.IPv6Network.IsValid() {
		r.networks = append(r.networks, opts.IPv6Network)
	}
	if !r.enabled {
		if n, err := r.purge(); err != nil {
			r.log.Warn("could not remove direct routes left by an earlier run", "error", err)
		} else if n > 0 {
			r.log.Info("removed direct routes left by an earlier run (DirectRouting is off)", "routes", n)
		}
		return r, nil
	}
	link, err := nl.LinkByIndex(opts.Underlay)
	if err != nil {
		nl.Close()
		return nil, fmt.Errorf("direct routes: underlay interface %d: %w", opts.Underlay, err)
	}
	r.linkName = link.Attrs().Name
	r.log.Info("direct routing on", "iface", r.linkName, "advertised", r.own, "advertised_ipv6", r.own6, "route_protocol", int(RouteProtocol))
	if !r.own {
		r.log.Warn("direct routing is on but our lease does not advertise it (see CheckDirect); every peer keeps the UDP path")
	}
	for _, nw := range r.networks {
		if nw.Addr().Is6() && !r.own6 {
			continue // no direct IPv6 traffic comes to us
		}
		if off, path, fix := forwardingOff(nw.Addr(), r.linkName); off {
			r.log.Warn("forwarding is off on the underlay interface: direct traffic for this host's containers arrives there and will be dropped; "+fix+" (Docker and CNI's bridge plugin do)",
				"iface", r.linkName, "sysctl", path)
		}
	}
	return r, nil
}

// applyDirect makes the direct routes follow one batch of lease events
// (called by Apply with the control state locked, after the route table;
// a no-op unless DirectRouting is on). The first batch is the snapshot of
// all leases: it reconciles the kernel's routes with it.
func (b *Backend) applyDirect(events []subnet.Event) {
	r := b.direct
	if r == nil || !r.enabled {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	touched := map[netip.Prefix]struct{}{} // destinations whose route may change
	ownChanged := false
	for _, ev := range events {
		l := ev.Lease
		if !b.leaseFits(l) {
			continue
		}
		if l.Subnet == b.opts.Lease.Subnet {
			own, own6 := hasFeature(l.Attrs.BackendData, FeatureDirect), hasFeature(l.Attrs.BackendData, FeatureDirectIPv6)
			if ev.Type == subnet.EventAdded && (own != r.own || own6 != r.own6) {
				r.own, r.own6, ownChanged = own, own6, true
				r.log.Info("own lease features changed", "direct_routing", own, "direct_routing_ipv6", own6)
			}
			continue
		}
		public := l.Attrs.PublicIP.Unmap()
		if public == b.opts.PublicIP {
			continue
		}
		touched[l.Subnet] = struct{}{}
		delete(r.offered, l.Subnet)
		if s6, ok := r.offered6[l.Subnet]; ok {
			touched[s6] = struct{}{}
			delete(r.offered, s6)
			delete(r.offered6, l.Subnet)
		}
		if ev.Type != subnet.EventAdded {
			continue
		}
		feats := leaseFeatures(l.Attrs.BackendData)
		if feats.has(FeatureDirect) {
			r.offered[l.Subnet] = public
		}
		// The IPv6 lease only as the route table carries it (fits the
		// network, the peer carries IPv6, no other lease holds it).
		if p := b.ctl.peers[l.Subnet]; p != nil && p.subnet6.IsValid() && p.public6.IsValid() && feats.has(FeatureDirectIPv6) {
			touched[p.subnet6] = struct{}{}
			r.offered[p.subnet6] = p.public6
			r.offered6[l.Subnet] = p.subnet6
		}
	}
	switch {
	case !r.synced:
		r.reconcile()
	case ownChanged:
		for s := range r.routes {
			touched[s] = struct{}{}
		}
		for s := range r.offered {
			touched[s] = struct{}{}
		}
		r.update(touched)
	default:
		r.update(touched)
	}
}

// wanted returns the gateway of the direct route destination s should
// have, or the zero Addr for none.
func (r *directRouter) wanted(s netip.Prefix) netip.Addr {
	gw, ok := r.offered[s]
	own := r.own
	if s.Addr().Is6() {
		own = r.own6
	}
	if !ok || !own || !r.onLink(gw) {
		return netip.Addr{}
	}
	return gw
}

// onLink reports whether the kernel reaches a through our underlay
// interface without a gateway (flannel decides vxlan's DirectRouting the
// same way).
func (r *directRouter) onLink(a netip.Addr) bool {
	routes, err := r.nl.RouteGet(a.AsSlice())
	if err != nil || len(routes) != 1 {
		return false
	}
	rt := routes[0]
	return rt.Gw == nil && rt.LinkIndex == r.link && (rt.Type == unix.RTN_UNICAST || rt.Type == 0)
}

// update brings the routes of the touched destinations to what is wanted.
func (r *directRouter) update(touched map[netip.Prefix]struct{}) {
	added, removed := 0, 0
	for s := range touched {
		want, have := r.wanted(s), r.routes[s]
		switch {
		case want == have:
		case want.IsValid():
			if r.add(s, want) {
				added++
			}
		default:
			if r.del(s, have) {
				removed++
			}
		}
	}
	if added+removed > 0 {
		r.log.Info("direct routes updated", "added", added, "removed", removed, "direct_peers", len(r.routes))
	}
}

// reconcile makes the kernel's routes of our protocol inside the networks
// exactly the wanted ones: stale routes (a peer that left while no tulled
// ran, another gateway or interface) are deleted, wanted ones kept or added.
func (r *directRouter) reconcile() {
	existing, err := r.list()
	if err != nil {
		r.log.Error("direct routes: cannot list the kernel's routes; stale ones may stay", "error", err)
	}
	kept, added, removed := 0, 0, 0
	for _, rt := range existing {
		s, gw := routeKey(rt)
		if want := r.wanted(s); want.IsValid() && want == gw && rt.LinkIndex == r.link {
			r.routes[s] = gw
			kept++
			continue
		}
		if err := r.nl.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			r.log.Warn("direct routes: cannot delete a stale route", "subnet", s, "via", gw, "error", err)
			continue
		}
		r.log.Debug("stale direct route removed", "subnet", s, "via", gw)
		removed++
	}
	for s := range r.offered {
		if _, ok := r.routes[s]; ok {
			continue
		}
		if want := r.wanted(s); want.IsValid() && r.add(s, want) {
			added++
		}
	}
	r.synced = true
	r.log.Info("direct routes reconciled", "kept", kept, "added", added, "stale_removed", removed, "direct_peers", len(r.routes))
}

// add installs (or replaces) the route to s via gw; false if the kernel
// refused, and then the peer keeps the UDP path for s.
func (r *directRouter) add(s netip.Prefix, gw netip.Addr) bool {
	if err := r.nl.RouteReplace(r.route(s, gw)); err != nil {
		r.log.Warn("direct route not added; the peer keeps the UDP path", "subnet", s, "via", gw, "iface", r.linkName, "error", err)
		delete(r.routes, s)
		return false
	}
	r.routes[s] = gw
	r.log.Debug("direct route added", "subnet", s, "via", gw, "iface", r.linkName)
	return true
}

// del removes the route to s via gw.
func (r *directRouter) del(s netip.Prefix, gw netip.Addr) bool {
	delete(r.routes, s)
	if err := r.nl.RouteDel(r.route(s, gw)); err != nil && !errors.Is(err, unix.ESRCH) {
		r.log.Warn("direct route not removed", "subnet", s, "via", gw, "error", err)
		return false
	}
	r.log.Debug("direct route removed", "subnet", s, "via", gw)
	return true
}

func (r *directRouter) route(s netip.Prefix, gw netip.Addr) *netlink.Route {
	return &netlink.Route{
		LinkIndex: r.link,
		Dst:       ipNet(s),
		Gw:        gw.AsSlice(),
		Protocol:  RouteProtocol,
		Table:     unix.RT_TABLE_MAIN,
	}
}

// list returns the main table's routes of our protocol inside the
// networks, both families.
func (r *directRouter) list() ([]netlink.Route, error) {
	var (
		all []netlink.Route
		err error
	)
	for range dumpRetries {
		all, err = r.nl.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("list routes of protocol %d: %w", RouteProtocol, err)
	}
	out := all[:0]
	for _, rt := range all {
		if s, _ := routeKey(rt); s.IsValid() && r.inNetwork(s) {
			out = append(out, rt)
		}
	}
	return out, nil
}

func (r *directRouter) inNetwork(s netip.Prefix) bool {
	for _, nw := range r.networks {
		if nw.Bits() <= s.Bits() && nw.Contains(s.Addr()) {
			return true
		}
	}
	return false
}

// purge deletes every route of our protocol inside the networks and returns
// how many it deleted.
func (r *directRouter) purge() (int, error) {
	existing, err := r.list()
	if err != nil {
		return 0, err
	}
	var errs []error
	n := 0
	for _, rt := range existing {
		if err := r.nl.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			s, gw := routeKey(rt)
			errs = append(errs, fmt.Errorf("delete route %v via %v: %w", s, gw, err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// close removes every direct route (a clean stop leaves none) and releases
// the netlink handle. Apply does nothing afterwards.
func (r *directRouter) close() error {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	defer r.nl.Close()
	clear(r.routes)
	if !r.enabled {
		return nil
	}
	n, err := r.purge()
	if err != nil {
		return fmt.Errorf("direct routes: %w", err)
	}
	if n > 0 {
		r.log.Info("direct routes removed", "routes", n)
	}
	return nil
}

// routeKey returns a route's destination and gateway as netip values.
func routeKey(rt netlink.Route) (netip.Prefix, netip.Addr) {
	var s netip.Prefix
	if rt.Dst != nil {
		if a, ok := netip.AddrFromSlice(rt.Dst.IP); ok {
			ones, _ := rt.Dst.Mask.Size()
			s = netip.PrefixFrom(a.Unmap(), ones)
		}
	}
	gw, _ := netip.AddrFromSlice(rt.Gw)
	return s, gw.Unmap()
}

// CheckDirect reports whether this host can take direct traffic, and so
// may advertise FeatureDirect: public must be an address of the underlay
// interface (index link), since peers route to it as a next hop that they
// resolve on their segment. An address behind NAT or on another interface
// cannot be. It looks at the network namespace of the calling thread.
func CheckDirect(link int, public netip.Addr) error {
	l, err := netlink.LinkByIndex(link)
	if err != nil {
		return fmt.Errorf("underlay interface %d: %w", link, err)
	}
	family := netlink.FAMILY_V4
	if !public.Unmap().Is4() {
		family = netlink.FAMILY_V6
	}
	addrs, err := netlink.AddrList(l, family)
	if err != nil {
		return fmt.Errorf("addresses of %s: %w", l.Attrs().Name, err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == public.Unmap() {
			return nil
		}
	}
	return fmt.Errorf("public IP %v is not an address of the underlay interface %s (behind NAT, or --public-ip names another address): peers could not route to it directly", public, l.Attrs().Name)
}

// forwardingOff reports whether the kernel forwards nothing that arrives on
// interface name for a's family, with the sysctl's path and the advice to
// give. IPv4 checks the incoming interface's flag; IPv6 forwards by
// net.ipv6.conf.all.forwarding (or, since Linux 6.17, the interface's
// force_forwarding). An unreadable flag counts as on: the warning is
// advice, not a gate.
func forwardingOff(a netip.Addr, name string) (off bool, path, fix string) {
	read := func(p string) string {
		v, err := os.ReadFile(p)
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(v))
	}
	if a.Unmap().Is4() {
		path = "/proc/sys/net/ipv4/conf/" + name + "/forwarding"
		return read(path) == "0", path, "set net.ipv4.ip_forward=1"
	}
	path = "/proc/sys/net/ipv6/conf/all/forwarding"
	return read(path) == "0" && read("/proc/sys/net/ipv6/conf/"+name+"/force_forwarding") != "1", path,
		"set net.ipv6.conf.all.forwarding=1"
}
