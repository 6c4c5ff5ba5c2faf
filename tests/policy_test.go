package tests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

// policyBed is the test plan's shape: three hosts with a container each
// and c2b beside c2 on host 2's bridge; c2 serves TCP 8080 and 9090, c1
// serves 7000.
type policyBed struct {
	t               *testing.T
	b               *testbed.Bed
	tulled          string
	c1, c2, c2b, c3 *testbed.Node
}

func newPolicyBed(t *testing.T, ctx context.Context) *policyBed {
	t.Helper()
	return newPolicyBedWith(t, ctx, "")
}

// newPolicyBedWith is newPolicyBed in the network config (default if
// ""); in a dual-stack network the containers, c2b too, have IPv6
// addresses and serve on both.
func newPolicyBedWith(t *testing.T, ctx context.Context, config string) *policyBed {
	t.Helper()
	b := cluster(t, testbed.Options{}, config)
	bin, err := testbed.BuildTulled(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p := &policyBed{t: t, b: b, tulled: bin, c1: container(t, b, 1), c2: container(t, b, 2), c3: container(t, b, 3)}
	c2b, err := b.Host(2).AddContainerBeside(ctx, b.Host(2).Container(), "d")
	if err != nil {
		t.Fatal(err)
	}
	p.c2b = &c2b.Node
	for _, s := range []struct {
		n    *testbed.Node
		port uint16
	}{{p.c2, 8080}, {p.c2, 9090}, {p.c1, 7000}} {
		stop, err := s.n.ServeTCP(s.port)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(stop)
	}
	for _, n := range []*testbed.Node{p.c1, p.c2b, p.c3} {
		for _, a := range []netip.Addr{p.c2.Addr, p.c2.Addr6} {
			if !a.IsValid() {
				continue
			}
			if _, err := n.WaitReachable(ctx, a, 10*time.Second); err != nil {
				t.Fatal(err)
			}
		}
	}
	return p
}

// Probe timeouts: an allowed connect answers within milliseconds; a
// dropped one is declared refused after refusedAfter.
const (
	allowedWithin = 5 * time.Second
	refusedAfter  = 500 * time.Millisecond
)

func (p *policyBed) connects(ctx context.Context, from, to *testbed.Node, port uint16) {
	p.t.Helper()
	if err := from.Connect(ctx, to.Addr, port, allowedWithin); err != nil {
		p.t.Errorf("want connected: %v", err)
	}
}

// refused: the policy drops the SYN, so the connect times out (no RST).
func (p *policyBed) refused(ctx context.Context, from, to *testbed.Node, port uint16) {
	p.t.Helper()
	err := from.Connect(ctx, to.Addr, port, refusedAfter)
	if !errors.Is(err, testbed.ErrConnectTimedOut) {
		p.t.Errorf("%s -> %s:%d: want a timeout (dropped by policy), got %v", from.Name, to.Addr, port, err)
	}
}

// cli runs `tulled policy args...` in host 1's namespace with stdin.
func (p *policyBed) cli(ctx context.Context, stdin string, args ...string) (stdout, stderr string, err error) {
	full := []string{p.tulled, "policy", args[0]}
	if args[0] != "check" {
		full = append(full, "--etcd-endpoints", testbed.EtcdEndpoint)
	}
	cmd := p.b.Host(1).Command(ctx, append(full, args[1:]...)...)
	var o, e bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = strings.NewReader(stdin), &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

func (p *policyBed) apply(ctx context.Context, docs string) {
	p.t.Helper()
	if out, errOut, err := p.cli(ctx, docs, "apply", "-f", "-"); err != nil {
		p.t.Fatalf("tulled policy apply: %v\n%s%s", err, out, errOut)
	}
}

// delete runs `tulled policy delete args...` and fails the test if it fails.
func (p *policyBed) delete(ctx context.Context, args ...string) {
	p.t.Helper()
	if out, errOut, err := p.cli(ctx, "", append([]string{"delete"}, args...)...); err != nil {
		p.t.Fatalf("tulled policy delete %s: %v\n%s%s", strings.Join(args, " "), err, out, errOut)
	}
}

// waitTable waits until host i's table satisfies cond.
func (p *policyBed) waitTable(ctx context.Context, i int, what string, cond func(comments []string, sets map[string][]string) bool) {
	p.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		inst, err := p.b.Host(i).PolicyTable()
		if err != nil {
			p.t.Fatal(err)
		}
		var comments []string
		sets := map[string][]string{}
		if inst != nil {
			for _, r := range inst.Rules {
				comments = append(comments, r.Comment)
			}
			sets = inst.Sets
		}
		if cond(comments, sets) {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			p.t.Fatalf("host %d: timed out waiting for %s; rules %q, sets %v", i, what, comments, sets)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func hasRule(comment string) func([]string, map[string][]string) bool {
	return func(c []string, _ map[string][]string) bool { return slices.Contains(c, comment) }
}

func lacksRulesOf(policy string) func([]string, map[string][]string) bool {
	return func(c []string, _ map[string][]string) bool {
		return c != nil && !slices.ContainsFunc(c, func(s string) bool { return strings.HasPrefix(s, policy+" ") })
	}
}

// TestNetworkPolicy is the test plan of network policy, on one bed, step
// by step: real tulled on three hosts, real nftables, real TCP connects.
func TestNetworkPolicy(t *testing.T) {
	ctx := testCtx(t, 4*time.Minute)
	p := newPolicyBed(t, ctx)
	c1, c2, c2b, c3 := p.c1, p.c2, p.c2b, p.c3

	t.Run("no policy: everything reaches everything", func(t *testing.T) {
		p.t = t
		p.connects(ctx, c1, c2, 8080)
		p.connects(ctx, c3, c2, 9090)
		p.connects(ctx, c2b, c2, 8080)
		p.connects(ctx, c2, c1, 7000)
		for i := 1; i <= 3; i++ {
			if inst, err := p.b.Host(i).PolicyTable(); err != nil || inst != nil {
				t.Errorf("host %d has a table without any policy (%v)", i, err)
			}
		}
	})

	allowC1 := fmt.Sprintf(`{"Name":"c2-web","Order":100,"Selector":["%s"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["%s"],"Ports":["8080"]}]}`, c2.Addr, c1.Addr)
	t.Run("c2 takes TCP 8080 from c1 only", func(t *testing.T) {
		p.t = t
		p.apply(ctx, allowC1)
		p.waitTable(ctx, 2, "c2-web's rule", hasRule("c2-web ingress rule 1 allow ip"))
		p.connects(ctx, c1, c2, 8080)
		p.refused(ctx, c1, c2, 9090)
		p.refused(ctx, c3, c2, 8080)
		p.refused(ctx, c2b, c2, 8080) // the same bridge: bridged, not routed
		p.connects(ctx, c2, c1, 7000) // egress not selected; its replies return
		h2 := p.b.Host(2)
		if v := metric(t, ctx, h2, "tulle_policy_rule_packets_total", "policy", "c2-web", "direction", "ingress", "rule", "1", "action", "Allow"); v < 1 {
			t.Errorf("allow rule counted %v packets", v)
		}
		if v := metric(t, ctx, h2, "tulle_policy_default_deny_packets_total", "direction", "ingress"); v < 3 {
			t.Errorf("default deny ingress counted %v packets, want >= 3 refused SYNs", v)
		}
		if v := metric(t, ctx, h2, "tulle_policy_policies"); v != 1 {
			t.Errorf("tulle_policy_policies = %v", v)
		}
	})

	t.Run("a Deny of lower Order overrides a later Allow", func(t *testing.T) {
		p.t = t
		p.apply(ctx, `{"Name":"deny-host1","Order":10,"Selector":["198.18.0.0/16"],"Ingress":[{"Action":"Deny","Source":["host:192.0.2.1"]},{"Action":"Allow"}]}`)
		p.waitTable(ctx, 2, "deny-host1's rule", hasRule("deny-host1 ingress rule 1 deny ip"))
		p.refused(ctx, c1, c2, 8080)  // c2-web's Allow comes later
		p.connects(ctx, c3, c2, 9090) // deny-host1's Allow decides first
		p.delete(ctx, "deny-host1")
		p.waitTable(ctx, 2, "deny-host1 gone", lacksRulesOf("deny-host1"))
		p.connects(ctx, c1, c2, 8080)
		p.refused(ctx, c3, c2, 9090)
	})

	t.Run("set: and host: follow netsets and leases", func(t *testing.T) {
		p.t = t
		p.apply(ctx, fmt.Sprintf(`{"Kind":"Netset","Name":"friends","Nets":["%s"]}
			{"Name":"via-set","Order":50,"Selector":["%s"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["set:friends"]}]}
			{"Name":"via-host","Order":60,"Selector":["%s"],"Ingress":[{"Action":"Allow","Source":["host:192.0.2.99"]}]}`, c3.Addr, c2.Addr, c2.Addr))
		p.waitTable(ctx, 2, "via-set's rule", hasRule("via-set ingress rule 1 allow ip"))
		p.connects(ctx, c3, c2, 9090)
		p.refused(ctx, c2b, c2, 9090)
		if err := p.b.PutKey(ctx, testbed.NetsetKey("friends"), fmt.Sprintf(`{"Nets":["%s/32"]}`, c2b.Addr)); err != nil {
			t.Fatal(err)
		}
		want := c2b.Addr.String() + "-" + c2b.Addr.String()
		p.waitTable(ctx, 2, "friends = c2b", func(_ []string, sets map[string][]string) bool {
			return slices.Equal(sets["netset-friends-ip"], []string{want})
		})
		p.refused(ctx, c3, c2, 9090)
		p.connects(ctx, c2b, c2, 9090)

		// A host that takes a lease is in its host: match at once.
		if _, err := p.b.PutFlannelLease(ctx, netip.MustParsePrefix("198.18.99.0/24"), netip.MustParseAddr("192.0.2.99"), time.Hour); err != nil {
			t.Fatal(err)
		}
		p.waitTable(ctx, 2, "via-host following the new lease", func(_ []string, sets map[string][]string) bool {
			return slices.Equal(sets["peer-via-host-in1-ip"], []string{"198.18.99.0-198.18.99.255"})
		})
		if err := p.b.DeleteKey(ctx, testbed.FlannelLeaseKey(netip.MustParsePrefix("198.18.99.0/24"))); err != nil {
			t.Fatal(err)
		}
		p.waitTable(ctx, 2, "via-host's rule gone with the lease", func(c []string, _ map[string][]string) bool {
			return c != nil && !slices.Contains(c, "via-host ingress rule 1 allow ip")
		})
		out, errOut, err := p.cli(ctx, "", "list")
		if err != nil || !strings.Contains(out, "c2-web") || !strings.Contains(out, "friends") || !strings.Contains(out, "via-host") {
			t.Errorf("tulled policy list: %v\n%s%s", err, out, errOut)
		}
		out, errOut, err = p.cli(ctx, "", "ruleset", "--host", "192.0.2.2")
		if err != nil || !strings.Contains(out, `comment "c2-web ingress rule 1 allow ip"`) || !strings.Contains(out, "table inet tulle {") {
			t.Errorf("tulled policy ruleset: %v\n%s%s", err, out, errOut)
		}
		p.delete(ctx, "via-set", "via-host")
		p.delete(ctx, "--netset", "friends")
		p.waitTable(ctx, 2, "via-set gone", lacksRulesOf("via-set"))
	})

	t.Run("an update is enforced on every host within 1 s", func(t *testing.T) {
		p.t = t
		const updates = 100
		var lat []time.Duration
		doc := func(port int) string {
			return fmt.Sprintf(`{"Selector":["%s","%s","%s"],"Ingress":[{"Action":"Allow"},{"Action":"Allow","Protocol":"TCP","Ports":["%d"]}]}`, c1.Addr, c2b.Addr, c3.Addr, port)
		}
		for i := range updates {
			port := 20000 + i
			want := []string{fmt.Sprintf("%d-%d", port, port)}
			start := time.Now()
			if err := p.b.PutKey(ctx, testbed.PolicyKey("spread"), doc(port)); err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			for h := 1; h <= 3; h++ {
				wg.Go(func() {
					p.waitTable(ctx, h, fmt.Sprintf("port %d", port), func(_ []string, sets map[string][]string) bool {
						return slices.Equal(sets["ports-spread-in2"], want)
					})
				})
			}
			wg.Wait()
			lat = append(lat, time.Since(start))
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
		t.Logf("policy update enforced on all 3 hosts: p50 %v, p99 %v, max %v over %d updates", p50.Round(time.Microsecond), p99.Round(time.Microsecond), lat[len(lat)-1].Round(time.Microsecond), updates)
		if p99 > time.Second {
			t.Errorf("p99 %v: over 1 s", p99)
		}
		if err := p.b.DeleteKey(ctx, testbed.PolicyKey("spread")); err != nil {
			t.Fatal(err)
		}
		p.waitTable(ctx, 1, "spread gone", lacksRulesOf("spread"))
	})

	t.Run("an invalid policy is refused and the previous rules stay", func(t *testing.T) {
		p.t = t
		bad := `{"Name":"colour","Selector":["198.18.2.0/24"],"Ingress":[],"Colour":"red"}
{"Name":"cidr","Selector":["198.18.0.0/33"],"Ingress":[]}
{"Name":"ports","Selector":["198.18.2.0/24"],"Ingress":[{"Action":"Allow","Ports":["80"]}]}`
		for _, verb := range []string{"apply", "check"} {
			_, errOut, err := p.cli(ctx, bad, verb, "-f", "-")
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 1 {
				t.Errorf("policy %s of invalid documents: %v, want exit status 1", verb, err)
			}
			for _, want := range []string{`policy colour): Colour: unknown field`, `policy cidr): Selector[0] "198.18.0.0/33": not a CIDR`, `policy ports): Ingress[0].Ports: ports need a Protocol`} {
				if !strings.Contains(errOut, want) {
					t.Errorf("policy %s: stderr lacks %q:\n%s", verb, want, errOut)
				}
			}
		}
		out, _, err := p.cli(ctx, "", "list", "--json")
		if err != nil || strings.Contains(out, `"colour"`) || strings.Contains(out, `"cidr"`) {
			t.Errorf("refused documents written: %v\n%s", err, out)
		}
		// Written to etcd directly, an invalid value leaves c2-web's
		// previous version in force.
		if err := p.b.PutKey(ctx, testbed.PolicyKey("c2-web"), `{"Selector":["198.18.2.2"],"Ingress":[],"Colour":"red"}`); err != nil {
			t.Fatal(err)
		}
		if _, _, err := waitMetric(t, ctx, p.b.Host(2), 10*time.Second, func(v float64) bool { return v == 1 }, "tulle_policy_invalid_documents"); err != nil {
			t.Fatal(err)
		}
		p.connects(ctx, c1, c2, 8080)
		p.refused(ctx, c3, c2, 8080)
		p.apply(ctx, allowC1)
		if _, _, err := waitMetric(t, ctx, p.b.Host(2), 10*time.Second, func(v float64) bool { return v == 0 }, "tulle_policy_invalid_documents"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("enforcement never lapses while tulled is stopped, killed and restarted", func(t *testing.T) {
		p.t = t
		h2 := p.b.Host(2)
		// c2b -> c2 stays on host 2's bridge: it needs no tulled, so only
		// the rules in the kernel stand between them while tulled is down.
		var through, probes atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := c2b.Connect(ctx, c2.Addr, 8080, 50*time.Millisecond)
				probes.Add(1)
				if err == nil {
					through.Add(1)
				}
			}
		})
		waitProbes := func(n int64) {
			t.Helper()
			target := probes.Load() + n
			for probes.Load() < target {
				if ctx.Err() != nil {
					t.Fatal(ctx.Err())
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		for _, how := range []string{"SIGTERM", "kill -9"} {
			before := metric(t, ctx, h2, "tulle_policy_last_apply_timestamp_seconds")
			tl := h2.Tulled()
			var err error
			if how == "SIGTERM" {
				err = tl.Stop()
			} else {
				err = tl.Kill()
			}
			if err != nil {
				t.Fatal(err)
			}
			<-tl.Exited()
			waitProbes(5) // while tulled is down
			if _, err := h2.StartTulled(ctx); err != nil {
				t.Fatal(err)
			}
			if _, _, err := waitMetric(t, ctx, h2, 10*time.Second, func(v float64) bool { return v > before }, "tulle_policy_last_apply_timestamp_seconds"); err != nil {
				t.Fatal(err)
			}
			waitProbes(3) // after the new tulled replaced the table
		}
		close(stop)
		wg.Wait()
		t.Logf("%d probes c2b -> c2:8080 across a stop and a kill -9 with restarts", probes.Load())
		if n := through.Load(); n > 0 {
			t.Errorf("c2b reached c2:8080 %d times while tulled was down or starting", n)
		}
		p.connects(ctx, c1, c2, 8080)
		p.refused(ctx, c3, c2, 8080)
	})

	t.Run("deleting the policy restores access", func(t *testing.T) {
		p.t = t
		if out, errOut, err := p.cli(ctx, "", "delete", "c2-web"); err != nil || !strings.Contains(out, "policy c2-web deleted") {
			t.Fatalf("delete: %v\n%s%s", err, out, errOut)
		}
		p.waitTable(ctx, 2, "c2-web gone", lacksRulesOf("c2-web"))
		p.connects(ctx, c3, c2, 8080)
		p.connects(ctx, c2b, c2, 9090)
		p.connects(ctx, c1, c2, 9090)
	})
}
