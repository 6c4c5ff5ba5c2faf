package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/tulle-net/tulle/policy"
	"github.com/tulle-net/tulle/tests/testbed"
)

// Network policy modes: tulle-offload with policies in force on the
// receiving host. Not in the default -modes: give them with tulle-offload,
// the "no policy" reference they are judged against in the same run
// (-modes tulle-offload,tulle-policy,tulle-policy-large).
const (
	// modePolicyOne: one policy selects the server container and allows
	// the client (TCP and ICMP): the first packet of each connection meets
	// one rule.
	modePolicyOne = "tulle-policy"
	// modePolicyLarge: 1,000 rules over 10,000 addresses in 100 netsets
	// (none matching the benchmark's traffic) come before that allow, so
	// the first packet of each connection walks all of them.
	modePolicyLarge = "tulle-policy-large"
)

var policyModes = []string{modePolicyOne, modePolicyLarge}

const (
	largeRules    = 1000
	largeAddrs    = 10000
	rulesPerPol   = 100
	addrsPerSet   = 100
	allowPolicy   = "bench-allow"
	policyTimeout = 60 * time.Second
)

// policyDocs are the etcd keys and values of a policy mode: server is the
// selected container, client the one allowed.
func policyDocs(mode string, server, client string) map[string]string {
	docs := map[string]string{
		testbed.PolicyKey(allowPolicy): fmt.Sprintf(`{"Order":1000000,"Selector":[%q],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":[%q]},{"Action":"Allow","Protocol":"ICMP","Source":[%q]}]}`, server, client, client),
	}
	if mode != modePolicyLarge {
		return docs
	}
	sets := largeAddrs / addrsPerSet
	for s := range sets {
		var nets []string
		for i := range addrsPerSet {
			k := s*addrsPerSet + i // 198.19.k/127.(2*(k%127)): 10,000 addresses, none adjacent
			nets = append(nets, fmt.Sprintf("%q", fmt.Sprintf("198.19.%d.%d", k/127, 2*(k%127))))
		}
		docs[testbed.NetsetKey(fmt.Sprintf("bench-%d", s))] = `{"Nets":[` + strings.Join(nets, ",") + `]}`
	}
	for p := range largeRules / rulesPerPol {
		var rules []string
		for r := range rulesPerPol {
			i := p*rulesPerPol + r
			rules = append(rules, fmt.Sprintf(`{"Action":"Allow","Protocol":"TCP","Source":["set:bench-%d"],"Ports":["%d"]}`, i%sets, 1000+i))
		}
		docs[testbed.PolicyKey(fmt.Sprintf("bench-large-%d", p))] = fmt.Sprintf(`{"Order":%d,"Selector":[%q],"Ingress":[%s]}`, p, server, strings.Join(rules, ","))
	}
	return docs
}

// beginPolicy writes the mode's documents to etcd, starts tulled (which
// compiles and applies them all at start: the apply time reported), and
// waits until the server's host enforces them.
func (b *bench) beginPolicy(ctx context.Context, mode string, s *Sample) (*session, error) {
	h2 := b.bed.Host(2)
	if h2.Container() == nil { // the first Tulle mode of the run has not set the containers up yet
		sess, err := b.begin(ctx, modeTulleOffload)
		if err != nil {
			return nil, err
		}
		if err := b.stopDaemons(sess); err != nil {
			return nil, err
		}
	}
	server, client := b.bed.Host(2).Container().Addr, b.bed.Host(1).Container().Addr
	docs := policyDocs(mode, server.String(), client.String())
	for k, v := range docs {
		if err := b.bed.PutKey(ctx, k, v); err != nil {
			return nil, err
		}
	}
	sess, err := b.begin(ctx, modeTulleOffload)
	if err != nil {
		return nil, err
	}
	delete(sess.ends, pathHost) // policy filters workloads: container to container only
	want := allowPolicy + " ingress rule 1 allow ip"
	deadline := time.Now().Add(policyTimeout)
	for {
		inst, err := h2.PolicyTable()
		if err != nil {
			return sess, err
		}
		if inst != nil && slices.ContainsFunc(inst.Rules, func(r policy.InstalledRule) bool { return r.Comment == want }) {
			s.PolicyRules = len(inst.Rules)
			break
		}
		if time.Now().After(deadline) {
			return sess, fmt.Errorf("%s: host 2 did not install the policies within %v", mode, policyTimeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	m, err := h2.Scrape(ctx)
	if err != nil {
		return sess, err
	}
	s.PolicyApplySeconds = m.Value("tulle_policy_last_apply_duration_seconds")
	return sess, nil
}

// endPolicy deletes the mode's documents and removes the tables (which
// tulled leaves in the kernel on purpose), so the next mode runs without.
func (b *bench) endPolicy(ctx context.Context, mode string) error {
	server, client := b.bed.Host(2).Container().Addr, b.bed.Host(1).Container().Addr
	for k := range policyDocs(mode, server.String(), client.String()) {
		if err := b.bed.DeleteKey(ctx, k); err != nil {
			return err
		}
	}
	for _, h := range []*testbed.Host{b.bed.Host(1), b.bed.Host(2)} {
		f, err := os.Open("/run/netns/" + h.NS)
		if err != nil {
			return err
		}
		err = policy.NewEnforcer(int(f.Fd())).Remove()
		f.Close()
		if err != nil {
			return fmt.Errorf("host %s: %w", h.Name, err)
		}
	}
	return nil
}

// policyTargets judges issue 12's targets: TCP throughput with policy in
// force at least 0.95x of tulle-offload without, in the same run; the apply
// time of the large ruleset is reported.
func policyTargets(sum []ModeSummary, samples []Sample) []Target {
	base := summaryOf(sum, modeTulleOffload, pathContainer)
	var out []Target
	for i := range sum {
		m := &sum[i]
		if !slices.Contains(policyModes, m.Mode) || m.Path != pathContainer || base == nil {
			continue
		}
		if m.TCP1Gbit.Valid() && base.TCP1Gbit.Valid() {
			r := m.TCP1Gbit.Median / base.TCP1Gbit.Median
			out = append(out, Target{fmt.Sprintf("%s TCP 1 stream >= 0.95x no policy", m.Mode), fmt.Sprintf("%.3fx", r), r >= 0.95})
		}
		if m.TCPNGbit.Valid() && base.TCPNGbit.Valid() {
			r := m.TCPNGbit.Median / base.TCPNGbit.Median
			out = append(out, Target{fmt.Sprintf("%s TCP %d streams >= 0.95x no policy", m.Mode, m.Streams), fmt.Sprintf("%.3fx", r), r >= 0.95})
		}
	}
	var applies []float64
	rules := 0
	for _, s := range samples {
		if s.Mode == modePolicyLarge && s.PolicyApplySeconds > 0 {
			applies = append(applies, s.PolicyApplySeconds)
			rules = s.PolicyRules
		}
	}
	if st := summarize(applies); st.Valid() {
		out = append(out, Target{fmt.Sprintf("apply of %d rules over %d addresses < 1 s", rules, largeAddrs),
			fmt.Sprintf("%.0f ms [%.0f-%.0f]", st.Median*1e3, st.Min*1e3, st.Max*1e3), st.Max < 1})
	}
	return out
}
