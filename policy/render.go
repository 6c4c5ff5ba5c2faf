package policy

import (
	"fmt"
	"io"
	"strings"
)

// Names of Tulle's nftables objects.
const (
	TableName    = "tulle"
	ChainForward = "forward"
	ChainEgress  = "egress-policy"
	ChainIngress = "ingress-policy"
)

// Comments of the rules that are not a policy's.
const (
	CommentEstablished    = "established and related"
	CommentNeighbour      = "IPv6 neighbour discovery"
	CommentDefaultIngress = "default deny ingress"
	CommentDefaultEgress  = "default deny egress"
)

// WriteTo writes the ruleset in nftables' own syntax, as `nft list table
// inet tulle` would show it once installed (without counter values).
func (rs *Ruleset) WriteTo(w io.Writer) (int64, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "# policies in order: %s\n", strings.Join(rs.Policies, ", "))
	local := make([]string, len(rs.Local))
	for i, p := range rs.Local {
		local[i] = p.String()
	}
	fmt.Fprintf(&b, "# workloads of this host: %s\n", strings.Join(local, ", "))
	for _, w := range rs.Warnings {
		fmt.Fprintf(&b, "# warning: %s\n", w)
	}
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	for _, s := range rs.Sets {
		typ := map[SetKind]string{SetIPv4: "ipv4_addr", SetIPv6: "ipv6_addr", SetPorts: "inet_service"}[s.Kind]
		fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n\t\tflags interval\n", s.Name, typ)
		var elems []string
		for _, r := range s.Addrs {
			for _, p := range rangePrefixes(r) {
				if p.IsSingleIP() {
					elems = append(elems, p.Addr().String())
				} else {
					elems = append(elems, p.String())
				}
			}
		}
		for _, p := range s.Ports {
			elems = append(elems, p.String())
		}
		if len(elems) > 0 {
			fmt.Fprintf(&b, "\t\telements = { %s }\n", strings.Join(elems, ", "))
		}
		b.WriteString("\t}\n")
	}
	fmt.Fprintf(&b, "\tchain %s {\n\t\ttype filter hook forward priority filter; policy accept;\n", ChainForward)
	fmt.Fprintf(&b, "\t\tct state established,related counter accept comment %q\n", CommentEstablished)
	fmt.Fprintf(&b, "\t\tip6 hoplimit 255 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } counter accept comment %q\n", CommentNeighbour)
	for _, j := range rs.jumps() {
		fmt.Fprintf(&b, "\t\t%s %s @%s counter jump %s comment %q\n", j.family.nft(), j.field, j.set, j.chain, j.comment())
	}
	b.WriteString("\t}\n")
	for _, c := range []struct {
		name  string
		rules []CompiledRule
		def   string
	}{{ChainEgress, rs.Egress, CommentDefaultEgress}, {ChainIngress, rs.Ingress, CommentDefaultIngress}} {
		fmt.Fprintf(&b, "\tchain %s {\n", c.name)
		for _, r := range c.rules {
			b.WriteString("\t\t" + r.nftText() + "\n")
		}
		fmt.Fprintf(&b, "\t\tcounter drop comment %q\n\t}\n", c.def)
	}
	b.WriteString("}\n")
	n, err := io.WriteString(w, b.String())
	return int64(n), err
}

// jump is a rule of the forward chain that sends a packet to the egress or
// ingress chain.
type jump struct {
	family Family
	field  string // "saddr" or "daddr"
	set    string
	chain  string
}

func (j jump) comment() string {
	if j.chain == ChainEgress {
		return "from workloads with egress policy " + j.family.nft()
	}
	return "to workloads with ingress policy " + j.family.nft()
}

// jumps are the forward chain's rules after the first, in order: egress
// before ingress, so that traffic between two workloads of this host is
// checked on both sides.
func (rs *Ruleset) jumps() []jump {
	var js []jump
	for _, fam := range families {
		if s := rs.EgressWorkloads[fam]; s != "" {
			js = append(js, jump{fam, "saddr", s, ChainEgress})
		}
	}
	for _, fam := range families {
		if s := rs.IngressWorkloads[fam]; s != "" {
			js = append(js, jump{fam, "daddr", s, ChainIngress})
		}
	}
	return js
}

// nftText is the rule in nftables' syntax.
func (r CompiledRule) nftText() string {
	wl, peer := "daddr", "saddr"
	if r.Direction == DirEgress {
		wl, peer = "saddr", "daddr"
	}
	f := r.Family.nft()
	parts := []string{fmt.Sprintf("%s %s @%s", f, wl, r.Workloads)}
	if r.Protocol != 0 {
		parts = append(parts, "meta l4proto "+strings.ToLower(r.Protocol.String()))
	}
	if r.Peers != "" {
		parts = append(parts, fmt.Sprintf("%s %s @%s", f, peer, r.Peers))
	}
	if r.Ports != "" {
		parts = append(parts, "th dport @"+r.Ports)
	}
	parts = append(parts, "counter", r.verdict(), fmt.Sprintf("comment %q", r.Comment()))
	return strings.Join(parts, " ")
}

// verdict: an egress Allow returns to the forward chain, which goes on to
// the ingress check; an ingress Allow accepts; a Deny drops.
func (r CompiledRule) verdict() string {
	switch {
	case r.Action == Deny:
		return "drop"
	case r.Direction == DirEgress:
		return "return"
	}
	return "accept"
}
