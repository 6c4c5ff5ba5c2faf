package daemon

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tulle-net/tulle/policy"
	"github.com/tulle-net/tulle/subnet"
	etcdreg "github.com/tulle-net/tulle/subnet/etcd"
	"github.com/tulle-net/tulle/tests/nstest"
)

// runnerBed runs a policyRunner for host 2 (198.18.2.0/24) against the
// kernel of a fresh namespace, fed by the test instead of etcd.
type runnerBed struct {
	t      *testing.T
	enf    *policy.Enforcer
	r      *policyRunner
	pol    chan []etcdreg.KeyEvent
	net    chan []etcdreg.KeyEvent
	cancel context.CancelFunc
	done   chan struct{}
}

var hostLeases = []subnet.Lease{
	{Subnet: netip.MustParsePrefix("198.18.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.0.2.1")}},
	{Subnet: netip.MustParsePrefix("198.18.2.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.0.2.2")}},
}

func newRunnerBed(t *testing.T) *runnerBed {
	ns := nstest.NewAnonNetns(t)
	b := &runnerBed{t: t, enf: policy.NewEnforcer(int(ns)), pol: make(chan []etcdreg.KeyEvent), net: make(chan []etcdreg.KeyEvent), done: make(chan struct{})}
	b.r = newPolicyRunner([]netip.Prefix{netip.MustParsePrefix("198.18.2.0/24")}, b.enf, slog.New(slog.NewTextHandler(io.Discard, nil)))
	b.r.ensureBridge = func() (changed []string, err error) {
		err = nstest.In(ns, func() error { changed, err = policy.EnsureBridgeFiltering(); return err })
		return changed, err
	}
	return b
}

// startWithWeb starts the runner with webPolicy, no netsets and
// hostLeases, and waits for web's rule.
func (b *runnerBed) startWithWeb() {
	b.start()
	b.pol <- []etcdreg.KeyEvent{{Key: "web", Value: []byte(webPolicy)}}
	b.net <- []etcdreg.KeyEvent{}
	b.r.setLeases(hostLeases)
	b.waitFor("web's rule", b.has("web ingress rule 1 allow ip"))
}

func (b *runnerBed) start() {
	ctx, cancel := context.WithCancel(context.Background())
	b.cancel = cancel
	watch := func(ctx context.Context, suffix string, out chan<- []etcdreg.KeyEvent) error {
		in := b.pol
		if suffix == netsetsSuffix {
			in = b.net
		}
		for {
			select {
			case <-ctx.Done():
				return nil
			case batch := <-in:
				select {
				case out <- batch:
				case <-ctx.Done():
					return nil
				}
			}
		}
	}
	go func() {
		defer close(b.done)
		b.r.run(ctx, watch)
	}()
	b.t.Cleanup(b.stop)
}

func (b *runnerBed) stop() {
	if b.cancel != nil {
		b.cancel()
		<-b.done
		b.cancel = nil
	}
}

// comments are the installed rules' comments, nil without a table.
func (b *runnerBed) comments() []string {
	b.t.Helper()
	inst, err := b.enf.Read()
	if err != nil {
		b.t.Fatal(err)
	}
	if inst == nil {
		return nil
	}
	var out []string
	for _, r := range inst.Rules {
		out = append(out, r.Comment)
	}
	return out
}

func (b *runnerBed) waitFor(what string, cond func() bool) {
	b.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			b.t.Fatalf("timed out waiting for %s; installed: %q", what, b.comments())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitTurns waits until the runner's loop has turned n times in all.
func (b *runnerBed) waitTurns(n uint64) {
	b.t.Helper()
	b.waitFor("the runner's turn", func() bool { return b.r.turns.Load() >= n })
}

func (b *runnerBed) has(comment string) func() bool {
	return func() bool { return slices.Contains(b.comments(), comment) }
}

// settle waits until the runner has taken in everything sent and applied
// it: one more netset change is the marker.
func (b *runnerBed) settle(marker string) {
	b.t.Helper()
	b.pol <- []etcdreg.KeyEvent{{Key: "marker", Value: []byte(`{"Selector":["198.18.2.99"],"Ingress":[{"Action":"Allow","Source":["set:` + marker + `"]}]}`)}}
	b.net <- []etcdreg.KeyEvent{{Key: marker, Value: []byte(`{"Nets":["198.18.9.9"]}`)}}
	b.waitFor("marker "+marker, b.has("marker ingress rule 1 allow ip"))
	b.pol <- []etcdreg.KeyEvent{{Key: "marker", Deleted: true}}
	b.waitFor("marker gone", func() bool { return !slices.Contains(b.comments(), "marker ingress rule 1 allow ip") })
}

const webPolicy = `{"Selector":["198.18.2.2"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["host:192.0.2.1"],"Ports":["8080"]}]}`

// TestPolicyRunnerReplacesRulesOnlyOnceEverythingIsRead: the table of the
// previous run stays until policies, netsets and leases are all in.
func TestPolicyRunnerReplacesRulesOnlyOnceEverythingIsRead(t *testing.T) {
	b := newRunnerBed(t)
	old := policy.Compile(policy.Input{Policies: []*policy.Policy{mustParse(t, "old", `{"Selector":["198.18.2.0/24"],"Ingress":[]}`)},
		Local: []netip.Prefix{netip.MustParsePrefix("198.18.2.0/24")}})
	if _, err := b.enf.Apply(old); err != nil {
		t.Fatal(err)
	}
	before := b.comments()
	b.start()
	b.pol <- []etcdreg.KeyEvent{{Key: "web", Value: []byte(webPolicy)}}
	b.waitTurns(1)
	b.r.setLeases(hostLeases)
	b.waitTurns(2)
	// netsets not read yet: the old rules must stay
	if got := b.comments(); !slices.Equal(got, before) {
		t.Fatalf("rules changed before the netsets were read: %q", got)
	}
	b.net <- []etcdreg.KeyEvent{}
	b.waitFor("web's rule", b.has("web ingress rule 1 allow ip"))
	if slices.Contains(b.comments(), "old ingress rule 1 allow ip") {
		t.Error("old rules left")
	}
}

// TestInvalidPolicyLeavesThePreviousRulesInForce: a bad value of a known
// policy keeps its previous version; a bad document never seen valid
// keeps the whole ruleset; fixing it applies again. Refusals are counted.
func TestInvalidPolicyLeavesThePreviousRulesInForce(t *testing.T) {
	b := newRunnerBed(t)
	b.startWithWeb()

	// web gets an unknown field: its previous version stays, other changes go on
	b.pol <- []etcdreg.KeyEvent{{Key: "web", Value: []byte(`{"Selector":["198.18.2.2"],"Ingress":[],"Colour":"red"}`)}}
	b.settle("m1")
	if !slices.Contains(b.comments(), "web ingress rule 1 allow ip") {
		t.Fatalf("web's previous version left: %q", b.comments())
	}
	// a new document that is invalid (ports without a protocol): nothing changes
	b.pol <- []etcdreg.KeyEvent{{Key: "db", Value: []byte(`{"Selector":["198.18.2.3"],"Ingress":[{"Action":"Allow","Ports":["5432"]}]}`)}}
	b.pol <- []etcdreg.KeyEvent{{Key: "other", Value: []byte(`{"Selector":["198.18.2.4"],"Ingress":[{"Action":"Allow"}]}`)}}
	// stats are published at the end of a turn: other is in, and reconciled
	b.waitFor("db refused and other read", func() bool { s := b.r.stats.Load(); return s.invalid == 2 && s.policies == 2 })
	if slices.Contains(b.comments(), "other ingress rule 1 allow ip") {
		t.Fatal("ruleset changed while a document without a valid version is refused")
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(b.r)
	if got := gathered(t, reg, "tulle_policy_invalid_documents"); got != 2 {
		t.Errorf("tulle_policy_invalid_documents = %v, want 2", got)
	}
	// fixing db applies everything waiting
	b.pol <- []etcdreg.KeyEvent{{Key: "db", Value: []byte(`{"Selector":["198.18.2.3"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Ports":["5432"]}]}`)}}
	b.waitFor("db's rule", b.has("db ingress rule 1 allow ip"))
	if !slices.Contains(b.comments(), "other ingress rule 1 allow ip") {
		t.Errorf("other's rule not applied with db's fix: %q", b.comments())
	}
	if got := gathered(t, reg, "tulle_policy_invalid_documents"); got != 1 {
		t.Errorf("tulle_policy_invalid_documents = %v, want 1 (web)", got)
	}
	if got := gathered(t, reg, "tulle_policy_refused_documents_total"); got != 2 {
		t.Errorf("tulle_policy_refused_documents_total = %v, want 2", got)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
}

// TestPolicyRunnerFollowsLeasesAndNetsets: host: and set: matches follow
// lease and netset changes.
func TestPolicyRunnerFollowsLeasesAndNetsets(t *testing.T) {
	b := newRunnerBed(t)
	b.start()
	b.pol <- []etcdreg.KeyEvent{{Key: "web", Value: []byte(`{"Selector":["set:mine"],"Ingress":[{"Action":"Allow","Source":["host:192.0.2.1"]}]}`)}}
	b.net <- []etcdreg.KeyEvent{{Key: "mine", Value: []byte(`{"Nets":["198.18.2.2"]}`)}}
	b.r.setLeases(hostLeases)
	set := func(name string) func() []string {
		return func() []string {
			inst, err := b.enf.Read()
			if err != nil || inst == nil {
				return nil
			}
			return inst.Sets[name]
		}
	}
	waitSet := func(name string, want ...string) {
		t.Helper()
		b.waitFor(name+" = "+strings.Join(want, ","), func() bool { return slices.Equal(set(name)(), want) })
	}
	waitSet("peer-web-in1-ip", "198.18.1.0-198.18.1.255")
	waitSet("sel-web-ip", "198.18.2.2-198.18.2.2")
	moved := slices.Clone(hostLeases)
	moved[0].Subnet = netip.MustParsePrefix("198.18.7.0/24")
	b.r.setLeases(moved)
	waitSet("peer-web-in1-ip", "198.18.7.0-198.18.7.255")
	b.net <- []etcdreg.KeyEvent{{Key: "mine", Value: []byte(`{"Nets":["198.18.2.5","198.18.3.0/24"]}`)}}
	waitSet("sel-web-ip", "198.18.2.5-198.18.2.5")
}

// TestLeaseChurnRecompilesOnlyForHostsPoliciesName: in a large cluster
// leases come and go all the time; a change of a host no host: match names
// costs the runner an index update, never a compile of the ruleset.
func TestLeaseChurnRecompilesOnlyForHostsPoliciesName(t *testing.T) {
	b := newRunnerBed(t)
	b.startWithWeb()
	compiles := b.r.compiles.Load()

	var churn []subnet.Event
	for i := range 2000 {
		l := subnet.Lease{Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)}), 32),
			Attrs: subnet.LeaseAttrs{PublicIP: netip.AddrFrom4([4]byte{198, 18, 200 + byte(i>>8), byte(i)})}}
		churn = append(churn, subnet.Event{Type: subnet.EventAdded, Lease: l}, subnet.Event{Type: subnet.EventRemoved, Lease: l})
	}
	turns := b.r.turns.Load()
	for i := 0; i < len(churn); i += 100 {
		b.r.leaseEvents(churn[i:i+100], false)
		b.waitTurns(turns + 1)
		turns = b.r.turns.Load()
	}
	if got := b.r.compiles.Load(); got != compiles {
		t.Errorf("%d compiles for lease changes of hosts no policy names, want 0", got-compiles)
	}

	// The host web's rule names moves to another subnet: one compile, new rule.
	moved := hostLeases[0]
	moved.Subnet = netip.MustParsePrefix("198.18.7.0/24")
	b.r.leaseEvents([]subnet.Event{{Type: subnet.EventRemoved, Lease: hostLeases[0]}, {Type: subnet.EventAdded, Lease: moved}}, false)
	b.waitFor("a compile for the named host", func() bool { return b.r.compiles.Load() == compiles+1 })
	b.waitFor("web's source set follows", func() bool {
		inst, err := b.enf.Read()
		return err == nil && inst != nil && slices.Equal(inst.Sets["peer-web-in1-ip"], []string{"198.18.7.0-198.18.7.255"})
	})
}

func mustParse(t *testing.T, name, doc string) *policy.Policy {
	t.Helper()
	p, err := policy.ParsePolicy(name, []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// gathered returns the value of the unlabelled metric name of reg.
func gathered(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.Metric) == 1 {
			m := mf.Metric[0]
			return m.GetGauge().GetValue() + m.GetCounter().GetValue()
		}
	}
	t.Fatalf("metric %s not gathered", name)
	return 0
}

// TestNoPolicyInstallsNothing: a host without policies, and without a
// table from before, gets no table; a policy then installs one, and its
// deletion leaves an empty table that lets everything through.
func TestNoPolicyInstallsNothing(t *testing.T) {
	b := newRunnerBed(t)
	b.start()
	b.pol <- []etcdreg.KeyEvent{}
	b.waitTurns(1)
	b.net <- []etcdreg.KeyEvent{}
	b.waitTurns(2)
	b.r.setLeases(hostLeases)
	b.waitTurns(3)
	if got := b.comments(); got != nil {
		t.Fatalf("a table without any policy: %q", got)
	}
	b.pol <- []etcdreg.KeyEvent{{Key: "web", Value: []byte(webPolicy)}}
	b.waitFor("web's rule", b.has("web ingress rule 1 allow ip"))
	b.pol <- []etcdreg.KeyEvent{{Key: "web", Deleted: true}}
	b.waitFor("no rules of web", func() bool {
		c := b.comments()
		return c != nil && !slices.ContainsFunc(c, func(s string) bool { return strings.HasPrefix(s, "web ") })
	})
}
