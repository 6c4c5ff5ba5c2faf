package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/tulle-net/tulle/subnet"
)

// interpret runs a compiled ruleset the way the kernel runs the table (see
// Ruleset's doc and WriteTo) for the first packet of f.
func (rs *Ruleset) interpret(f Flow) (bool, *RuleID, *RuleID) {
	fam := IPv4
	if f.Src.Is6() {
		fam = IPv6
	}
	in := func(name string, a netip.Addr) bool {
		s := rs.SetByName(name)
		for _, r := range s.Addrs {
			if r.contains(a) {
				return true
			}
		}
		return false
	}
	run := func(rules []CompiledRule, dir Direction, workload, peer netip.Addr) *RuleID {
		for _, r := range rules {
			if r.Family != fam || !in(r.Workloads, workload) {
				continue
			}
			if r.Protocol != 0 && r.Protocol != f.Protocol {
				continue
			}
			if r.Peers != "" && !in(r.Peers, peer) {
				continue
			}
			if r.Ports != "" {
				ok := false
				for _, p := range rs.SetByName(r.Ports).Ports {
					ok = ok || (p.First <= f.Port && f.Port <= p.Last)
				}
				if !ok {
					continue
				}
			}
			id := r.RuleID
			return &id
		}
		return &RuleID{Direction: dir, Action: Deny}
	}
	var eg, ig *RuleID
	if s := rs.EgressWorkloads[fam]; s != "" && in(s, f.Src) {
		eg = run(rs.Egress, DirEgress, f.Src, f.Dst)
		if eg.Action == Deny {
			return false, eg, nil
		}
	}
	if s := rs.IngressWorkloads[fam]; s != "" && in(s, f.Dst) {
		ig = run(rs.Ingress, DirIngress, f.Dst, f.Src)
		if ig.Action == Deny {
			return false, eg, ig
		}
	}
	return true, eg, ig
}

func same(a, b *RuleID) bool {
	return (a == nil && b == nil) || (a != nil && b != nil && *a == *b)
}

func mustPolicy(t testing.TB, name, doc string) *Policy {
	t.Helper()
	p, err := ParsePolicy(name, []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var (
	pfx  = netip.MustParsePrefix
	addr = netip.MustParseAddr
)

// threeHosts is the testbed's shape: host i leases 198.18.i.0/24 and
// 2001:db8:i::/64; c<i> is 198.18.i.2, c2b 198.18.2.3.
func threeHosts(local int) Input {
	var leases []subnet.Lease
	for i := 1; i <= 3; i++ {
		leases = append(leases, subnet.Lease{
			Subnet:     pfx(fmt.Sprintf("198.18.%d.0/24", i)),
			IPv6Subnet: pfx(fmt.Sprintf("2001:db8:%d::/64", i)),
			Attrs:      subnet.LeaseAttrs{PublicIP: addr(fmt.Sprintf("192.0.2.%d", i))},
		})
	}
	l := leases[local-1]
	return Input{Leases: leases, Local: []netip.Prefix{l.Subnet, l.IPv6Subnet}, Netsets: map[string]*Netset{}}
}

// TestIssueScenarioCompiles: the policy of the test plan (c2 takes TCP
// 8080 from c1 only), checked on host 2 flow by flow.
func TestIssueScenarioCompiles(t *testing.T) {
	in := threeHosts(2)
	in.Policies = []*Policy{mustPolicy(t, "c2-web", `{"Selector":["198.18.2.2"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["198.18.1.2"],"Ports":["8080"]}]}`)}
	rs := Compile(in)
	wantFlows(t, in, rs, []flowWant{
		{Flow{addr("198.18.1.2"), addr("198.18.2.2"), ProtoTCP, 8080}, true},
		{Flow{addr("198.18.1.2"), addr("198.18.2.2"), ProtoTCP, 9090}, false},
		{Flow{addr("198.18.3.2"), addr("198.18.2.2"), ProtoTCP, 8080}, false},
		{Flow{addr("198.18.2.3"), addr("198.18.2.2"), ProtoTCP, 8080}, false}, // c2b, same bridge
		{Flow{addr("198.18.2.2"), addr("198.18.1.2"), ProtoTCP, 22}, true},    // egress not selected
		{Flow{addr("198.18.2.3"), addr("198.18.1.2"), ProtoTCP, 22}, true},
		{Flow{addr("198.18.1.2"), addr("198.18.2.2"), ProtoUDP, 8080}, false},
	})
	if len(rs.Ingress) != 1 || len(rs.Egress) != 0 || rs.IngressWorkloads[IPv4] == "" || rs.EgressWorkloads[IPv4] != "" || rs.IngressWorkloads[IPv6] != "" {
		t.Errorf("compiled %+v", rs)
	}
	// Host 1 and 3 enforce nothing: c2 is not theirs.
	for _, h := range []int{1, 3} {
		in := threeHosts(h)
		in.Policies = rs2policies(t)
		if rs := Compile(in); len(rs.Ingress)+len(rs.Egress) != 0 || len(rs.IngressWorkloads) != 0 {
			t.Errorf("host %d compiles %+v", h, rs)
		}
	}
}

func rs2policies(t *testing.T) []*Policy {
	return []*Policy{mustPolicy(t, "c2-web", `{"Selector":["198.18.2.2"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["198.18.1.2"],"Ports":["8080"]}]}`)}
}

func TestLowerOrderDenyOverridesLaterAllow(t *testing.T) {
	in := threeHosts(2)
	in.Policies = []*Policy{
		mustPolicy(t, "a-allow", `{"Order":200,"Selector":["198.18.2.0/24"],"Ingress":[{"Action":"Allow"}]}`),
		mustPolicy(t, "z-deny", `{"Order":100,"Selector":["198.18.2.2"],"Ingress":[{"Action":"Deny","Source":["198.18.1.0/24"]}]}`),
	}
	rs := Compile(in)
	if strings.Join(rs.Policies, ",") != "z-deny,a-allow" {
		t.Errorf("order %v", rs.Policies)
	}
	ok, _, by := rs.interpret(Flow{addr("198.18.1.2"), addr("198.18.2.2"), ProtoTCP, 80})
	if ok || by.Policy != "z-deny" {
		t.Errorf("deny of Order 100 must decide: %v %+v", ok, by)
	}
	ok, _, by = rs.interpret(Flow{addr("198.18.3.2"), addr("198.18.2.2"), ProtoTCP, 80})
	if !ok || by.Policy != "a-allow" {
		t.Errorf("allow must decide the rest: %v %+v", ok, by)
	}
	// Absent Order sorts last, ties by name.
	in.Policies = []*Policy{
		mustPolicy(t, "b", `{"Selector":["198.18.2.2"],"Ingress":[]}`),
		mustPolicy(t, "a", `{"Selector":["198.18.2.2"],"Ingress":[]}`),
		mustPolicy(t, "c", `{"Order":1e9,"Selector":["198.18.2.2"],"Ingress":[]}`),
	}
	if got := strings.Join(Compile(in).Policies, ","); got != "c,a,b" {
		t.Errorf("order %s", got)
	}
}

// TestIPv6Compiles: IPv6 selectors, peers and netsets compile to ip6 sets
// and rules of their own; an IPv4-only rule makes no IPv6 rule.
func TestIPv6Compiles(t *testing.T) {
	in := threeHosts(2)
	in.Netsets["web6"] = &Netset{Name: "web6", Nets: []netip.Prefix{pfx("2001:db8:1::/64"), pfx("2001:db8:3::5/128")}}
	in.Policies = []*Policy{mustPolicy(t, "db", `{"Selector":["198.18.2.2","2001:db8:2::2"],"Ingress":[
		{"Action":"Allow","Protocol":"TCP","Source":["set:web6"],"Ports":["5432"]},
		{"Action":"Allow","Protocol":"ICMPv6"},
		{"Action":"Allow","Source":["198.18.1.0/24"]}]}`)}
	rs := Compile(in)
	var fams []string
	for _, r := range rs.Ingress {
		fams = append(fams, fmt.Sprintf("%d%s", r.Index, r.Family.nft()))
	}
	if got := strings.Join(fams, ","); got != "2ip,3ip,1ip6,2ip6" {
		// IPv4 rules first (rule 1 has no IPv4 peer), then IPv6 ones
		t.Errorf("rules %s", got)
	}
	s := rs.SetByName(rs.IngressWorkloads[IPv6])
	if s == nil || s.Kind != SetIPv6 || len(s.Addrs) != 1 || s.Addrs[0] != (AddrRange{addr("2001:db8:2::2"), addr("2001:db8:2::2")}) {
		t.Errorf("ipv6 workloads %+v", s)
	}
	var b strings.Builder
	rs.WriteTo(&b)
	for _, want := range []string{
		"set netset-web6-ip6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { 2001:db8:1::/64, 2001:db8:3::5 }",
		`ip6 daddr @sel-db-ip6 meta l4proto tcp ip6 saddr @netset-web6-ip6 th dport @ports-db-in1 counter accept comment "db ingress rule 1 allow ip6"`,
		`ip6 daddr @sel-db-ip6 meta l4proto icmpv6 counter accept`,
		`ip6 daddr @sel-db-ip6 counter jump ingress-policy`,
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("ruleset lacks %q:\n%s", want, b.String())
		}
	}
	wantFlows(t, in, rs, []flowWant{
		{Flow{addr("2001:db8:1::9"), addr("2001:db8:2::2"), ProtoTCP, 5432}, true},
		{Flow{addr("2001:db8:3::5"), addr("2001:db8:2::2"), ProtoTCP, 5432}, true},
		{Flow{addr("2001:db8:3::6"), addr("2001:db8:2::2"), ProtoTCP, 5432}, false},
		{Flow{addr("2001:db8:3::6"), addr("2001:db8:2::2"), ProtoICMPv6, 0}, true},
		{Flow{addr("2001:db8:1::9"), addr("2001:db8:2::3"), ProtoTCP, 1}, true}, // not selected
		{Flow{addr("198.18.1.9"), addr("198.18.2.2"), ProtoUDP, 53}, true},
		{Flow{addr("198.18.3.9"), addr("198.18.2.2"), ProtoUDP, 53}, false},
	})
}

func TestSelectorsFollowNetsetsAndLeases(t *testing.T) {
	in := threeHosts(2)
	in.Policies = []*Policy{mustPolicy(t, "p", `{"Selector":["set:mine"],"Ingress":[{"Action":"Allow","Source":["host:192.0.2.1"]}]}`)}
	rs := Compile(in)
	if len(rs.Ingress) != 0 || len(rs.Warnings) != 1 || !strings.Contains(rs.Warnings[0], "netset mine does not exist") {
		t.Fatalf("missing netset selects nothing: %+v %v", rs.Ingress, rs.Warnings)
	}
	in.Netsets["mine"] = &Netset{Name: "mine", Nets: []netip.Prefix{pfx("198.18.2.0/25"), pfx("198.18.9.0/24")}}
	rs = Compile(in)
	if got, _, _ := rs.interpret(Flow{addr("198.18.1.7"), addr("198.18.2.2"), ProtoTCP, 1}); !got {
		t.Error("host:192.0.2.1 must match its lease 198.18.1.0/24")
	}
	if got, _, _ := rs.interpret(Flow{addr("198.18.3.7"), addr("198.18.2.2"), ProtoTCP, 1}); got {
		t.Error("198.18.3.7 is not host 1's")
	}
	if wl := rs.SetByName(rs.IngressWorkloads[IPv4]); len(wl.Addrs) != 1 || wl.Addrs[0] != (AddrRange{addr("198.18.2.0"), addr("198.18.2.127")}) {
		t.Errorf("workloads must be the selector within this host's lease: %+v", wl.Addrs)
	}
	// host 1 moves to another subnet: the rule follows the lease
	in.Leases[0].Subnet = pfx("198.18.7.0/24")
	rs = Compile(in)
	if got, _, _ := rs.interpret(Flow{addr("198.18.1.7"), addr("198.18.2.2"), ProtoTCP, 1}); got {
		t.Error("after the lease change 198.18.1.7 is no longer host 1's")
	}
	if got, _, _ := rs.interpret(Flow{addr("198.18.7.7"), addr("198.18.2.2"), ProtoTCP, 1}); !got {
		t.Error("after the lease change 198.18.7.7 is host 1's")
	}
	// a host without a lease matches nothing, with a warning
	in.Leases = in.Leases[1:]
	rs = Compile(in)
	if len(rs.Ingress) != 0 || !strings.Contains(strings.Join(rs.Warnings, ";"), "host 192.0.2.1 holds no lease") {
		t.Errorf("%+v %v", rs.Ingress, rs.Warnings)
	}
}

func TestSetsAreSharedAndNamed(t *testing.T) {
	in := threeHosts(2)
	in.Netsets["web"] = &Netset{Name: "web", Nets: []netip.Prefix{pfx("198.18.1.0/24")}}
	in.Policies = []*Policy{
		mustPolicy(t, "a", `{"Selector":["198.18.2.0/24"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["set:web"],"Ports":["80","443"]}]}`),
		mustPolicy(t, "b", `{"Selector":["198.18.2.0/24"],"Egress":[{"Action":"Allow","Protocol":"TCP","Destination":["198.18.1.0/24"],"Ports":["443","80"]}]}`),
	}
	rs := Compile(in)
	var names []string
	for _, s := range rs.Sets {
		names = append(names, s.Name)
	}
	// one set per distinct content: the selector, the peers and the ports
	// are shared by both policies, and the workload sets equal the selector
	if got := strings.Join(names, ","); got != "sel-a-ip,netset-web-ip,ports-a-in1" {
		t.Errorf("sets %s", got)
	}
}

func TestNormalizeMergesOverlapsAndNeighbours(t *testing.T) {
	got := normalize([]netip.Prefix{pfx("198.18.1.0/24"), pfx("198.18.0.0/24"), pfx("198.18.1.128/25"), pfx("198.18.3.0/24"), pfx("2001:db8::/32"), pfx("255.255.255.255/32"), pfx("255.255.255.254/32")}, 32)
	want := []AddrRange{{addr("198.18.0.0"), addr("198.18.1.255")}, {addr("198.18.3.0"), addr("198.18.3.255")}, {addr("255.255.255.254"), addr("255.255.255.255")}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %v want %v", got, want)
	}
	all := normalize([]netip.Prefix{pfx("0.0.0.0/0"), pfx("198.18.0.0/16")}, 32)
	if len(all) != 1 || all[0] != (AddrRange{addr("0.0.0.0"), addr("255.255.255.255")}) {
		t.Errorf("0/0: %v", all)
	}
	if ps := rangePrefixes(AddrRange{addr("198.18.0.1"), addr("198.18.0.6")}); fmt.Sprint(ps) != "[198.18.0.1/32 198.18.0.2/31 198.18.0.4/31 198.18.0.6/32]" {
		t.Errorf("split %v", ps)
	}
	if ps := rangePrefixes(AddrRange{addr("::"), addr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")}); fmt.Sprint(ps) != "[::/0]" {
		t.Errorf("split %v", ps)
	}
}

// TestCompiledRulesetAgreesWithTheModel: over random policies, netsets,
// leases and flows, the compiled ruleset (run as the kernel runs it) decides
// every flow as the model does, by the same rule.
func TestCompiledRulesetAgreesWithTheModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	addrs := []string{"198.18.1.2", "198.18.1.130", "198.18.2.2", "198.18.2.3", "198.18.2.200", "198.18.3.2", "192.0.2.9", "2001:db8:1::2", "2001:db8:2::2", "2001:db8:2::ff", "2001:db8:3::2"}
	matchPool := []string{"198.18.0.0/16", "198.18.2.0/24", "198.18.2.0/25", "198.18.2.2", "198.18.1.0/24", "198.18.3.2", "0.0.0.0/0", "::/0",
		"2001:db8::/32", "2001:db8:2::/64", "2001:db8:2::2", "2001:db8:1::/48", "set:a", "set:b", "set:none", "host:192.0.2.1", "host:192.0.2.2", "host:192.0.2.3", "host:192.0.2.99"}
	protos := []string{"", `"TCP"`, `"UDP"`, `"ICMP"`, `"ICMPv6"`, `"SCTP"`, `47`}
	pick := func(n int) string {
		var l []string
		for range n {
			l = append(l, `"`+matchPool[rng.IntN(len(matchPool))]+`"`)
		}
		return "[" + strings.Join(l, ",") + "]"
	}
	rule := func(peerField string) string {
		f := []string{`"Action":` + []string{`"Allow"`, `"Deny"`}[rng.IntN(2)]}
		proto := protos[rng.IntN(len(protos))]
		if proto != "" {
			f = append(f, `"Protocol":`+proto)
		}
		if rng.IntN(3) > 0 {
			f = append(f, fmt.Sprintf(`"%s":%s`, peerField, pick(rng.IntN(3))))
		}
		if (proto == `"TCP"` || proto == `"UDP"` || proto == `"SCTP"`) && rng.IntN(2) == 0 {
			f = append(f, `"Ports":["80","8000-8100","443"]`)
		}
		return "{" + strings.Join(f, ",") + "}"
	}
	rules := func(peerField string) string {
		var l []string
		for range rng.IntN(4) {
			l = append(l, rule(peerField))
		}
		return "[" + strings.Join(l, ",") + "]"
	}
	flows := 0
	for iter := range 300 {
		in := threeHosts(1 + rng.IntN(3))
		in.Netsets["a"] = &Netset{Name: "a", Nets: []netip.Prefix{pfx("198.18.2.2/32"), pfx("198.18.1.128/25"), pfx("2001:db8:2::/120")}}
		in.Netsets["b"] = &Netset{Name: "b", Nets: []netip.Prefix{pfx("198.18.0.0/15")}}
		for i := range 1 + rng.IntN(4) {
			f := []string{`"Selector":` + pick(1+rng.IntN(2))}
			if rng.IntN(3) > 0 {
				f = append(f, fmt.Sprintf(`"Order":%d`, rng.IntN(3)*10))
			}
			dirs := rng.IntN(3)
			if dirs != 1 {
				f = append(f, `"Ingress":`+rules("Source"))
			}
			if dirs != 0 {
				f = append(f, `"Egress":`+rules("Destination"))
			}
			in.Policies = append(in.Policies, mustPolicy(t, fmt.Sprintf("p%d", i), "{"+strings.Join(f, ",")+"}"))
		}
		rs := Compile(in)
		for range 40 {
			src, dst := addr(addrs[rng.IntN(len(addrs))]), addr(addrs[rng.IntN(len(addrs))])
			if src.Is4() != dst.Is4() || src == dst {
				continue
			}
			f := Flow{src, dst, []Protocol{ProtoTCP, ProtoUDP, ProtoICMP, ProtoICMPv6, 47}[rng.IntN(5)], []uint16{80, 443, 8050, 9999}[rng.IntN(4)]}
			want := Decide(in, f)
			ok, eg, ig := rs.interpret(f)
			if ok != want.Allowed || !same(eg, want.Egress) || !same(ig, want.Ingress) {
				var b strings.Builder
				rs.WriteTo(&b)
				t.Fatalf("iteration %d, flow %+v on local %v:\ncompiled %v %+v %+v\nmodel    %+v %+v %+v\n%s", iter, f, in.Local, ok, eg, ig, want.Allowed, want.Egress, want.Ingress, b.String())
			}
			flows++
		}
	}
	if flows < 5000 {
		t.Errorf("only %d flows checked", flows)
	}
}

// flowWant is a flow and whether the policy allows it.
type flowWant struct {
	f    Flow
	want bool
}

// wantFlows checks that the compiled ruleset rs and Decide on in both
// allow or drop each flow as wanted.
func wantFlows(t *testing.T, in Input, rs *Ruleset, flows []flowWant) {
	t.Helper()
	for _, tc := range flows {
		got, _, _ := rs.interpret(tc.f)
		if got != tc.want || Decide(in, tc.f).Allowed != tc.want {
			t.Errorf("%+v: compiled %v, decided %v, want %v", tc.f, got, Decide(in, tc.f).Allowed, tc.want)
		}
	}
}
