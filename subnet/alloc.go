package subnet

import (
	"net/netip"
)

// Allocation is the subnet (and, in a dual-stack network, the IPv6 subnet)
// that a new lease would take. In a dual-stack network the i-th IPv4 subnet
// from SubnetMin is paired with the i-th IPv6 subnet from IPv6SubnetMin.
type Allocation struct {
	Subnet     netip.Prefix
	IPv6Subnet netip.Prefix
}

// Key is the lease key the allocation would be written under.
func (a Allocation) Key() string { return Lease{Subnet: a.Subnet, IPv6Subnet: a.IPv6Subnet}.Key() }

// String is for logs and errors: "198.18.79.0/24" or
// "198.18.79.0/24+2001:db8:0:4f::/64".
func (a Allocation) String() string {
	return Lease{Subnet: a.Subnet, IPv6Subnet: a.IPv6Subnet}.String()
}

// ContainsSubnet reports whether p is a subnet a lease may hold in this
// network: IPv4, SubnetLen long, aligned, between SubnetMin and SubnetMax.
// This is flannel's test for reusing a key.
func (c *Config) ContainsSubnet(p netip.Prefix) bool {
	return c.EnableIPv4 && p.IsValid() && p.Addr().Is4() && p.Bits() == c.SubnetLen && p.Masked() == p &&
		!p.Addr().Less(c.SubnetMin) && !c.SubnetMax.Less(p.Addr())
}

// ContainsIPv6Subnet is ContainsSubnet for the IPv6 side of the network.
func (c *Config) ContainsIPv6Subnet(p netip.Prefix) bool {
	return c.EnableIPv6 && p.IsValid() && p.Addr().Is6() && p.Bits() == c.IPv6SubnetLen && p.Masked() == p &&
		!p.Addr().Less(c.IPv6SubnetMin) && !c.IPv6SubnetMax.Less(p.Addr())
}

// Fits reports whether l's subnets fit this network (both sides of a
// dual-stack network; an IPv6 subnet on an IPv4-only network does not fit).
func (c *Config) Fits(l Lease) bool {
	if c.EnableIPv4 != l.Subnet.IsValid() || c.EnableIPv6 != l.IPv6Subnet.IsValid() {
		return false
	}
	return (!c.EnableIPv4 || c.ContainsSubnet(l.Subnet)) && (!c.EnableIPv6 || c.ContainsIPv6Subnet(l.IPv6Subnet))
}

// SubnetCount is the number of allocations between the limits (in a
// dual-stack network the smaller of both sides). Allocation needs an IPv4
// network; it is 0 without one.
func (c *Config) SubnetCount() int {
	if !c.EnableIPv4 {
		return 0
	}
	n := uint64((v4num(c.SubnetMax)-v4num(c.SubnetMin))>>(32-c.SubnetLen)) + 1
	if c.EnableIPv6 {
		d := u128Of(c.IPv6SubnetMax).sub(u128Of(c.IPv6SubnetMin)).shr(128 - c.IPv6SubnetLen)
		if d.hi == 0 && d.lo < n {
			n = d.lo + 1
		}
	}
	return int(n)
}

// AllocationAt returns the i-th allocation from SubnetMin, false if i is out
// of range.
func (c *Config) AllocationAt(i int) (Allocation, bool) {
	if i < 0 || i >= c.SubnetCount() {
		return Allocation{}, false
	}
	a := Allocation{Subnet: netip.PrefixFrom(v4addr(v4num(c.SubnetMin)+uint32(i)<<(32-c.SubnetLen)), c.SubnetLen)}
	if c.EnableIPv6 {
		off := u128{lo: uint64(i)}.shl(128 - c.IPv6SubnetLen)
		v6, _ := u128Of(c.IPv6SubnetMin).add(off)
		a.IPv6Subnet = netip.PrefixFrom(v6.addr(), c.IPv6SubnetLen)
	}
	return a, true
}

// AllocationOf returns the allocation whose IPv4 subnet is p (with its
// paired IPv6 subnet in a dual-stack network), false if p does not fit.
func (c *Config) AllocationOf(p netip.Prefix) (Allocation, bool) {
	if !c.ContainsSubnet(p) {
		return Allocation{}, false
	}
	return c.AllocationAt(int((v4num(p.Addr()) - v4num(c.SubnetMin)) >> (32 - c.SubnetLen)))
}

// PreviousAllocation is the allocation a host asks for again, after its
// key is gone, from the subnets its subnet.env recorded: prev4's
// allocation, with prev6 in place of the IPv6 subnet paired with prev4
// when prev6 fits the network (flannel reuses both as they were, and its
// random picks do not pair them). prev6 is ignored in an IPv4-only
// network; false if prev4 does not fit.
func (c *Config) PreviousAllocation(prev4, prev6 netip.Prefix) (Allocation, bool) {
	a, ok := c.AllocationOf(prev4)
	if !ok {
		return Allocation{}, false
	}
	if prev6.IsValid() && c.ContainsIPv6Subnet(prev6) {
		a.IPv6Subnet = prev6
	}
	return a, true
}

// Occupancy is the set of subnets held by keys in the registry (leases and
// reservations), for finding free subnets quickly.
type Occupancy struct {
	v4, v6     map[netip.Prefix]struct{}
	odd4, odd6 []netip.Prefix // held prefixes of another length: checked for overlap
	lenV4      int
	lenV6      int
}

// Occupancy indexes the subnets held by leases (every key counts, whoever
// holds it, lease or reservation).
func (c *Config) Occupancy(leases []Lease) *Occupancy {
	o := &Occupancy{v4: map[netip.Prefix]struct{}{}, v6: map[netip.Prefix]struct{}{}, lenV4: c.SubnetLen, lenV6: c.IPv6SubnetLen}
	for _, l := range leases {
		if p := l.Subnet; p.IsValid() {
			if p.Bits() == o.lenV4 && p.Masked() == p {
				o.v4[p] = struct{}{}
			} else {
				o.odd4 = append(o.odd4, p)
			}
		}
		if p := l.IPv6Subnet; p.IsValid() {
			if p.Bits() == o.lenV6 && p.Masked() == p {
				o.v6[p] = struct{}{}
			} else {
				o.odd6 = append(o.odd6, p)
			}
		}
	}
	return o
}

// Free reports whether no key holds or overlaps a's subnets.
func (o *Occupancy) Free(a Allocation) bool {
	return free(a.Subnet, o.v4, o.odd4) && free(a.IPv6Subnet, o.v6, o.odd6)
}

func free(p netip.Prefix, exact map[netip.Prefix]struct{}, odd []netip.Prefix) bool {
	if !p.IsValid() {
		return true
	}
	if _, ok := exact[p]; ok {
		return false
	}
	for _, q := range odd {
		if q.Overlaps(p) {
			return false
		}
	}
	return true
}

// FreeAllocations returns up to limit free allocations from SubnetMin
// upward, in order (flannel collects 100 and picks one at random).
func (c *Config) FreeAllocations(occ *Occupancy, limit int) []Allocation {
	var out []Allocation
	n := c.SubnetCount()
	for i := 0; i < n && len(out) < limit; i++ {
		a, _ := c.AllocationAt(i)
		if occ.Free(a) {
			out = append(out, a)
		}
	}
	return out
}
