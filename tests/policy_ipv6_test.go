package tests

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

// connectsTo and refusedTo are connects and refused to an address of the
// destination's (its IPv6 one, say).
func (p *policyBed) connectsTo(ctx context.Context, from *testbed.Node, dst netip.Addr, port uint16) {
	p.t.Helper()
	if err := from.Connect(ctx, dst, port, allowedWithin); err != nil {
		p.t.Errorf("want connected: %v", err)
	}
}

func (p *policyBed) refusedTo(ctx context.Context, from *testbed.Node, dst netip.Addr, port uint16) {
	p.t.Helper()
	err := from.Connect(ctx, dst, port, refusedAfter)
	if !errors.Is(err, testbed.ErrConnectTimedOut) {
		p.t.Errorf("%s -> %s:%d: want a timeout (dropped by policy), got %v", from.Name, dst, port, err)
	}
}

// pings: every echo request from from to dst is answered; pingLost: none.
func (p *policyBed) pings(ctx context.Context, from *testbed.Node, dst netip.Addr) {
	p.t.Helper()
	if _, err := from.Ping(ctx, dst, 2); err != nil {
		p.t.Errorf("want answered: %v", err)
	}
}

func (p *policyBed) pingLost(ctx context.Context, from *testbed.Node, dst netip.Addr) {
	p.t.Helper()
	r, _ := from.Ping(ctx, dst, 2, "-W", "1")
	if r.Sent != 2 || r.Received != 0 {
		p.t.Errorf("%s -> %s: %d of %d echo requests answered, want none (dropped by policy):\n%s", from.Name, dst, r.Received, r.Sent, r.Output)
	}
}

// flushNeighbours empties the IPv6 neighbour caches of nodes, so that the
// next packet between them starts with neighbour discovery.
func flushNeighbours(t *testing.T, ctx context.Context, nodes ...*testbed.Node) {
	t.Helper()
	for _, n := range nodes {
		if out, err := n.Exec(ctx, "ip", "-6", "neigh", "flush", "all"); err != nil {
			t.Fatalf("%s: ip -6 neigh flush: %v\n%s", n.Name, err, out)
		}
	}
}

// TestNetworkPolicyIPv6: policy over the IPv6 traffic of a dual-stack
// network, on the test plan's bed (c1, c2 and c2b beside it, c3; every
// container with both families): IPv6 selectors and sources, ICMPv6,
// host: and set: covering both families, and IPv6 neighbour discovery
// between containers on one bridge under default deny.
func TestNetworkPolicyIPv6(t *testing.T) {
	ctx := testCtx(t, 3*time.Minute)
	p := newPolicyBedWith(t, ctx, testbed.DualStackNetworkConfig)
	c1, c2, c2b, c3 := p.c1, p.c2, p.c2b, p.c3
	for _, n := range []*testbed.Node{c1, c2, c2b, c3} {
		if !n.Addr6.IsValid() {
			t.Fatalf("%s has no IPv6 address", n.Name)
		}
	}
	h2 := p.b.Host(2)

	web6 := fmt.Sprintf(`{"Name":"c2-web6","Order":100,"Selector":["%s"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["%s"],"Ports":["8080"]}]}`, c2.Addr6, c1.Addr6)
	t.Run("c2's IPv6 address takes TCP 8080 from c1 only", func(t *testing.T) {
		p.t = t
		p.apply(ctx, web6)
		p.waitTable(ctx, 2, "c2-web6's rule", hasRule("c2-web6 ingress rule 1 allow ip6"))
		p.connectsTo(ctx, c1, c2.Addr6, 8080)
		p.refusedTo(ctx, c1, c2.Addr6, 9090)
		p.refusedTo(ctx, c3, c2.Addr6, 8080)
		p.refusedTo(ctx, c2b, c2.Addr6, 8080) // the same bridge: bridged, not routed
		p.connectsTo(ctx, c2, c1.Addr6, 7000) // egress not selected; its replies return
		p.pingLost(ctx, c3, c2.Addr6)
		// The policy selects c2's IPv6 address only: its IPv4 is open.
		p.connectsTo(ctx, c3, c2.Addr, 8080)
		p.pings(ctx, c3, c2.Addr)
		if v := metric(t, ctx, h2, "tulle_policy_rule_packets_total", "policy", "c2-web6", "direction", "ingress", "rule", "1", "action", "Allow"); v < 1 {
			t.Errorf("allow rule counted %v packets", v)
		}
		if v := metric(t, ctx, h2, "tulle_policy_default_deny_packets_total", "direction", "ingress"); v < 5 {
			t.Errorf("default deny ingress counted %v packets, want >= 5 (3 refused SYNs, 2 echo requests)", v)
		}
	})

	t.Run("an ICMPv6 rule lets pings through, and only them", func(t *testing.T) {
		p.t = t
		p.apply(ctx, fmt.Sprintf(`{"Name":"c2-web6","Order":100,"Selector":["%s"],"Ingress":[
			{"Action":"Allow","Protocol":"TCP","Source":["%s"],"Ports":["8080"]},
			{"Action":"Allow","Protocol":"ICMPv6"}]}`, c2.Addr6, c1.Addr6))
		p.waitTable(ctx, 2, "the ICMPv6 rule", hasRule("c2-web6 ingress rule 2 allow ip6"))
		before := metric(t, ctx, h2, "tulle_policy_rule_packets_total", "policy", "c2-web6", "direction", "ingress", "rule", "2", "action", "Allow")
		p.pings(ctx, c3, c2.Addr6)
		p.refusedTo(ctx, c3, c2.Addr6, 8080)
		if v := metric(t, ctx, h2, "tulle_policy_rule_packets_total", "policy", "c2-web6", "direction", "ingress", "rule", "2", "action", "Allow"); v-before < 1 {
			t.Errorf("the ICMPv6 rule counted %v packets, want the echo requests", v-before)
		}
		p.delete(ctx, "c2-web6")
		p.waitTable(ctx, 2, "c2-web6 gone", lacksRulesOf("c2-web6"))
	})

	t.Run("set: and host: cover both families", func(t *testing.T) {
		p.t = t
		// c2 by both its addresses through a netset, sources by host 1's
		// leases (its IPv4 and IPv6 subnets).
		p.apply(ctx, fmt.Sprintf(`{"Kind":"Netset","Name":"c2-both","Nets":["%s/32","%s/128"]}
			{"Name":"both","Order":100,"Selector":["set:c2-both"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["host:%s"],"Ports":["8080"]}]}`,
			c2.Addr, c2.Addr6, p.b.Host(1).Addr))
		p.waitTable(ctx, 2, "both's rules", func(c []string, _ map[string][]string) bool {
			return hasRule("both ingress rule 1 allow ip")(c, nil) && hasRule("both ingress rule 1 allow ip6")(c, nil)
		})
		for _, dst := range []netip.Addr{c2.Addr, c2.Addr6} {
			p.connectsTo(ctx, c1, dst, 8080)
			p.refusedTo(ctx, c3, dst, 8080)
			p.refusedTo(ctx, c1, dst, 9090)
		}
		// The netset without c2's IPv6 address: that is open again, IPv4
		// stays closed.
		if err := p.b.PutKey(ctx, testbed.NetsetKey("c2-both"), fmt.Sprintf(`{"Nets":["%s/32"]}`, c2.Addr)); err != nil {
			t.Fatal(err)
		}
		p.waitTable(ctx, 2, "both without IPv6", func(c []string, _ map[string][]string) bool {
			return c != nil && !hasRule("both ingress rule 1 allow ip6")(c, nil)
		})
		p.connectsTo(ctx, c3, c2.Addr6, 8080)
		p.refusedTo(ctx, c3, c2.Addr, 8080)
		p.delete(ctx, "both")
		p.delete(ctx, "--netset", "c2-both")
		p.waitTable(ctx, 2, "both gone", lacksRulesOf("both"))
	})

	t.Run("neighbour discovery on one bridge passes default deny", func(t *testing.T) {
		p.t = t
		// c2 takes TCP 8080 from c2b and sends nothing of its own; c2b takes
		// nothing. Their neighbour solicitations and advertisements are
		// not connections (conntrack leaves them untracked): they cross
		// c2's egress and c2b's ingress default deny, and must pass, or
		// c2b's allowed connections to c2 die.
		p.apply(ctx, fmt.Sprintf(`{"Name":"lockdown","Order":100,"Selector":["%s"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["%s"],"Ports":["8080"]}],"Egress":[]}
			{"Name":"quiet","Order":100,"Selector":["%s"],"Ingress":[]}`, c2.Addr6, c2b.Addr6, c2b.Addr6))
		p.waitTable(ctx, 2, "lockdown's and quiet's rules", func(c []string, _ map[string][]string) bool {
			return hasRule("lockdown ingress rule 1 allow ip6")(c, nil) && strings.Contains(strings.Join(c, "\n"), "to workloads with ingress policy ip6")
		})
		// Both ends resolve each other afresh under the policy: c2b asks
		// for c2 (c2 answers across its egress deny), then c2 asks for
		// c2b (c2b answers across its ingress deny and c2's).
		flushNeighbours(t, ctx, c2, c2b)
		p.connectsTo(ctx, c2b, c2.Addr6, 8080)
		flushNeighbours(t, ctx, c2)
		p.connectsTo(ctx, c2b, c2.Addr6, 8080)
		// Default deny still holds for everything else.
		p.refusedTo(ctx, c2, c1.Addr6, 7000) // c2's egress
		p.refusedTo(ctx, c3, c2.Addr6, 8080)
		p.refusedTo(ctx, c2b, c2.Addr6, 9090)
		if v := metric(t, ctx, h2, "tulle_policy_default_deny_packets_total", "direction", "egress"); v < 1 {
			t.Errorf("default deny egress counted %v packets", v)
		}
		p.delete(ctx, "lockdown", "quiet")
		p.waitTable(ctx, 2, "lockdown gone", lacksRulesOf("lockdown"))
		p.connectsTo(ctx, c2, c1.Addr6, 7000)
	})
}
