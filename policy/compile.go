package policy

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"github.com/tulle-net/tulle/subnet"
)

// Input is everything a host's ruleset depends on.
type Input struct {
	Policies []*Policy
	Netsets  map[string]*Netset
	// Leases are all leases of the network, for host:PUBLICIP matches.
	Leases []subnet.Lease
	// Local are this host's own subnets (its lease, both families): the
	// workloads it enforces for. Selected addresses elsewhere are left to
	// the hosts that own them.
	Local []netip.Prefix
}

// Direction is ingress or egress.
type Direction uint8

// Directions.
const (
	DirIngress Direction = iota + 1
	DirEgress
)

func (d Direction) String() string {
	if d == DirIngress {
		return "ingress"
	}
	return "egress"
}

// Family is an address family.
type Family uint8

// Families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) bits() int {
	if f == IPv4 {
		return 32
	}
	return 128
}

// nft is the family's name in nftables' syntax.
func (f Family) nft() string {
	if f == IPv4 {
		return "ip"
	}
	return "ip6"
}

var families = []Family{IPv4, IPv6}

// SetKind is what a set holds.
type SetKind uint8

// Kinds of set.
const (
	SetIPv4 SetKind = iota + 1
	SetIPv6
	SetPorts
)

// Set is a named interval set of the ruleset.
type Set struct {
	Name  string
	Kind  SetKind
	Addrs []AddrRange // SetIPv4, SetIPv6: sorted, disjoint, not adjacent
	Ports []PortRange // SetPorts: sorted, disjoint, not adjacent
}

// RuleID names a rule of a policy, as metrics and comments show it.
type RuleID struct {
	Policy    string
	Direction Direction
	Index     int // 1-based position in the policy's Ingress or Egress list
	Action    Action
}

// CompiledRule is one rule for one address family in the egress or
// ingress chain: it matches when the workload (source for egress,
// destination for ingress) is in Workloads and the peer, protocol and port
// match; then Action decides.
type CompiledRule struct {
	RuleID
	Family    Family
	Workloads string   // set of the policy's workloads on this host
	Peers     string   // set of peer addresses; "" means anywhere
	Protocol  Protocol // 0: any
	Ports     string   // set of destination ports; "" means any
}

// Comment is the rule's nftables comment; counters are read back by it.
func (r CompiledRule) Comment() string {
	return fmt.Sprintf("%s %s rule %d %s %s", r.Policy, r.Direction, r.Index, lower(r.Action), r.Family.nft())
}

func lower(a Action) string {
	if a == Allow {
		return "allow"
	}
	return "deny"
}

// Ruleset is what a host installs: the whole inet table, compiled.
//
// The forward chain accepts packets of established connections first
// (replies of allowed connections, and the rest of them), sends packets
// from workloads with egress policy to the egress chain and packets to
// workloads with ingress policy to the ingress chain, and accepts the rest.
// In the egress chain an Allow returns (so ingress is still checked when
// the destination is a workload of this host too) and a Deny drops; in the
// ingress chain an Allow accepts. Each of the two ends in a default deny.
type Ruleset struct {
	Sets    []*Set
	Egress  []CompiledRule
	Ingress []CompiledRule
	// EgressWorkloads and IngressWorkloads name, per family, the set of
	// this host's workloads with egress (ingress) policy; "" when none.
	EgressWorkloads, IngressWorkloads map[Family]string
	// Policies in evaluation order.
	Policies []string
	// Warnings are references that resolve to nothing (a netset that does
	// not exist, a host with no lease): they match nothing.
	Warnings []string
	Local    []netip.Prefix

	sets map[string]*Set // content key -> set
}

// sortPolicies orders policies for evaluation: by Order (absent last),
// then by name.
func sortPolicies(ps []*Policy) []*Policy {
	out := slices.Clone(ps)
	slices.SortStableFunc(out, func(a, b *Policy) int {
		switch {
		case a.Order != nil && b.Order != nil:
			if c := cmp.Compare(*a.Order, *b.Order); c != 0 {
				return c
			}
		case a.Order != nil:
			return -1
		case b.Order != nil:
			return 1
		}
		return cmp.Compare(a.Name, b.Name)
	})
	return out
}

// Compile builds the ruleset of the host whose subnets are in.Local. It
// does not fail: the policies are valid (ParsePolicy), and a reference to
// something that does not exist matches nothing and is reported in
// Warnings.
func Compile(in Input) *Ruleset {
	rs := &Ruleset{
		EgressWorkloads:  map[Family]string{},
		IngressWorkloads: map[Family]string{},
		Local:            slices.Clone(in.Local),
		sets:             map[string]*Set{},
	}
	r := resolver{in: in, warned: map[string]bool{}, rs: rs}
	var union [3][]netip.Prefix // by Direction
	for _, p := range sortPolicies(in.Policies) {
		rs.Policies = append(rs.Policies, p.Name)
		selected := intersect(r.resolve(p.Selector, "policy "+p.Name+": Selector"), in.Local)
		for _, dir := range []Direction{DirEgress, DirIngress} {
			rules := p.rules(dir)
			if rules == nil {
				continue
			}
			union[dir] = append(union[dir], selected...)
			for _, fam := range families {
				wl := normalize(selected, fam.bits())
				if len(wl) == 0 {
					continue
				}
				wlSet := rs.addrSet(wl, fam, "sel-"+p.Name)
				for i, rule := range rules {
					cr := CompiledRule{
						RuleID:    RuleID{Policy: p.Name, Direction: dir, Index: i + 1, Action: rule.Action},
						Family:    fam,
						Workloads: wlSet,
						Protocol:  rule.Protocol,
					}
					if rule.Peers != nil {
						field := fmt.Sprintf("policy %s: %s[%d].%s", p.Name, dir.field(), i, dir.peerField())
						peers := normalize(r.resolve(rule.Peers, field), fam.bits())
						if len(peers) == 0 {
							continue // matches nothing in this family
						}
						name := fmt.Sprintf("peer-%s-%s%d", p.Name, dir.short(), i+1)
						if len(rule.Peers) == 1 && rule.Peers[0].Kind == MatchSet {
							name = "netset-" + rule.Peers[0].Name
						}
						cr.Peers = rs.addrSet(peers, fam, name)
					}
					if rule.Ports != nil {
						cr.Ports = rs.portSet(rule.Ports, fmt.Sprintf("ports-%s-%s%d", p.Name, dir.short(), i+1))
					}
					if dir == DirIngress {
						rs.Ingress = append(rs.Ingress, cr)
					} else {
						rs.Egress = append(rs.Egress, cr)
					}
				}
			}
		}
	}
	for _, fam := range families {
		if wl := normalize(union[DirEgress], fam.bits()); len(wl) > 0 {
			rs.EgressWorkloads[fam] = rs.addrSet(wl, fam, "egress-workloads")
		}
		if wl := normalize(union[DirIngress], fam.bits()); len(wl) > 0 {
			rs.IngressWorkloads[fam] = rs.addrSet(wl, fam, "ingress-workloads")
		}
	}
	return rs
}

func (d Direction) short() string {
	if d == DirIngress {
		return "in"
	}
	return "eg"
}

// field is the policy's field of the direction's rules; peerField the
// field of a rule naming its peers.
func (d Direction) field() string {
	if d == DirIngress {
		return "Ingress"
	}
	return "Egress"
}

func (d Direction) peerField() string {
	if d == DirIngress {
		return "Source"
	}
	return "Destination"
}

// rules are p's rules of direction dir: nil when p has no such list.
func (p *Policy) rules(dir Direction) []Rule {
	if dir == DirIngress {
		return p.Ingress
	}
	return p.Egress
}

// addrSet returns the name of the set holding exactly rs, adding it (as
// base-ip or base-ip6) if no set holds those addresses yet.
func (rs *Ruleset) addrSet(ranges []AddrRange, fam Family, base string) string {
	kind := SetIPv4
	if fam == IPv6 {
		kind = SetIPv6
	}
	return rs.set(strconv.Itoa(int(kind))+":"+rangesKey(ranges), base+"-"+fam.nft(), Set{Kind: kind, Addrs: ranges})
}

func (rs *Ruleset) portSet(ports []PortRange, base string) string {
	sorted := slices.Clone(ports)
	slices.SortFunc(sorted, func(a, b PortRange) int { return cmp.Compare(a.First, b.First) })
	merged := sorted[:0]
	for _, p := range sorted {
		if n := len(merged); n > 0 && uint32(p.First) <= uint32(merged[n-1].Last)+1 {
			merged[n-1].Last = max(merged[n-1].Last, p.Last)
			continue
		}
		merged = append(merged, p)
	}
	return rs.set(fmt.Sprintf("%d:%v", SetPorts, merged), base, Set{Kind: SetPorts, Ports: merged})
}

// set returns the name of the set whose content is key, adding s as a new
// set named base (base-2, ... if that is taken) if there is none.
func (rs *Ruleset) set(key, base string, s Set) string {
	if old, ok := rs.sets[key]; ok {
		return old.Name
	}
	s.Name = base
	for i := 2; rs.SetByName(s.Name) != nil; i++ {
		s.Name = fmt.Sprintf("%s-%d", base, i)
	}
	rs.sets[key] = &s
	rs.Sets = append(rs.Sets, &s)
	return s.Name
}

// SetByName returns the named set, nil if there is none.
func (rs *Ruleset) SetByName(name string) *Set {
	for _, s := range rs.Sets {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// Rules returns the compiled rules of both chains, egress first.
func (rs *Ruleset) Rules() []CompiledRule {
	return append(slices.Clone(rs.Egress), rs.Ingress...)
}

// resolver turns matches into prefixes.
type resolver struct {
	in     Input
	rs     *Ruleset
	warned map[string]bool
}

func (r *resolver) warn(format string, args ...any) {
	w := fmt.Sprintf(format, args...)
	if !r.warned[w] {
		r.warned[w] = true
		r.rs.Warnings = append(r.rs.Warnings, w)
	}
}

// resolve returns the prefixes the matches name (both families).
func (r *resolver) resolve(ms []Match, field string) []netip.Prefix {
	var out []netip.Prefix
	for _, m := range ms {
		switch m.Kind {
		case MatchPrefix:
			out = append(out, m.Prefix)
		case MatchSet:
			n, ok := r.in.Netsets[m.Name]
			if !ok {
				r.warn("%s: netset %s does not exist; it matches nothing", field, m.Name)
				continue
			}
			out = append(out, n.Nets...)
		case MatchHost:
			found := false
			for _, l := range r.in.Leases {
				if l.Attrs.PublicIP != m.Host && l.Attrs.PublicIPv6 != m.Host {
					continue
				}
				found = true
				for _, s := range []netip.Prefix{l.Subnet, l.IPv6Subnet} {
					if s.IsValid() {
						out = append(out, s)
					}
				}
			}
			if !found {
				r.warn("%s: host %s holds no lease; it matches nothing", field, m.Host)
			}
		}
	}
	return out
}
