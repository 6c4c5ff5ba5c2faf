package daemon

import (
	"net/netip"
	"slices"

	"github.com/tulle-net/tulle/subnet"
)

// leaseIndex is the policy runner's copy of the leases, kept by lease
// events so that a change costs O(changes), not O(leases): only host:
// matches need leases, so the index answers "which leases does this host
// hold" and a change matters only when a policy names its host.
type leaseIndex struct {
	bySubnet map[netip.Prefix]subnet.Lease // by IPv4 subnet, as etcd keys them
	byHost   map[netip.Addr][]subnet.Lease // by PublicIP and by PublicIPv6
}

func newLeaseIndex() leaseIndex {
	return leaseIndex{bySubnet: map[netip.Prefix]subnet.Lease{}, byHost: map[netip.Addr][]subnet.Lease{}}
}

// apply takes in one event and calls touched with the public addresses
// whose leases changed.
func (x *leaseIndex) apply(ev subnet.Event, touched func(netip.Addr)) {
	l := ev.Lease
	if old, had := x.bySubnet[l.Subnet]; had {
		if ev.Type == subnet.EventAdded && old.Equal(l) {
			return // a renewal: nothing a policy sees
		}
		delete(x.bySubnet, l.Subnet)
		x.forHosts(old, touched, func(a netip.Addr) {
			x.byHost[a] = slices.DeleteFunc(x.byHost[a], func(h subnet.Lease) bool { return h.Subnet == old.Subnet })
			if len(x.byHost[a]) == 0 {
				delete(x.byHost, a)
			}
		})
	}
	if ev.Type == subnet.EventAdded {
		x.bySubnet[l.Subnet] = l
		x.forHosts(l, touched, func(a netip.Addr) { x.byHost[a] = append(x.byHost[a], l) })
	}
}

// forHosts calls f, then touched, for each public address of l.
func (x *leaseIndex) forHosts(l subnet.Lease, touched, f func(netip.Addr)) {
	for _, a := range []netip.Addr{l.Attrs.PublicIP, l.Attrs.PublicIPv6} {
		if a.IsValid() {
			f(a)
			touched(a)
		}
	}
}

// of returns the leases held by the hosts in hosts, each once.
func (x *leaseIndex) of(hosts map[netip.Addr]bool) []subnet.Lease {
	var out []subnet.Lease
	seen := map[netip.Prefix]bool{}
	for a := range hosts {
		for _, l := range x.byHost[a] {
			if !seen[l.Subnet] {
				seen[l.Subnet] = true
				out = append(out, l)
			}
		}
	}
	return out
}
