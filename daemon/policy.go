package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tulle-net/tulle/policy"
	"github.com/tulle-net/tulle/subnet"
	etcdreg "github.com/tulle-net/tulle/subnet/etcd"
)

// Where policies and netsets live below the etcd prefix.
const (
	policiesSuffix = "policies/"
	netsetsSuffix  = "netsets/"
)

// policyRetry: a ruleset the kernel refused is tried again this often.
const policyRetry = 5 * time.Second

// docWatch sends the keys below <prefix>/<suffix>: a snapshot of all of
// them first, then every change, until ctx is done: the registry's
// WatchPrefix, the same resumable, compaction-safe watch as the leases'.
type docWatch func(ctx context.Context, suffix string, out chan<- []etcdreg.KeyEvent) error

// policyRunner enforces network policy on this host: it follows the
// policies and netsets in etcd and the leases (for host: matches), and
// keeps the kernel's table equal to their compiled ruleset. It leaves the
// table in place when tulled stops, so enforcement never lapses across a
// restart; on start it replaces it once it has read every document.
type policyRunner struct {
	log   *slog.Logger
	enf   *policy.Enforcer
	local []netip.Prefix // this host's subnets

	leasesMu    sync.Mutex
	leaseEvs    []subnet.Event // lease events from the main loop, not yet taken in
	leasesReset bool           // drop the index before taking leaseEvs in (tests)
	leaseKick   chan struct{}  // cap 1: leaseEvs has news

	// state of the run goroutine
	docs      policyDocs
	leases    leaseIndex
	hostRefs  map[netip.Addr]bool // hosts named by host: matches of the policies in force
	lastText  string              // the ruleset in force, as rendered
	warned    map[string]bool
	frozenWhy string
	bridgeErr string

	// ensureBridge turns on br_netfilter (policy.EnsureBridgeFiltering;
	// tests run it in their namespace).
	ensureBridge func() ([]string, error)

	stats atomic.Pointer[policyStats]
	// turns counts the loop's turns (each after its apply, or its decision
	// not to), for tests to wait on; compiles counts the rulesets compiled.
	turns    atomic.Uint64
	compiles atomic.Uint64
}

// policyStats is what the metrics show besides the kernel's counters.
type policyStats struct {
	policies, netsets int
	invalid           int    // documents whose current value is refused
	refused           uint64 // refusals so far
	applies           uint64
	failures          uint64
	lastApply         time.Time
	lastTook          time.Duration
	bridgeFiltering   bool
	rules             int
}

func newPolicyRunner(local []netip.Prefix, enf *policy.Enforcer, log *slog.Logger) *policyRunner {
	p := &policyRunner{
		log:       log,
		enf:       enf,
		local:     local,
		leaseKick: make(chan struct{}, 1),
		docs:      newPolicyDocs(),
		leases:    newLeaseIndex(),
		warned:    map[string]bool{},

		ensureBridge: policy.EnsureBridgeFiltering,
	}
	p.stats.Store(&policyStats{})
	return p
}

// startPolicy starts enforcing network policy, once the lease says which
// workloads are this host's.
func (d *daemon) startPolicy() {
	local := []netip.Prefix{d.lease.Subnet}
	if d.lease.IPv6Subnet.IsValid() {
		local = append(local, d.lease.IPv6Subnet)
	}
	d.pol = newPolicyRunner(local, policy.NewEnforcer(0), d.log.With("component", "policy"))
	if err := d.metrics.Register(d.pol); err != nil {
		d.log.Warn("policy metrics not registered", "error", err)
	}
	d.wg.Go(func() { d.pol.run(d.runCtx, d.reg.WatchPrefix) })
}

// policyLeases hands the policy runner a batch of lease events (for host:
// matches): O(batch), so lease churn in a large cluster costs the main
// loop nothing per lease.
func (d *daemon) policyLeases(batch []subnet.Event) {
	if d.pol != nil {
		d.pol.leaseEvents(batch, false)
	}
}

// leaseEvents queues lease events for the runner (reset: they are the
// whole set); it never blocks.
func (p *policyRunner) leaseEvents(evs []subnet.Event, reset bool) {
	p.leasesMu.Lock()
	if reset {
		p.leaseEvs, p.leasesReset = nil, true
	}
	p.leaseEvs = append(p.leaseEvs, evs...)
	p.leasesMu.Unlock()
	select {
	case p.leaseKick <- struct{}{}:
	default:
	}
}

// setLeases replaces the leases the runner knows with leases.
func (p *policyRunner) setLeases(leases []subnet.Lease) {
	evs := make([]subnet.Event, len(leases))
	for i, l := range leases {
		evs[i] = subnet.Event{Type: subnet.EventAdded, Lease: l}
	}
	p.leaseEvents(evs, true)
}

// takeLeases takes the queued lease events into the index and reports
// whether one changed the leases of a host a policy names.
func (p *policyRunner) takeLeases() (relevant bool) {
	p.leasesMu.Lock()
	evs, reset := p.leaseEvs, p.leasesReset
	p.leaseEvs, p.leasesReset = nil, false
	p.leasesMu.Unlock()
	if reset {
		p.leases = newLeaseIndex()
		relevant = len(p.hostRefs) > 0
	}
	for _, ev := range evs {
		p.leases.apply(ev, func(a netip.Addr) { relevant = relevant || p.hostRefs[a] })
	}
	return relevant
}

// noteHostRefs recomputes which hosts the policies in force name.
func (p *policyRunner) noteHostRefs() {
	p.hostRefs = map[netip.Addr]bool{}
	for _, pol := range p.docs.policies {
		for _, a := range pol.Hosts() {
			p.hostRefs[a] = true
		}
	}
}

// run watches policies and netsets with watch and applies until ctx is
// done. The watches are its goroutines; it waits for them.
func (p *policyRunner) run(ctx context.Context, watch docWatch) {
	polCh, netCh := make(chan []etcdreg.KeyEvent), make(chan []etcdreg.KeyEvent)
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, w := range []struct {
		suffix string
		ch     chan []etcdreg.KeyEvent
	}{{policiesSuffix, polCh}, {netsetsSuffix, netCh}} {
		wg.Go(func() {
			if err := watch(ctx, w.suffix, w.ch); err != nil {
				p.log.Error("policy watch ended", "keys", w.suffix, "error", err)
			}
		})
	}
	var gotPolicies, gotNetsets, gotLeases bool
	// changed: something the ruleset depends on changed since the last
	// reconcile (a lease change only if a policy names its host, so that
	// lease churn does not recompile the ruleset).
	changed := false
	var retry <-chan time.Time
	onPolicies := func(b []etcdreg.KeyEvent) {
		p.docs.update(p, "policy", b)
		p.noteHostRefs()
		gotPolicies, changed = true, true
	}
	onNetsets := func(b []etcdreg.KeyEvent) {
		p.docs.update(p, "netset", b)
		gotNetsets, changed = true, true
	}
	onLeases := func() {
		if p.takeLeases() || !gotLeases {
			changed = true
		}
		gotLeases = true
	}
	for {
		select {
		case <-ctx.Done():
			return
		case b := <-polCh:
			onPolicies(b)
		case b := <-netCh:
			onNetsets(b)
		case <-p.leaseKick:
			onLeases()
		case <-retry:
			changed = true
		}
		// Take in whatever else is waiting, so a burst is one apply.
	drain:
		for {
			select {
			case b := <-polCh:
				onPolicies(b)
			case b := <-netCh:
				onNetsets(b)
			case <-p.leaseKick:
				onLeases()
			default:
				break drain
			}
		}
		// Until every document has been read, the rules of the last run
		// stay in force: a partial ruleset could open what they close.
		if gotPolicies && gotNetsets && gotLeases && changed {
			changed = false
			retry = nil
			if !p.reconcile() {
				retry = time.After(policyRetry)
			}
		}
		p.publish()
		p.turns.Add(1)
	}
}

// reconcile brings the kernel's table to the compiled ruleset of the
// documents in force. It returns false when the kernel refused it (the
// previous table stays; try again later).
func (p *policyRunner) reconcile() bool {
	if why := p.docs.frozen(); why != "" {
		if why != p.frozenWhy {
			p.log.Error("policy ruleset kept as it is until the document is fixed or deleted", "reason", why)
			p.frozenWhy = why
		}
		return true
	}
	if p.frozenWhy != "" {
		p.log.Info("policy documents valid again; applying")
		p.frozenWhy = ""
	}
	p.compiles.Add(1)
	rs := policy.Compile(policy.Input{
		Policies: slices.Collect(maps.Values(p.docs.policies)),
		Netsets:  p.docs.netsets,
		Leases:   p.leases.of(p.hostRefs),
		Local:    p.local,
	})
	var b strings.Builder
	rs.WriteTo(&b)
	text := b.String()
	if text == p.lastText {
		return true
	}
	if p.lastText == "" && len(rs.Policies) == 0 {
		// No policy, and none in force before this start: leave a kernel
		// without Tulle's table alone (it may have no nftables at all).
		if cs, err := p.enf.Counters(); err == nil && !cs.Installed {
			p.lastText = text
			p.log.Info("no network policy; no nftables table installed")
			return true
		}
	}
	for _, w := range rs.Warnings {
		if !p.warned[w] {
			p.warned[w] = true
			p.log.Warn("policy reference matches nothing", "warning", w)
		}
	}
	if len(rs.IngressWorkloads)+len(rs.EgressWorkloads) > 0 {
		p.ensureBridgeFiltering()
	}
	st, err := p.enf.Apply(rs)
	s := *p.stats.Load()
	if err != nil {
		s.failures++
		p.stats.Store(&s)
		p.log.Error("policy ruleset not applied; the previous one stays", "error", err, "retry_in", policyRetry)
		return false
	}
	p.lastText = text
	s.applies++
	s.lastApply = time.Now()
	s.lastTook = st.Took
	s.rules = st.Rules
	p.stats.Store(&s)
	p.log.Info("policy ruleset applied", "policies", len(rs.Policies), "netsets", len(p.docs.netsets),
		"rules", st.Rules, "sets", st.Sets, "elements", st.Elements, "took", st.Took.Round(time.Microsecond))
	return true
}

// ensureBridgeFiltering makes sure traffic between containers on one
// bridge reaches the forward chain (see package policy).
func (p *policyRunner) ensureBridgeFiltering() {
	changed, err := p.ensureBridge()
	for _, c := range changed {
		p.log.Info("turned on bridge netfilter so that traffic between containers on one bridge is filtered", "sysctl", c)
	}
	s := *p.stats.Load()
	s.bridgeFiltering = err == nil
	p.stats.Store(&s)
	if err != nil && err.Error() != p.bridgeErr {
		p.log.Error("traffic between containers on the same bridge is not filtered", "error", err)
	}
	p.bridgeErr = ""
	if err != nil {
		p.bridgeErr = err.Error()
	}
}

func (p *policyRunner) publish() {
	s := *p.stats.Load()
	s.policies, s.netsets = len(p.docs.policies), len(p.docs.netsets)
	s.invalid, s.refused = len(p.docs.invalid), p.docs.refused
	p.stats.Store(&s)
}

// policyDocs are the documents in force: for each key, its value if valid,
// else the last valid value this tulled saw.
type policyDocs struct {
	policies map[string]*policy.Policy
	netsets  map[string]*policy.Netset
	// invalid: "policy NAME" -> why its current value is refused.
	invalid map[string]error
	// unknown: refused documents of which no valid version is known (a
	// start with an invalid document in etcd): while there is one, the
	// ruleset in the kernel is kept as it is.
	unknown map[string]bool
	refused uint64
}

func newPolicyDocs() policyDocs {
	return policyDocs{
		policies: map[string]*policy.Policy{},
		netsets:  map[string]*policy.Netset{},
		invalid:  map[string]error{},
		unknown:  map[string]bool{},
	}
}

// update takes in one batch of kind ("policy" or "netset").
func (d *policyDocs) update(p *policyRunner, kind string, evs []etcdreg.KeyEvent) {
	for _, ev := range evs {
		id := kind + " " + ev.Key
		var known bool
		var err error
		if kind == "policy" {
			known, err = takeDoc(d.policies, ev, policy.ParsePolicy)
		} else {
			known, err = takeDoc(d.netsets, ev, policy.ParseNetset)
		}
		if err == nil {
			if _, was := d.invalid[id]; was {
				msg := "policy document valid again"
				if ev.Deleted {
					msg = "refused policy document deleted"
				}
				p.log.Info(msg, "document", id)
			}
			delete(d.invalid, id)
			delete(d.unknown, id)
			continue
		}
		d.refused++
		d.invalid[id] = err
		if known {
			p.log.Error("policy document refused; its previous version stays in force", "document", id, "reason", err)
		} else {
			d.unknown[id] = true
			p.log.Error("policy document refused", "document", id, "reason", err)
		}
	}
}

// takeDoc applies ev to docs, whose values parse reads. err says why a
// value is refused (docs keeps the key's previous version); known whether
// docs holds a version of the key now.
func takeDoc[T any](docs map[string]*T, ev etcdreg.KeyEvent, parse func(name string, data []byte) (*T, error)) (known bool, err error) {
	if ev.Deleted {
		delete(docs, ev.Key)
		return false, nil
	}
	v, err := parse(ev.Key, ev.Value)
	if err != nil {
		_, known = docs[ev.Key]
		return known, err
	}
	docs[ev.Key] = v
	return true, nil
}

// frozen says why the ruleset must not change now ("" if it may).
func (d *policyDocs) frozen() string {
	if len(d.unknown) == 0 {
		return ""
	}
	ids := slices.Sorted(maps.Keys(d.unknown))
	return fmt.Sprintf("%s is invalid and no valid version of it is known: %v", ids[0], d.invalid[ids[0]])
}

// Metrics of policy.
var (
	descPolRulePackets = prometheus.NewDesc("tulle_policy_rule_packets_total",
		"Packets that matched a policy rule (first packets of connections), by policy, direction, rule (1-based) and action.",
		[]string{"policy", "direction", "rule", "action"}, nil)
	descPolRuleBytes = prometheus.NewDesc("tulle_policy_rule_bytes_total",
		"Bytes of the packets that matched a policy rule.", []string{"policy", "direction", "rule", "action"}, nil)
	descPolDefaultPackets = prometheus.NewDesc("tulle_policy_default_deny_packets_total",
		"Packets dropped because no rule of the policies selecting a workload allowed them, by direction.", []string{"direction"}, nil)
	descPolDefaultBytes = prometheus.NewDesc("tulle_policy_default_deny_bytes_total",
		"Bytes of the packets dropped by default deny, by direction.", []string{"direction"}, nil)
	descPolLoaded = prometheus.NewDesc("tulle_policy_policies",
		"Policies in force on this host.", nil, nil)
	descPolNetsets = prometheus.NewDesc("tulle_policy_netsets",
		"Netsets in force on this host.", nil, nil)
	descPolInvalid = prometheus.NewDesc("tulle_policy_invalid_documents",
		"Policy and netset keys in etcd whose current value is refused (the previous version, or the previous ruleset, stays in force).", nil, nil)
	descPolRefused = prometheus.NewDesc("tulle_policy_refused_documents_total",
		"Policy or netset values refused as invalid.", nil, nil)
	descPolLastApply = prometheus.NewDesc("tulle_policy_last_apply_timestamp_seconds",
		"Unix time of the last ruleset applied to the kernel; absent before the first.", nil, nil)
	descPolApplySeconds = prometheus.NewDesc("tulle_policy_last_apply_duration_seconds",
		"How long the last apply took (compile excluded: one nftables transaction).", nil, nil)
	descPolFailures = prometheus.NewDesc("tulle_policy_apply_failures_total",
		"Rulesets the kernel refused (the previous one stayed).", nil, nil)
	descPolRules = prometheus.NewDesc("tulle_policy_kernel_rules",
		"Rules in Tulle's nftables table.", nil, nil)
	descPolBridge = prometheus.NewDesc("tulle_policy_bridge_filtering",
		"1 when traffic between containers on one bridge passes the policy (br_netfilter on), 0 when it could not be turned on.", nil, nil)
)

// Describe implements prometheus.Collector.
func (p *policyRunner) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPolRulePackets, descPolRuleBytes, descPolDefaultPackets, descPolDefaultBytes,
		descPolLoaded, descPolNetsets, descPolInvalid, descPolRefused, descPolLastApply, descPolApplySeconds, descPolFailures, descPolRules, descPolBridge} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: the counters are read from the
// kernel now.
func (p *policyRunner) Collect(ch chan<- prometheus.Metric) {
	s := p.stats.Load()
	gauge := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	gauge(descPolLoaded, float64(s.policies))
	gauge(descPolNetsets, float64(s.netsets))
	gauge(descPolInvalid, float64(s.invalid))
	counter(descPolRefused, float64(s.refused))
	counter(descPolFailures, float64(s.failures))
	if !s.lastApply.IsZero() {
		gauge(descPolLastApply, float64(s.lastApply.UnixNano())/1e9)
		gauge(descPolApplySeconds, s.lastTook.Seconds())
		gauge(descPolRules, float64(s.rules))
		gauge(descPolBridge, map[bool]float64{false: 0, true: 1}[s.bridgeFiltering])
	}
	cs, err := p.enf.Counters()
	if err != nil {
		p.log.Debug("policy counters not read", "error", err)
		return
	}
	for _, r := range cs.Rules {
		labels := []string{r.Policy, r.Direction.String(), strconv.Itoa(r.Index), r.Action.String()}
		counter(descPolRulePackets, float64(r.Packets), labels...)
		counter(descPolRuleBytes, float64(r.Bytes), labels...)
	}
	if cs.Installed {
		for _, dir := range []policy.Direction{policy.DirIngress, policy.DirEgress} {
			c := cs.DefaultDeny[dir]
			counter(descPolDefaultPackets, float64(c.Packets), dir.String())
			counter(descPolDefaultBytes, float64(c.Bytes), dir.String())
		}
	}
}
