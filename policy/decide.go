package policy

import (
	"net/netip"
	"slices"
)

// Flow is the first packet of a connection forwarded by a host.
type Flow struct {
	Src, Dst netip.Addr
	Protocol Protocol
	Port     uint16 // destination port (TCP, UDP, SCTP)
}

// Decision says what the policies decide for a flow, and which rule did.
type Decision struct {
	Allowed bool
	// Egress and Ingress: the deciding rule in each direction; nil when the
	// direction is not filtered (the workload is not this host's, or no
	// policy selects it for that direction). A zero Index means the default
	// deny.
	Egress, Ingress *RuleID
}

// Decide is the model's meaning, written directly from it: what a host
// whose own subnets are in.Local does with the first packet of flow. The
// compiled ruleset must agree with it for every flow (the tests check
// that); the daemon does not use it.
func Decide(in Input, f Flow) Decision {
	r := resolver{in: in, rs: &Ruleset{}, warned: map[string]bool{}}
	contains := func(ps []netip.Prefix, a netip.Addr) bool {
		return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(a) })
	}
	direction := func(dir Direction, workload, peer netip.Addr) *RuleID {
		if !contains(in.Local, workload) {
			return nil
		}
		selected := false
		for _, p := range sortPolicies(in.Policies) {
			rules := p.rules(dir)
			if rules == nil || !contains(r.resolve(p.Selector, ""), workload) {
				continue
			}
			selected = true
			for i, rule := range rules {
				if rule.Protocol != 0 && rule.Protocol != f.Protocol {
					continue
				}
				if rule.Ports != nil && !slices.ContainsFunc(rule.Ports, func(pr PortRange) bool { return pr.First <= f.Port && f.Port <= pr.Last }) {
					continue
				}
				if rule.Peers != nil && !contains(r.resolve(rule.Peers, ""), peer) {
					continue
				}
				return &RuleID{Policy: p.Name, Direction: dir, Index: i + 1, Action: rule.Action}
			}
		}
		if selected {
			return &RuleID{Direction: dir, Action: Deny} // the default deny
		}
		return nil
	}
	d := Decision{Allowed: true}
	d.Egress = direction(DirEgress, f.Src, f.Dst)
	if d.Egress != nil && d.Egress.Action == Deny {
		d.Allowed = false
		return d
	}
	d.Ingress = direction(DirIngress, f.Dst, f.Src)
	if d.Ingress != nil && d.Ingress.Action == Deny {
		d.Allowed = false
	}
	return d
}
