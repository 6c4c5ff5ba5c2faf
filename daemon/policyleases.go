package daemon

import (
	"net/netip"
	"slices"

	"github.com/tulle-net/tulle/subnet"
)

// leaseIndex is the policy runner's view of the leases, kept by lease
// events so that a change costs O(changes), not O(leases). Only host:
// matches need leases, so it keeps just what they need: the subnets each
// public address holds (a few dozen bytes a lease, not the lease).
type leaseIndex struct {
	bySubnet map[netip.Prefix]heldBy       // by IPv4 subnet, as etcd keys leases
	byHost   map[netip.Addr][]netip.Prefix // both subnets of each lease of a public address
}

// heldBy is what the index keeps of a lease.
type heldBy struct {
	v6            netip.Prefix // the lease's IPv6 subnet, if any
	public, pubv6 netip.Addr
}

func newLeaseIndex() leaseIndex {
	return leaseIndex{bySubnet: map[netip.Prefix]heldBy{}, byHost: map[netip.Addr][]netip.Prefix{}}
}

// apply takes in one event and calls touched with the public addresses
// whose subnets changed.
func (x *leaseIndex) apply(ev subnet.Event, touched func(netip.Addr)) {
	l := ev.Lease
	now := heldBy{v6: l.IPv6Subnet, public: l.Attrs.PublicIP, pubv6: l.Attrs.PublicIPv6}
	if old, had := x.bySubnet[l.Subnet]; had {
		if ev.Type == subnet.EventAdded && old == now {
			return // a renewal: nothing a policy sees
		}
		delete(x.bySubnet, l.Subnet)
		for _, a := range old.addrs() {
			x.byHost[a] = slices.DeleteFunc(x.byHost[a], func(p netip.Prefix) bool { return p == l.Subnet || p == old.v6 })
			if len(x.byHost[a]) == 0 {
				delete(x.byHost, a)
			}
			touched(a)
		}
	}
	if ev.Type == subnet.EventAdded {
		x.bySubnet[l.Subnet] = now
		for _, a := range now.addrs() {
			x.byHost[a] = append(x.byHost[a], l.Subnet)
			if now.v6.IsValid() {
				x.byHost[a] = append(x.byHost[a], now.v6)
			}
			touched(a)
		}
	}
}

// addrs returns the valid public addresses of a lease.
func (h heldBy) addrs() []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{h.public, h.pubv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// of returns, as leases for policy.Input, the subnets held by the public
// addresses in hosts.
func (x *leaseIndex) of(hosts map[netip.Addr]bool) []subnet.Lease {
	var out []subnet.Lease
	for a := range hosts {
		for _, s := range x.byHost[a] {
			// One lease per subnet, held by a: all policy.Compile reads.
			l := subnet.Lease{Subnet: s, Attrs: subnet.LeaseAttrs{PublicIP: a}}
			if s.Addr().Is6() {
				l.Subnet, l.IPv6Subnet = netip.Prefix{}, s
			}
			out = append(out, l)
		}
	}
	return out
}
