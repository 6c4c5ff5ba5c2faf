package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/tulle-net/tulle/daemon/config"
	"github.com/tulle-net/tulle/tests/procstat"
	"github.com/tulle-net/tulle/tests/testbed"
)

// Config is one harness run, from the flags (recorded in results.json).
type Config struct {
	Leases     []int         `json:"leases"`
	Network    netip.Prefix  `json:"network"`
	SubnetLen  int           `json:"subnet_len"`
	IdleFor    time.Duration `json:"idle_ns"` // measured before the churn
	ChurnRate  int           `json:"churn_changes_per_second"`
	ChurnFor   time.Duration `json:"churn_ns"`
	Burst      int           `json:"burst_deletions"` // at most half the leases
	TulledArgs []string      `json:"tulled_args,omitempty"`
	// ProfileDir, if set, receives tulled's CPU profile of the churn and
	// its heap profile after the burst (tulled runs with --debug-pprof).
	ProfileDir string `json:"-"`
}

// Result is what one run at one number of leases measured.
type Result struct {
	Leases  int    `json:"leases"`
	Publics string `json:"public_ips"` // how the fake PublicIPs were chosen

	WriteSeconds float64 `json:"write_seconds"` // writing the leases into etcd

	// Start-up, from launching tulled: its "ready" log line, and the
	// route table holding every lease (tulled's own log timestamps).
	ReadySeconds     float64         `json:"ready_seconds"`
	StartPhases      []phase         `json:"start_phases"` // tulled's log lines up to ready, seconds after launch
	AllRoutesSeconds float64         `json:"all_routes_seconds"`
	StartCPUSeconds  float64         `json:"start_cpu_seconds"`   // tulled's CPU up to then
	StartRSS         procstat.Memory `json:"start_memory"`        // then
	StartRxBytes     uint64          `json:"start_etcd_rx_bytes"` // etcd to host, start-up

	IdleCPUPercent float64 `json:"idle_cpu_percent_of_one_core"` // before the churn, nothing changing

	Churn churnResult `json:"churn"`
	Burst burstResult `json:"burst"`

	// PeakRSS is tulled's VmHWM after churn and burst, before any scrape.
	PeakRSS procstat.Memory `json:"peak_memory"`
	// Scrape is the cost of one full /metrics scrape (four series a peer).
	Scrape scrapeCost `json:"scrape"`
	// TableEqualsEtcd: the route table (tulled's per-peer series) equals
	// the leases in etcd at the end.
	TableEqualsEtcd bool `json:"table_equals_etcd"`
	// Expected are the changes made after start-up, Applied what tulled's
	// log says it applied: equal when nothing was missed or duplicated.
	Expected          counts `json:"changes_made"`
	Applied           counts `json:"changes_applied"`
	AppliedEqualsMade bool   `json:"applied_equals_made"`
	// Differences list what broke either.
	Differences []string `json:"differences,omitempty"`
}

type phase struct {
	Msg     string  `json:"msg"`
	Seconds float64 `json:"seconds"`
}

// counts are route-table changes: additions and removals (a lease moved to
// another PublicIP is one of each) and the daemon's "peer added" and "peer
// removed" lines (one per change).
type counts struct {
	Added     int `json:"added"`
	Removed   int `json:"removed"`
	PeerLines int `json:"peer_lines"`
}

// tally counts what tulled's log lines say it applied and the latency of
// each change from its write to etcd.
type tally struct {
	counts
	pending   map[netip.Prefix][]change // changes made, by subnet, oldest first
	latencies []time.Duration
}

func (t *tally) add(l logLine) {
	switch l.Msg {
	case "route table updated":
		t.Added += l.Added
		t.Removed += l.Removed
	case "peer added", "peer removed":
		t.PeerLines++
		s, err := netip.ParsePrefix(l.Subnet)
		if cs := t.pending[s]; err == nil && len(cs) > 0 {
			t.latencies = append(t.latencies, l.Time.Sub(cs[0].start))
			t.pending[s] = cs[1:]
		}
	}
}

type churnResult struct {
	Changes    int     `json:"changes"`
	Seconds    float64 `json:"seconds"`
	Rate       float64 `json:"changes_per_second"`
	Adds       int     `json:"adds"`
	Deletes    int     `json:"deletes"`
	Moves      int     `json:"public_ip_changes"`
	CPUSeconds float64 `json:"cpu_seconds"`
	CPUPercent float64 `json:"cpu_percent_of_one_core"`
	// Latency from the write to etcd to tulled's log line of the change.
	LatencyP50Ms float64 `json:"latency_p50_ms"`
	LatencyP99Ms float64 `json:"latency_p99_ms"`
	LatencyMaxMs float64 `json:"latency_max_ms"`
	RxBytes      uint64  `json:"etcd_rx_bytes"` // etcd to host over the churn
	RxPerSecond  float64 `json:"etcd_rx_bytes_per_second"`
	RxPerChange  float64 `json:"etcd_rx_bytes_per_change"`
	TxPerSecond  float64 `json:"etcd_tx_bytes_per_second"`
}

type burstResult struct {
	Deletions  int     `json:"deletions"`
	Seconds    float64 `json:"apply_seconds"` // revoke sent -> route table without them
	CPUSeconds float64 `json:"cpu_seconds"`
	RxBytes    uint64  `json:"etcd_rx_bytes"`
}

type scrapeCost struct {
	Seconds    float64         `json:"seconds"`
	Bytes      int             `json:"bytes"`
	CPUSeconds float64         `json:"cpu_seconds"`
	RSSAfter   procstat.Memory `json:"memory_after"`
}

// session is one run at one number of leases: the bed, the fake hosts and
// the tulled under measure.
type session struct {
	cfg   Config
	n     int
	burst int
	r     *rand.Rand
	logf  func(string, ...any)
	res   *Result

	bed  *testbed.Bed
	host *testbed.Host
	f    *fleet
	tl   *testbed.Tulled
	tlog *tulledLog
	own  netip.Prefix
	tal  tally
}

// snapshot is tulled's CPU time and the host's etcd traffic at one moment.
type snapshot struct {
	at     time.Time
	cpu    time.Duration
	rx, tx uint64
}

func (s *session) snap() (snapshot, error) {
	cpu, err := procstat.CPU(s.tl.Pid())
	if err != nil {
		return snapshot{}, err
	}
	rx, tx, err := linkBytes(s.host.NS, s.host.Link)
	return snapshot{time.Now(), cpu, rx, tx}, err
}

// run measures one number of leases on a fresh bed.
func run(ctx context.Context, cfg Config, n int, logf func(string, ...any)) (res Result, err error) {
	res.Leases = n
	s := &session{cfg: cfg, n: n, burst: min(cfg.Burst, n/2), r: rand.New(rand.NewPCG(uint64(n), 14)), logf: logf, res: &res}
	s.tal.pending = map[netip.Prefix][]change{}
	s.bed, err = testbed.New(ctx, testbed.Options{Hosts: 1, Logf: logf})
	if err != nil {
		return res, err
	}
	s.host = s.bed.Hosts[0]
	defer func() {
		if err != nil {
			logf("tulled log tail:\n%s", testbed.LogTail(s.host.LogFile, 30))
		}
		err = errors.Join(err, s.bed.Close())
	}()
	for _, phase := range []func(context.Context) error{s.populate, s.start, s.idle, s.churn, s.burstDeletions, s.verify} {
		if err := phase(ctx); err != nil {
			return res, err
		}
	}
	if err := s.tl.Stop(); err != nil {
		return res, fmt.Errorf("stop tulled: %w", err)
	}
	return res, nil
}

// populate writes the network config and the fake hosts' leases.
func (s *session) populate(ctx context.Context) error {
	netCfg, _ := json.Marshal(map[string]any{"Network": s.cfg.Network.String(), "SubnetLen": s.cfg.SubnetLen, "Backend": map[string]string{"Type": "udp"}})
	if err := s.bed.WriteNetworkConfig(ctx, string(netCfg)); err != nil {
		return err
	}
	cli, err := s.bed.EtcdClient()
	if err != nil {
		return err
	}
	s.f = &fleet{cfg: s.cfg, cli: cli}
	s.f.publics, s.res.Publics = choosePublics(s.cfg.Network, s.n+s.cfg.ChurnRate*int(s.cfg.ChurnFor/time.Second+1))
	t0 := time.Now()
	if err := s.f.populate(ctx, s.n, s.burst, s.r); err != nil {
		return err
	}
	s.res.WriteSeconds = time.Since(t0).Seconds()
	s.logf("%d leases written into etcd in %.2f s (PublicIPs: %s)", s.n, s.res.WriteSeconds, s.res.Publics)
	return nil
}

// start launches tulled and waits until it is ready with every lease in
// its route table; times come from tulled's own log.
func (s *session) start(ctx context.Context) error {
	if _, err := testbed.BuildTulled(ctx); err != nil { // not inside the start-up time
		return err
	}
	var err error
	if s.tlog, err = followLog(s.host.LogFile); err != nil {
		return err
	}
	rx0, _, err := linkBytes(s.host.NS, s.host.Link)
	if err != nil {
		return err
	}
	args := append([]string{"--log-format=json"}, s.cfg.TulledArgs...)
	if s.cfg.ProfileDir != "" {
		args = append(args, "--debug-pprof")
	}
	launch := time.Now()
	if s.tl, err = s.host.LaunchTulled(ctx, args...); err != nil {
		return err
	}
	res := s.res
	var ready, allRoutes, lastPeerLine time.Time
	if err := waitLog(ctx, s.tlog, s.tl, func(l logLine) bool {
		switch { // the phases, with the thousands of "peer added" lines as two
		case l.Msg == "peer added" && lastPeerLine.IsZero():
			res.StartPhases = append(res.StartPhases, phase{"first peer added line", l.Time.Sub(launch).Seconds()})
			fallthrough
		case l.Msg == "peer added":
			lastPeerLine = l.Time
		default:
			if !lastPeerLine.IsZero() {
				res.StartPhases = append(res.StartPhases, phase{"last peer added line", lastPeerLine.Sub(launch).Seconds()})
				lastPeerLine = time.Time{}
			}
			res.StartPhases = append(res.StartPhases, phase{l.Msg, l.Time.Sub(launch).Seconds()})
		}
		if l.Msg == "ready" {
			ready = l.Time
		}
		if l.Msg == "route table updated" && l.Peers != nil && *l.Peers == s.n {
			allRoutes = l.Time
		}
		return !ready.IsZero() && !allRoutes.IsZero()
	}); err != nil {
		return fmt.Errorf("start-up with %d leases: %w", s.n, err)
	}
	res.ReadySeconds = ready.Sub(launch).Seconds()
	res.AllRoutesSeconds = allRoutes.Sub(launch).Seconds()
	now, err := s.snap()
	if err != nil {
		return err
	}
	res.StartCPUSeconds = now.cpu.Seconds()
	res.StartRxBytes = now.rx - rx0
	if res.StartRSS, err = procstat.ReadMemory(s.tl.Pid()); err != nil {
		return err
	}
	s.logf("tulled ready after %.3f s, every route after %.3f s, %.2f CPU s, RSS %.1f MiB, %.1f MiB from etcd",
		res.ReadySeconds, res.AllRoutesSeconds, res.StartCPUSeconds, mib(res.StartRSS.RSS), mib(int64(res.StartRxBytes)))
	env, err := s.host.SubnetEnv()
	if err != nil {
		return err
	}
	s.own = env.Lease()
	s.f.setOwn(s.own)
	return nil
}

// idle measures what tulled costs with nothing changing (renewals, health
// ticks, watch progress), to tell from the churn's cost.
func (s *session) idle(ctx context.Context) error {
	if s.cfg.IdleFor <= 0 {
		return nil
	}
	before, err := s.snap()
	if err != nil {
		return err
	}
	select { // a measuring window, not a wait for something
	case <-time.After(s.cfg.IdleFor):
	case <-ctx.Done():
		return ctx.Err()
	}
	after, err := s.snap()
	if err != nil {
		return err
	}
	s.res.IdleCPUPercent = 100 * (after.cpu - before.cpu).Seconds() / after.at.Sub(before.at).Seconds()
	s.logf("idle for %v: tulled %.2f%% of a core", s.cfg.IdleFor, s.res.IdleCPUPercent)
	return nil
}

// churn makes the changes and waits until tulled has applied as many as
// were made. Every log line from here on is tallied.
func (s *session) churn(ctx context.Context) error {
	before, err := s.snap()
	if err != nil {
		return err
	}
	profiled := make(chan error, 1)
	if secs := int(s.cfg.ChurnFor/time.Second) - 2; s.cfg.ProfileDir != "" && secs > 0 { // testbed.HTTPGet allows 30 s
		go func() {
			profiled <- saveProfile(ctx, s.tl, fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs),
				filepath.Join(s.cfg.ProfileDir, fmt.Sprintf("cpu-churn-%d.pprof", s.n)))
		}()
	} else {
		profiled <- nil
	}
	changes, err := s.f.churn(ctx, s.cfg.ChurnRate, s.cfg.ChurnFor, s.r)
	if perr := <-profiled; err == nil {
		err = perr
	}
	if err != nil {
		return fmt.Errorf("churn: %w", err)
	}
	ch := &s.res.Churn
	ch.Seconds = time.Since(before.at).Seconds()
	ch.Changes = len(changes)
	ch.Rate = float64(ch.Changes) / ch.Seconds
	for _, c := range changes {
		switch c.kind {
		case "add":
			ch.Adds++
		case "delete":
			ch.Deletes++
		case "move":
			ch.Moves++
		}
		s.tal.pending[c.subnet] = append(s.tal.pending[c.subnet], c)
	}
	for _, cs := range s.tal.pending {
		sort.Slice(cs, func(i, j int) bool { return cs[i].start.Before(cs[j].start) })
	}
	want := &s.res.Expected
	*want = counts{Added: ch.Adds + ch.Moves, Removed: ch.Deletes + ch.Moves, PeerLines: ch.Changes}
	if err := waitLog(ctx, s.tlog, s.tl, func(l logLine) bool {
		s.tal.add(l)
		return s.tal.Added >= want.Added && s.tal.Removed >= want.Removed && s.tal.PeerLines >= want.PeerLines
	}); err != nil {
		return fmt.Errorf("churn: applied %+v of %+v: %w", s.tal.counts, *want, err)
	}
	after, err := s.snap()
	if err != nil {
		return err
	}
	ch.CPUSeconds = (after.cpu - before.cpu).Seconds()
	elapsed := after.at.Sub(before.at).Seconds()
	ch.CPUPercent = 100 * ch.CPUSeconds / elapsed
	ch.RxBytes = after.rx - before.rx
	ch.RxPerSecond = float64(ch.RxBytes) / elapsed
	ch.TxPerSecond = float64(after.tx-before.tx) / elapsed
	ch.RxPerChange = float64(ch.RxBytes) / float64(max(ch.Changes, 1))
	lat := s.tal.latencies
	slices.Sort(lat)
	if len(lat) > 0 {
		q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
		ch.LatencyP50Ms, ch.LatencyP99Ms, ch.LatencyMaxMs = q(0.5), q(0.99), q(1)
	}
	s.logf("churn: %d changes in %.1f s (%.0f/s): tulled %.2f CPU s = %.1f%% of a core; latency p50 %.1f ms, p99 %.1f ms; etcd -> host %.0f B/s",
		ch.Changes, ch.Seconds, ch.Rate, ch.CPUSeconds, ch.CPUPercent, ch.LatencyP50Ms, ch.LatencyP99Ms, ch.RxPerSecond)
	return nil
}

// burstDeletions revokes the rack's etcd lease, so that its leases go in
// one revision as when they expire together, and times tulled's route
// table update without them.
func (s *session) burstDeletions(ctx context.Context) error {
	if s.burst == 0 {
		return nil
	}
	ch := s.res.Churn
	peers := s.n - s.burst + ch.Adds - ch.Deletes
	want := &s.res.Expected
	want.Removed += s.burst
	want.PeerLines += s.burst
	before, err := s.snap()
	if err != nil {
		return err
	}
	if _, err := s.f.cli.Revoke(ctx, s.f.rack); err != nil {
		return fmt.Errorf("burst: revoke the rack's etcd lease: %w", err)
	}
	var applied time.Time
	if err := waitLog(ctx, s.tlog, s.tl, func(l logLine) bool {
		s.tal.add(l)
		if l.Msg == "route table updated" && l.Peers != nil && *l.Peers == peers {
			applied = l.Time
		}
		return !applied.IsZero() && s.tal.PeerLines >= want.PeerLines
	}); err != nil {
		return fmt.Errorf("burst of %d deletions: %w", s.burst, err)
	}
	after, err := s.snap()
	if err != nil {
		return err
	}
	s.res.Burst = burstResult{Deletions: s.burst, Seconds: applied.Sub(before.at).Seconds(),
		CPUSeconds: (after.cpu - before.cpu).Seconds(), RxBytes: after.rx - before.rx}
	s.logf("burst: %d deletions applied %.3f s after the revoke, %.2f CPU s", s.burst, s.res.Burst.Seconds, s.res.Burst.CPUSeconds)
	return nil
}

// verify reads the peak RSS, then compares the route table with etcd
// through one full scrape (measured too), and the changes applied with
// the changes made.
func (s *session) verify(ctx context.Context) error {
	res := s.res
	pid := s.tl.Pid()
	var err error
	if res.PeakRSS, err = procstat.ReadMemory(pid); err != nil {
		return err
	}
	if s.cfg.ProfileDir != "" {
		if err := saveProfile(ctx, s.tl, "/debug/pprof/heap?gc=1", filepath.Join(s.cfg.ProfileDir, fmt.Sprintf("heap-%d.pprof", s.n))); err != nil {
			return err
		}
	}
	cpu0, err := procstat.CPU(pid)
	if err != nil {
		return err
	}
	t0 := time.Now()
	code, body, err := s.tl.Get(ctx, "/metrics")
	if err != nil || code != 200 {
		return fmt.Errorf("scrape: status %d: %v", code, err)
	}
	res.Scrape.Seconds = time.Since(t0).Seconds()
	res.Scrape.Bytes = len(body)
	cpu1, err := procstat.CPU(pid)
	if err != nil {
		return err
	}
	res.Scrape.CPUSeconds = (cpu1 - cpu0).Seconds()
	if res.Scrape.RSSAfter, err = procstat.ReadMemory(pid); err != nil {
		return err
	}
	m, err := testbed.ParseMetrics(body)
	if err != nil {
		return err
	}
	etcdLeases, err := s.bed.Leases(ctx)
	if err != nil {
		return err
	}
	res.Differences = compare(m, etcdLeases, s.own)
	res.TableEqualsEtcd = len(res.Differences) == 0
	// What tulled logged since (a change applied twice would show).
	for {
		l, ok, err := s.tlog.take()
		if err != nil {
			return err
		}
		if !ok {
			break
		}
		s.tal.add(l)
	}
	res.Applied = s.tal.counts
	res.AppliedEqualsMade = res.Applied == res.Expected
	if !res.AppliedEqualsMade {
		res.Differences = append(res.Differences, fmt.Sprintf("applied %+v, made %+v", res.Applied, res.Expected))
	}
	s.logf("peak RSS %.1f MiB before any scrape; one scrape: %.3f s, %.1f MiB, %.2f CPU s, RSS after %.1f MiB; table equals etcd: %v, applied equals made: %v",
		mib(res.PeakRSS.PeakRSS), res.Scrape.Seconds, float64(res.Scrape.Bytes)/(1<<20), res.Scrape.CPUSeconds,
		mib(res.Scrape.RSSAfter.RSS), res.TableEqualsEtcd, res.AppliedEqualsMade)
	if len(res.Differences) > 0 {
		return fmt.Errorf("something missed or duplicated: %s", strings.Join(res.Differences[:min(len(res.Differences), 10)], "; "))
	}
	return nil
}

// compare returns how tulled's route table, as its per-peer series name it
// (peer, subnet), differs from the leases in etcd (own left out), sorted.
func compare(m testbed.Metrics, etcdLeases map[string]string, own netip.Prefix) []string {
	table := map[string]string{}
	var diffs []string
	for _, s := range m.Samples("tulle_peer_transmit_packets_total") {
		sub, err := netip.ParsePrefix(s.Labels["subnet"])
		if err != nil {
			diffs = append(diffs, fmt.Sprintf("series with subnet %q", s.Labels["subnet"]))
			continue
		}
		key := fmt.Sprintf("%s-%d", sub.Addr(), sub.Bits())
		if _, dup := table[key]; dup {
			diffs = append(diffs, "twice in the table: "+key)
		}
		table[key] = s.Labels["peer"]
	}
	ownKey := fmt.Sprintf("%s-%d", own.Addr(), own.Bits())
	for k, pub := range etcdLeases {
		if k == ownKey {
			continue
		}
		if got, ok := table[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("missing from the table: %s (%s)", k, pub))
		} else if got != pub {
			diffs = append(diffs, fmt.Sprintf("%s: table has %s, etcd %s", k, got, pub))
		}
	}
	for k, pub := range table {
		if _, ok := etcdLeases[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("in the table, not in etcd: %s (%s)", k, pub))
		}
	}
	if n := m.Value("tulle_peers"); int(n) != len(table) {
		diffs = append(diffs, fmt.Sprintf("tulle_peers %v, %d series", n, len(table)))
	}
	sort.Strings(diffs)
	return diffs
}

// waitLog feeds tulled's log lines, one by one, to done until it returns
// true, tulled exits or applyWait passes.
func waitLog(ctx context.Context, tlog *tulledLog, tl *testbed.Tulled, done func(logLine) bool) error {
	ctx, cancel := context.WithTimeout(ctx, applyWait)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		for {
			l, ok, err := tlog.take()
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			if done(l) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not seen in tulled's log within %v", applyWait)
		case <-tl.Exited():
			return fmt.Errorf("tulled exited: %s", tl.ExitDescription())
		case <-tick.C:
		}
	}
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// saveProfile writes the profile tulled serves at url to path.
func saveProfile(ctx context.Context, tl *testbed.Tulled, url, path string) error {
	// The profiler has a loopback listener of its own in the host's namespace.
	code, body, err := testbed.HTTPGet(ctx, tl.Host.NS, "http://"+config.DefaultPprofAddr+url)
	if err != nil || code != 200 {
		return fmt.Errorf("profile %s: status %d: %v", url, code, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, body, 0o644)
}
