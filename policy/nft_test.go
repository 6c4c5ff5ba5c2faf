package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/nstest"
)

const c2Only8080FromC1 = `{"Selector":["198.18.2.2"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["198.18.1.2"],"Ports":["8080"]}]}`

func mustApply(t *testing.T, e *Enforcer, rs *Ruleset) ApplyStats {
	t.Helper()
	st, err := e.Apply(rs)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestKernelEnforcesPolicy: the test plan's scenario on one host, with real
// TCP connects through the kernel: over the routed path and between two
// containers on the same bridge.
func TestKernelEnforcesPolicy(t *testing.T) {
	l := newLab(t)
	l.listen(t, c2Addr, 8080)
	l.listen(t, c2Addr, 9090)
	l.listen(t, c1Addr, 7000)

	mustApply(t, l.enf, Compile(hostInput())) // no policy: everything reaches everything
	l.wantConnects(t, c1Addr, c2Addr, 8080)
	l.wantConnects(t, c3Addr, c2Addr, 9090)
	l.wantConnects(t, c2bAddr, c2Addr, 8080)

	mustApply(t, l.enf, Compile(hostInput(mustPolicy(t, "c2-web", c2Only8080FromC1))))
	l.wantConnects(t, c1Addr, c2Addr, 8080)
	l.wantRefused(t, c1Addr, c2Addr, 9090)
	l.wantRefused(t, c3Addr, c2Addr, 8080)
	l.wantRefused(t, c2bAddr, c2Addr, 8080) // bridged, not routed
	l.wantConnects(t, c2Addr, c1Addr, 7000) // egress not selected; the replies return
	l.wantConnects(t, c2bAddr, c1Addr, 7000)

	cs, err := l.enf.Counters()
	if err != nil {
		t.Fatal(err)
	}
	allow := RuleID{Policy: "c2-web", Direction: DirIngress, Index: 1, Action: Allow}
	if len(cs.Rules) != 1 || cs.Rules[0].RuleID != allow || cs.Rules[0].Packets == 0 || cs.Rules[0].Bytes == 0 {
		t.Errorf("allow rule counter: %+v", cs.Rules)
	}
	if d := cs.DefaultDeny[DirIngress]; d.Packets < 3 {
		t.Errorf("default deny ingress counted %d packets, want at least the 3 refused SYNs", d.Packets)
	}
	// Counters only grow: a new apply carries them over.
	mustApply(t, l.enf, Compile(hostInput(mustPolicy(t, "c2-web", c2Only8080FromC1))))
	cs2, err := l.enf.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if cs2.Rules[0].Packets < cs.Rules[0].Packets || cs2.DefaultDeny[DirIngress].Packets < cs.DefaultDeny[DirIngress].Packets {
		t.Errorf("counters went back after an apply: %+v -> %+v", cs, cs2)
	}

	// An egress policy on c2b: its Deny decides before c2's ingress does.
	mustApply(t, l.enf, Compile(hostInput(
		mustPolicy(t, "c2-web", `{"Selector":["198.18.2.2"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Ports":["8080"]}]}`),
		mustPolicy(t, "c2b-out", `{"Selector":["198.18.2.3"],"Egress":[{"Action":"Deny","Destination":["198.18.2.2"]},{"Action":"Allow"}]}`))))
	l.wantRefused(t, c2bAddr, c2Addr, 8080)
	l.wantConnects(t, c1Addr, c2Addr, 8080)
	l.wantConnects(t, c2bAddr, c1Addr, 7000)

	// No policy again: access is back.
	mustApply(t, l.enf, Compile(hostInput()))
	l.wantConnects(t, c3Addr, c2Addr, 9090)
	l.wantConnects(t, c2bAddr, c2Addr, 8080)
}

// TestApplyNeverOpensNorHalfApplies: while the ruleset is replaced over and
// over (each time with other sets and rules, always denying c3 and allowing
// c1), a prober from c3 never gets through and one from c1 always does.
func TestApplyNeverOpensNorHalfApplies(t *testing.T) {
	l := newLab(t)
	l.listen(t, c2Addr, 8080)
	rulesets := make([]*Ruleset, 2)
	for i := range rulesets {
		in := hostInput(mustPolicy(t, "c2-web", c2Only8080FromC1),
			mustPolicy(t, "noise", fmt.Sprintf(`{"Order":%d,"Selector":["198.18.2.0/24"],"Ingress":[{"Action":"Deny","Protocol":"UDP","Source":["set:n"]}]}`, i)))
		in.Netsets["n"] = &Netset{Name: "n"}
		for j := range 200 + i*50 {
			in.Netsets["n"].Nets = append(in.Netsets["n"].Nets, netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(j), byte(i)}), 32))
		}
		rulesets[i] = Compile(in)
	}
	mustApply(t, l.enf, rulesets[0])

	var through, refusedAllowed, probes atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, p := range []struct {
		src     netip.Addr
		allowed bool
	}{{c3Addr, false}, {c1Addr, true}} {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				timeout := 100 * time.Millisecond
				if p.allowed {
					timeout = allowedWithin
				}
				err := l.connect(p.src, c2Addr, 8080, timeout)
				probes.Add(1)
				switch {
				case !p.allowed && err == nil:
					through.Add(1)
				case p.allowed && err != nil:
					refusedAllowed.Add(1)
				}
			}
		})
	}
	start := time.Now()
	const applies = 100
	for i := range applies {
		mustApply(t, l.enf, rulesets[i%2])
	}
	took := time.Since(start)
	close(stop)
	wg.Wait()
	t.Logf("%d applies in %v, %d probes", applies, took, probes.Load())
	if n := through.Load(); n > 0 {
		t.Errorf("c3 got through %d times while the ruleset was replaced", n)
	}
	if n := refusedAllowed.Load(); n > 0 {
		t.Errorf("c1 was refused %d times while the ruleset was replaced", n)
	}
	if probes.Load() < 10 {
		t.Errorf("only %d probes ran during the applies", probes.Load())
	}
}

// TestFailedApplyKeepsThePreviousRuleset: a transaction the kernel refuses
// (here: a rule naming a set that does not exist) changes nothing.
func TestFailedApplyKeepsThePreviousRuleset(t *testing.T) {
	l := newLab(t)
	l.listen(t, c2Addr, 8080)
	good := Compile(hostInput(mustPolicy(t, "c2-web", c2Only8080FromC1)))
	mustApply(t, l.enf, good)
	bad := Compile(hostInput(mustPolicy(t, "open", `{"Selector":["198.18.2.2"],"Ingress":[{"Action":"Allow"}]}`)))
	bad.Ingress[0].Peers = "no-such-set"
	if _, err := l.enf.Apply(bad); err == nil {
		t.Fatal("the kernel accepted a rule naming a missing set")
	}
	l.wantRefused(t, c3Addr, c2Addr, 8080)
	l.wantConnects(t, c1Addr, c2Addr, 8080)
	comments := installedComments(t, l)
	if !slices.Contains(comments, "c2-web ingress rule 1 allow ip") || slices.Contains(comments, "open ingress rule 1 allow ip") {
		t.Errorf("installed rules after the failed apply: %v", comments)
	}
}

func installedComments(t *testing.T, l *lab) []string {
	t.Helper()
	inst, err := l.enf.Read()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range inst.Rules {
		out = append(out, r.Comment)
	}
	return out
}

// TestInstalledRulesetReadsBack: what the kernel holds after an apply, read
// back through the library, is the compiled ruleset: every rule in order,
// every set with its elements, IPv6 and the edges of the address and port
// spaces included.
func TestInstalledRulesetReadsBack(t *testing.T) {
	l := newLab(t)
	in := threeHosts(2)
	in.Netsets["far"] = &Netset{Name: "far", Nets: []netip.Prefix{pfx("0.0.0.0/0"), pfx("::/0")}}
	in.Policies = []*Policy{
		mustPolicy(t, "v6", `{"Order":1,"Selector":["2001:db8:2::/64","198.18.2.128/25"],"Ingress":[
			{"Action":"Allow","Protocol":"TCP","Source":["2001:db8:1::/64","2001:db8:3::7","198.18.1.0/24"],"Ports":["1-10","65535","80"]},
			{"Action":"Deny","Protocol":"UDP","Source":["set:far"],"Ports":["65000-65535"]}],
			"Egress":[{"Action":"Allow","Protocol":"ICMPv6"}]}`),
	}
	rs := Compile(in)
	mustApply(t, l.enf, rs)

	var want []string
	want = append(want, CommentEstablished, CommentNeighbour)
	for _, j := range rs.jumps() {
		want = append(want, j.comment())
	}
	for _, r := range rs.Egress {
		want = append(want, r.Comment())
	}
	want = append(want, CommentDefaultEgress)
	for _, r := range rs.Ingress {
		want = append(want, r.Comment())
	}
	want = append(want, CommentDefaultIngress)
	if got := installedComments(t, l); !slices.Equal(got, want) {
		t.Errorf("installed rules\n got %q\nwant %q", got, want)
	}

	inst, err := l.enf.Read()
	if err != nil {
		t.Fatal(err)
	}
	if len(inst.Sets) != len(rs.Sets) {
		t.Errorf("%d sets installed, %d compiled", len(inst.Sets), len(rs.Sets))
	}
	for _, s := range rs.Sets {
		if got, want := inst.Sets[s.Name], s.Ranges(); !slices.Equal(got, want) {
			t.Errorf("set %s holds %v, want %v", s.Name, got, want)
		}
	}
	if s := rs.SetByName("netset-far-ip6"); s == nil || s.Addrs[0].To != netip.MustParseAddr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff") {
		t.Errorf("::/0 set: %+v", s)
	}
}

// TestLargeRulesetApplies: 1,000 rules over 10,000 addresses go in as one
// transaction (the netlink buffers are sized for it) in reasonable time.
func TestLargeRulesetApplies(t *testing.T) {
	nstest.RequireRoot(t)
	l := newLab(t)
	in := largeInput(1000, 10000)
	rs := Compile(in)
	st := mustApply(t, l.enf, rs)
	t.Logf("large ruleset: %d rules, %d sets, %d elements, applied in %v", st.Rules, st.Sets, st.Elements, st.Took)
	if st.Rules < 1000 || st.Elements < 10000 {
		t.Errorf("stats %+v", st)
	}
	st = mustApply(t, l.enf, rs) // replacing a large table too
	t.Logf("replaced in %v", st.Took)
	cs, err := l.enf.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if len(cs.Rules) != 1000 {
		t.Errorf("%d rule counters", len(cs.Rules))
	}
}

// largeInput is host 2 with rules rules (in policies of 100) whose sources
// are netsets holding addrs addresses in all (198.19.0.0/16, not
// adjacent, so none merge).
func largeInput(rules, addrs int) Input {
	in := hostInput()
	const perSet = 100
	sets := addrs / perSet
	for s := range sets {
		n := &Netset{Name: fmt.Sprintf("n%d", s)}
		for i := range perSet {
			k := s*perSet + i
			n.Nets = append(n.Nets, netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(k / 127), byte(2 * (k % 127))}), 32))
		}
		in.Netsets[n.Name] = n
	}
	for p := 0; p*100 < rules; p++ {
		pol := &Policy{Name: fmt.Sprintf("big%d", p), Selector: []Match{{Kind: MatchPrefix, Prefix: pfx("198.18.2.0/24")}}, Ingress: []Rule{}}
		for r := 0; r < 100 && p*100+r < rules; r++ {
			i := p*100 + r
			pol.Ingress = append(pol.Ingress, Rule{Action: Allow, Protocol: ProtoTCP,
				Peers: []Match{{Kind: MatchSet, Name: fmt.Sprintf("n%d", i%sets)}},
				Ports: []PortRange{{uint16(1000 + i), uint16(1000 + i)}}})
		}
		in.Policies = append(in.Policies, pol)
	}
	return in
}
