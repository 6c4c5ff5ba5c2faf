package policy

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// Policy is one policy document. Name comes from its etcd key (or a file's
// "Name" field), not from the stored JSON.
type Policy struct {
	Name string
	// Order: lower first; nil sorts after every policy with an Order, as in
	// Calico. Ties are broken by Name.
	Order *float64
	// Selector: the workloads the policy applies to (at least one entry).
	Selector []Match
	// Ingress and Egress: nil when the document has no such list (the
	// policy leaves that direction alone); an empty, non-nil list denies
	// everything in that direction to the selected workloads.
	Ingress []Rule
	Egress  []Rule
}

// Rule is one rule of a policy; the first rule that matches a connection
// decides it.
type Rule struct {
	Action Action
	// Protocol: 0 means any protocol.
	Protocol Protocol
	// Peers: Source for an ingress rule, Destination for an egress rule.
	// nil means anywhere; a list that resolves to no address matches
	// nothing.
	Peers []Match
	// Ports: destination ports, only with TCP, UDP or SCTP; nil means any.
	Ports []PortRange
}

// Action is what a matching rule does.
type Action uint8

// Actions.
const (
	Allow Action = iota + 1
	Deny
)

func (a Action) String() string {
	switch a {
	case Allow:
		return "Allow"
	case Deny:
		return "Deny"
	}
	return "Action(" + strconv.Itoa(int(a)) + ")"
}

// Protocol is an IP protocol number (IPv6: the upper-layer protocol); 0
// means any.
type Protocol uint8

// Protocols with names.
const (
	ProtoICMP   Protocol = 1
	ProtoTCP    Protocol = 6
	ProtoUDP    Protocol = 17
	ProtoICMPv6 Protocol = 58
	ProtoSCTP   Protocol = 132
)

var protoNames = map[Protocol]string{ProtoICMP: "ICMP", ProtoTCP: "TCP", ProtoUDP: "UDP", ProtoICMPv6: "ICMPv6", ProtoSCTP: "SCTP"}

func (p Protocol) String() string {
	if n, ok := protoNames[p]; ok {
		return n
	}
	return strconv.Itoa(int(p))
}

// HasPorts says whether the protocol has ports a rule can name.
func (p Protocol) HasPorts() bool { return p == ProtoTCP || p == ProtoUDP || p == ProtoSCTP }

// PortRange is a destination port or an inclusive range of them.
type PortRange struct{ First, Last uint16 }

func (r PortRange) String() string {
	if r.First == r.Last {
		return strconv.Itoa(int(r.First))
	}
	return fmt.Sprintf("%d-%d", r.First, r.Last)
}

// MatchKind says what a Match names.
type MatchKind uint8

// Kinds of Match.
const (
	MatchPrefix MatchKind = iota + 1 // "198.18.0.0/16", "2001:db8::/32", "198.18.1.5"
	MatchSet                         // "set:NAME": the netset NAME
	MatchHost                        // "host:PUBLICIP": every subnet leased by that host
)

// Match is one entry of a Selector, Source or Destination.
type Match struct {
	Kind   MatchKind
	Prefix netip.Prefix // MatchPrefix
	Name   string       // MatchSet
	Host   netip.Addr   // MatchHost
}

func (m Match) String() string {
	switch m.Kind {
	case MatchPrefix:
		if m.Prefix.IsSingleIP() {
			return m.Prefix.Addr().String()
		}
		return m.Prefix.String()
	case MatchSet:
		return "set:" + m.Name
	case MatchHost:
		return "host:" + m.Host.String()
	}
	return "?"
}

// Netset is a named list of prefixes at <prefix>/netsets/<name>.
type Netset struct {
	Name string
	Nets []netip.Prefix
}

// MaxNameLen is the longest policy or netset name.
const MaxNameLen = 63

var nameRE = regexp.MustCompile(`^[a-z0-9-]{1,63}$`)

// CheckName checks a policy or netset name: lower-case letters, digits
// and '-', 1 to 63 characters.
func CheckName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("name %q: want 1 to %d lower-case letters, digits or '-'", name, MaxNameLen)
	}
	return nil
}

// ParseMatch reads one Selector, Source or Destination entry.
func ParseMatch(s string) (Match, error) {
	switch {
	case strings.HasPrefix(s, "set:"):
		n := strings.TrimPrefix(s, "set:")
		if err := CheckName(n); err != nil {
			return Match{}, fmt.Errorf("netset %w", err)
		}
		return Match{Kind: MatchSet, Name: n}, nil
	case strings.HasPrefix(s, "host:"):
		a, err := parseAddr(strings.TrimPrefix(s, "host:"))
		if err != nil {
			return Match{}, err
		}
		return Match{Kind: MatchHost, Host: a}, nil
	}
	p, err := parsePrefix(s)
	if err != nil {
		return Match{}, fmt.Errorf("%w (or set:NAME, host:PUBLICIP)", err)
	}
	return Match{Kind: MatchPrefix, Prefix: p}, nil
}

func parseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return a, fmt.Errorf("not an IP address")
	}
	if a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("an address with a zone is not allowed")
	}
	if a.Is4In6() {
		return netip.Addr{}, fmt.Errorf("IPv4-mapped IPv6 address: write %s", a.Unmap())
	}
	return a, nil
}

// parsePrefix reads a CIDR or a single address (as /32 or /128). A prefix
// with host bits set is refused: it most likely says something else than
// meant.
func parsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := parseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("not a CIDR or an IP address")
		}
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return p, fmt.Errorf("not a CIDR or an IP address")
	}
	if p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("IPv4-mapped IPv6 prefix")
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("host bits set (did you mean %s?)", p.Masked())
	}
	return p, nil
}

// parsePort reads "8080" or "9000-9100".
func parsePort(s string) (PortRange, error) {
	one := func(s string) (uint16, error) {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 65535 {
			return 0, fmt.Errorf("want a port 1..65535 or a range FIRST-LAST")
		}
		return uint16(n), nil
	}
	a, b, isRange := strings.Cut(s, "-")
	first, err := one(a)
	if err != nil {
		return PortRange{}, err
	}
	last := first
	if isRange {
		if last, err = one(b); err != nil {
			return PortRange{}, err
		}
		if last < first {
			return PortRange{}, fmt.Errorf("range %d-%d is backwards", first, last)
		}
	}
	return PortRange{first, last}, nil
}

// parseProtocol reads a protocol name (TCP, UDP, SCTP, ICMP, ICMPv6, in any
// case) or a number 1..255.
func parseProtocol(s string) (Protocol, error) {
	for p, n := range protoNames {
		if strings.EqualFold(s, n) {
			return p, nil
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("want TCP, UDP, SCTP, ICMP, ICMPv6 or a protocol number 1..255")
	}
	if n < 1 || n > 255 {
		return 0, fmt.Errorf("protocol number out of range 1..255")
	}
	return Protocol(n), nil
}

// MarshalJSON writes the document as it is stored in etcd: the model's
// field names, without Name.
func (p *Policy) MarshalJSON() ([]byte, error) {
	type rule struct {
		Action      string
		Protocol    any      `json:",omitempty"`
		Source      []string `json:",omitzero"`
		Destination []string `json:",omitzero"`
		Ports       []string `json:",omitzero"`
	}
	rules := func(rs []Rule, ingress bool) []rule {
		if rs == nil {
			return nil
		}
		out := make([]rule, 0, len(rs))
		for _, r := range rs {
			o := rule{Action: r.Action.String()}
			switch {
			case r.Protocol == 0:
			case protoNames[r.Protocol] != "":
				o.Protocol = r.Protocol.String()
			default:
				o.Protocol = int(r.Protocol)
			}
			if ingress {
				o.Source = matchStrings(r.Peers)
			} else {
				o.Destination = matchStrings(r.Peers)
			}
			if r.Ports != nil {
				o.Ports = make([]string, len(r.Ports))
				for i, pr := range r.Ports {
					o.Ports[i] = pr.String()
				}
			}
			out = append(out, o)
		}
		return out
	}
	return json.Marshal(struct {
		Order    *float64 `json:",omitempty"`
		Selector []string
		Ingress  []rule `json:",omitzero"`
		Egress   []rule `json:",omitzero"`
	}{p.Order, matchStrings(p.Selector), rules(p.Ingress, true), rules(p.Egress, false)})
}

// MarshalJSON writes the netset as it is stored in etcd.
func (n *Netset) MarshalJSON() ([]byte, error) {
	nets := make([]string, len(n.Nets))
	for i, p := range n.Nets {
		nets[i] = p.String()
	}
	return json.Marshal(struct{ Nets []string }{nets})
}

func matchStrings(ms []Match) []string {
	if ms == nil {
		return nil
	}
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.String()
	}
	return out
}

// Hosts returns the public addresses the policy names in host: matches
// (Selector and rule peers): the hosts whose leases its ruleset follows.
func (p *Policy) Hosts() []netip.Addr {
	var out []netip.Addr
	add := func(ms []Match) {
		for _, m := range ms {
			if m.Kind == MatchHost {
				out = append(out, m.Host)
			}
		}
	}
	add(p.Selector)
	for _, rules := range [][]Rule{p.Ingress, p.Egress} {
		for _, r := range rules {
			add(r.Peers)
		}
	}
	return out
}
