package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

// endpoint is one end of the measured traffic: a namespace and the address
// the other end reaches it at.
type endpoint struct {
	Name string     `json:"name"` // "h1", "c2", "x2"
	NS   string     `json:"netns"`
	Addr netip.Addr `json:"addr"`
}

// session is one mode set up for one repetition.
type session struct {
	ends         map[string]ends   // by path (-path); a mode may lack one (underlay: host only)
	daemons      []*testbed.Tulled // the tulleds of a Tulle mode
	reachTimeout time.Duration
}

// ends are the two ends of one path's traffic.
type ends struct{ client, server endpoint }

// set records path's ends: a client in namespace cns, the server at saddr
// in namespace sns.
func (s *session) set(path, cname, cns string, caddr netip.Addr, sname, sns string, saddr netip.Addr) {
	if s.ends == nil {
		s.ends = map[string]ends{}
	}
	s.ends[path] = ends{endpoint{cname, cns, caddr}, endpoint{sname, sns, saddr}}
}

// Sample is everything measured in one mode on one path in one repetition.
type Sample struct {
	Mode    string        `json:"mode"`
	Path    string        `json:"path"`  // container or host
	Rep     int           `json:"rep"`   // 1-based
	Order   int           `json:"order"` // position of the mode within its repetition, 1-based
	Start   time.Time     `json:"start"`
	Client  endpoint      `json:"client"`
	Server  endpoint      `json:"server"`
	Ping    *pingResult   `json:"ping,omitempty"`
	TCP     []tcpRun      `json:"tcp,omitempty"`
	Daemons []daemonStat  `json:"daemons,omitempty"`
	Elapsed time.Duration `json:"elapsed_ns"`
	Errors  []string      `json:"errors,omitempty"`
	// PolicyApplySeconds and PolicyRules: a policy mode's apply at
	// tulled's start on the server's host, and the rules it installed.
	PolicyApplySeconds float64 `json:"policy_apply_seconds,omitempty"`
	PolicyRules        int     `json:"policy_rules,omitempty"`
}

// tcpRun is one iperf3 run with the daemons' CPU time during it.
type tcpRun struct {
	iperfResult
	Gbit float64 `json:"gbit_per_second"`
	// DaemonCPUSeconds is the CPU time of each tulled (in host order) during
	// the run, ramp-up included; empty for the kernel modes.
	DaemonCPUSeconds []float64 `json:"daemon_cpu_seconds,omitempty"`
	// CPUSecondsPerGB is the sum of DaemonCPUSeconds per 10^9 bytes of
	// payload moved (AllBytes); NaN-free: 0 when not measured.
	CPUSecondsPerGB float64 `json:"daemon_cpu_seconds_per_gb,omitempty"`
	// ServerCPUSeconds and SoftirqCPUSeconds are the iperf3 server's and
	// the ksoftirqd threads' CPU time during the run (the client's is in
	// iperfResult); PathCPUSeconds adds them, the client's and the
	// daemons': the CPU the data took, PathCPUSecondsPerGB per 10^9 bytes.
	ServerCPUSeconds    float64 `json:"server_cpu_seconds"`
	SoftirqCPUSeconds   float64 `json:"softirq_cpu_seconds"`
	PathCPUSeconds      float64 `json:"path_cpu_seconds"`
	PathCPUSecondsPerGB float64 `json:"path_cpu_seconds_per_gb,omitempty"`
	Error               string  `json:"error,omitempty"`
}

// daemonStat is what /proc says of one tulled at the end of its run.
type daemonStat struct {
	Host         string  `json:"host"`
	PID          int     `json:"pid"`
	PeakRSSBytes int64   `json:"peak_rss_bytes"`
	CPUSeconds   float64 `json:"cpu_seconds"` // its whole life, start-up included
	// Drops are tulle_dropped_packets_total by "direction/reason", the
	// non-zero ones; a benchmark should drop nothing.
	Drops map[string]float64 `json:"drops,omitempty"`
	// Metrics is the file (in the results folder) holding its last /metrics.
	Metrics string `json:"metrics_file,omitempty"`
}

// bench is one benchmark run.
type bench struct {
	cfg   Config
	w     io.Writer
	start time.Time

	bed      *testbed.Bed
	vx       *vxlanNet
	softirqs []int // the kernel's ksoftirqd threads
	report   Report
	mu       sync.Mutex // serialises progress output
}

func newBench(cfg Config, w io.Writer) *bench {
	b := &bench{cfg: cfg, w: w, start: time.Now()}
	b.report = Report{Benchmark: "tulle-throughput", Started: b.start, Config: cfg}
	return b
}

// logf prints one progress line, stamped with the time since the start.
func (b *bench) logf(format string, args ...any) {
	b.mu.Lock()
	defer b.mu.Unlock()
	fmt.Fprintf(b.w, "[%6.1fs] %s\n", time.Since(b.start).Seconds(), fmt.Sprintf(format, args...))
}

// failed reports whether any measurement failed.
func (b *bench) failed() bool {
	if len(b.report.Errors) > 0 {
		return true
	}
	for _, s := range b.report.Samples {
		if len(s.Errors) > 0 {
			return true
		}
	}
	return false
}

func (b *bench) hasTulle() bool {
	return contains(b.cfg.Modes, modeTulleOffload) || contains(b.cfg.Modes, modeTulleWater) || contains(b.cfg.Modes, modeTulleDirect) ||
		contains(b.cfg.Modes, modeTulleIPv6) || contains(b.cfg.Modes, modeTulleBaseline) ||
		contains(b.cfg.Modes, modePolicyOne) || contains(b.cfg.Modes, modePolicyLarge)
}

// run builds the testbed, measures every mode cfg.Reps times, then prints
// the table and writes the results. Measurement failures are recorded in
// the samples and the run goes on; set-up failures end it. Results measured
// so far are written in every case.
func (b *bench) run(ctx context.Context) (err error) {
	defer func() {
		b.report.Finished = time.Now()
		b.report.Complete = err == nil && !b.failed()
		if err != nil {
			b.report.Errors = append(b.report.Errors, err.Error())
		}
		if len(b.report.Samples) > 0 {
			b.report.Summary = summarizeModes(b.cfg, b.report.Samples)
			if !b.cfg.Smoke {
				b.report.Targets = evaluateTargets(b.cfg, b.report.Summary)
				b.report.Targets = append(b.report.Targets, directTargets(b.cfg, b.report.Summary)...)
				b.report.Targets = append(b.report.Targets, policyTargets(b.report.Summary, b.report.Samples)...)
				b.report.Targets = append(b.report.Targets, ipv6Targets(b.cfg, b.report.Summary)...)
			}
			b.mu.Lock()
			printTable(b.w, b.cfg, b.report)
			b.mu.Unlock()
		}
		if werr := b.writeResults(); werr != nil {
			err = errors.Join(err, werr)
		}
	}()

	if err := os.MkdirAll(b.cfg.Out, 0o755); err != nil {
		return fmt.Errorf("results folder: %w", err)
	}
	b.logf("bench: modes %s, %d repetition(s), paths %s; iperf3 %ds (+%ds ramp-up) with 1 and %d streams, %d pings; about %v",
		strings.Join(b.cfg.Modes, ", "), b.cfg.Reps, strings.Join(b.cfg.Paths, " and "), b.cfg.Duration, b.cfg.Omit, b.cfg.Streams, b.cfg.Pings,
		b.estimate().Round(10*time.Second))
	b.report.Env = collectEnv(ctx)

	if b.hasTulle() {
		b.logf("building tulled")
		bin, err := testbed.BuildTulled(ctx)
		if err != nil {
			return err
		}
		b.report.Env.Tulled = tulledVersion(ctx, bin)
	}
	if b.cfg.Baseline != "" {
		b.logf("preparing the baseline tulled (%s)", b.cfg.Baseline)
		if err := b.prepareBaseline(ctx); err != nil {
			return err
		}
		b.logf("baseline: %s", b.report.Env.Baseline)
	}
	b.softirqs = softirqThreads()
	b.logf("building the testbed (2 hosts, etcd)")
	opts := testbed.Options{Hosts: 2, NoEtcd: !b.hasTulle()}
	if b.cfg.Verbose {
		opts.Logf = func(f string, a ...any) { b.logf(f, a...) }
	}
	bed, err := testbed.New(ctx, opts)
	if err != nil {
		return err
	}
	b.bed = bed
	if b.hasTulle() {
		if err := bed.WriteNetworkConfig(ctx, b.runConfig(testbed.DefaultNetworkConfig)); err != nil {
			return err
		}
	}
	if contains(b.cfg.Modes, modeVXLAN) || contains(b.cfg.Modes, modeVXLANIPv6) {
		vx, err := setupVXLAN(ctx, bed, []*testbed.Host{bed.Host(1), bed.Host(2)})
		if err != nil {
			return err
		}
		b.vx = vx
		b.logf("kernel VXLAN set up: VNI %d, port %d, MTU %d, overlay 198.19.0.0/16", vxlanVNI, vxlanPort, vx.Hosts[0].MTU)
		if contains(b.cfg.Modes, modeVXLANIPv6) {
			if err := vx.addIPv6(ctx); err != nil {
				return err
			}
			b.logf("kernel VXLAN carries IPv6 too: overlay %s", vxlanIPv6Net)
		}
	}

	for rep := 0; rep < b.cfg.Reps; rep++ {
		n := len(b.cfg.Modes)
		for k := 0; k < n; k++ {
			mode := b.cfg.Modes[(rep+k)%n] // rotate, so no mode always runs first
			s := b.measureMode(ctx, mode, rep+1, k+1)
			b.report.Samples = append(b.report.Samples, s...)
			if ctx.Err() != nil {
				return fmt.Errorf("stopped in %s, repetition %d: %w", mode, rep+1, ctx.Err())
			}
		}
	}
	return nil
}

// estimate is the expected length of the run.
func (b *bench) estimate() time.Duration {
	per := 3*b.cfg.Settle + time.Duration(b.cfg.Pings)*b.cfg.PingInterval +
		2*time.Duration(b.cfg.Duration+b.cfg.Omit)*time.Second + 2*time.Second
	total := time.Duration(b.cfg.Reps*len(b.cfg.Modes)*len(b.cfg.Paths)) * per
	if b.hasTulle() {
		total += time.Duration(b.cfg.Reps) * 2 * 3 * time.Second // tulled start and stop
	}
	return total + 10*time.Second
}

// measureMode sets the mode up, measures it on each path and tears it
// down: one sample per path (a set-up failure is recorded in each).
func (b *bench) measureMode(ctx context.Context, mode string, rep, order int) []Sample {
	start := time.Now()
	var pre Sample // what the set-up recorded (a policy mode's apply)
	var setupErrs []string
	fail := func(err error) { setupErrs = append(setupErrs, err.Error()) }

	var sess *session
	var err error
	if contains(policyModes, mode) {
		sess, err = b.beginPolicy(ctx, mode, &pre)
		if err != nil && sess != nil {
			err = errors.Join(err, b.stopDaemons(sess))
		}
	} else {
		sess, err = b.begin(ctx, mode)
	}
	endPolicy := func() {
		if contains(policyModes, mode) {
			if err := b.endPolicy(ctx, mode); err != nil {
				fail(err)
			}
		}
	}
	var out []Sample
	if err != nil {
		fail(err)
		endPolicy()
		for _, path := range b.cfg.Paths {
			out = append(out, Sample{Mode: mode, Path: path, Rep: rep, Order: order, Start: start, Elapsed: time.Since(start), Errors: setupErrs})
		}
		b.logf("rep %d/%d %-13s set-up failed: %v", rep, b.cfg.Reps, mode, err)
		return out
	}
	for _, path := range b.cfg.Paths {
		e, ok := sess.ends[path]
		if !ok {
			continue
		}
		s := Sample{Mode: mode, Path: path, Rep: rep, Order: order, Start: time.Now(), Client: e.client, Server: e.server,
			PolicyApplySeconds: pre.PolicyApplySeconds, PolicyRules: pre.PolicyRules}
		b.measure(ctx, sess, e, &s, func(err error) { s.Errors = append(s.Errors, err.Error()) })
		s.Elapsed = time.Since(s.Start)
		out = append(out, s)
		if ctx.Err() != nil {
			break
		}
	}
	if len(out) == 0 { // the mode has none of the paths asked for
		out = append(out, Sample{Mode: mode, Rep: rep, Order: order, Start: start,
			Errors: []string{fmt.Sprintf("%s: none of the paths %v", mode, b.cfg.Paths)}})
	}
	last := &out[len(out)-1]
	if err := b.end(sess, last); err != nil {
		fail(err)
		b.logf("rep %d/%d %-13s tear-down: %v", rep, b.cfg.Reps, mode, err)
	}
	endPolicy()
	for i := range out {
		out[i].Daemons = last.Daemons // one tulled run for every path
		out[i].Errors = append(out[i].Errors, setupErrs...)
		b.logf("rep %d/%d %-13s %-9s %s", rep, b.cfg.Reps, mode, out[i].Path, progressLine(out[i]))
	}
	return out
}

// measure runs the ping and the two iperf3 tests of one path of a session.
func (b *bench) measure(ctx context.Context, sess *session, e ends, s *Sample, fail func(error)) {
	srv, err := startIperfServer(ctx, e.server.NS)
	if err != nil {
		fail(err)
		return
	}
	defer srv.stop()
	if err := waitReachable(ctx, e.client.NS, e.server.Addr, sess.reachTimeout); err != nil {
		fail(fmt.Errorf("%s: %w", s.Mode, err))
		return
	}
	if sleepCtx(ctx, b.cfg.Settle) != nil {
		return
	}
	if p, err := runPing(ctx, e.client.NS, e.server.Addr, b.cfg.Pings, b.cfg.PingInterval); err != nil {
		fail(err)
	} else {
		s.Ping = &p
	}
	for _, streams := range []int{1, b.cfg.Streams} {
		if sleepCtx(ctx, b.cfg.Settle) != nil {
			return
		}
		run := b.measureTCP(ctx, sess, e, srv, streams)
		if run.Error != "" {
			fail(errors.New(run.Error))
		}
		s.TCP = append(s.TCP, run)
		if ctx.Err() != nil {
			return
		}
	}
}

// measureTCP runs iperf3 with the given streams and samples around it the
// CPU time of the tulleds and of everything that moves the data: both
// iperf3 processes, the kernel's softirq threads and the tulleds (network
// processing runs mostly in the context of the process whose system call
// set it off, so these are where it is counted).
func (b *bench) measureTCP(ctx context.Context, sess *session, e ends, srv *iperfServer, streams int) tcpRun {
	before := make([]time.Duration, len(sess.daemons))
	for i, t := range sess.daemons {
		before[i], _ = processCPU(t.Pid())
	}
	srvBefore, srvErr := processCPU(srv.pid())
	irqBefore := threadsCPU(b.softirqs)
	res, _, err := runIperf(ctx, iperfSpec{
		ClientNS: e.client.NS, Server: e.server.Addr, Streams: streams,
		Duration: b.cfg.Duration, Omit: b.cfg.Omit,
	})
	run := tcpRun{iperfResult: res, Gbit: res.Gbps()}
	run.Streams = streams
	if err != nil {
		run.Error = err.Error()
		return run
	}
	var total float64
	for i, t := range sess.daemons {
		after, cerr := processCPU(t.Pid())
		if cerr != nil {
			run.Error = fmt.Sprintf("tulled on %s: %v (did it exit?)", t.Host.Name, cerr)
			return run
		}
		secs := (after - before[i]).Seconds()
		run.DaemonCPUSeconds = append(run.DaemonCPUSeconds, secs)
		total += secs
	}
	srvAfter, srvErr2 := processCPU(srv.pid())
	if err := errors.Join(srvErr, srvErr2); err != nil {
		run.Error = fmt.Sprintf("iperf3 server: %v", err)
		return run
	}
	run.ServerCPUSeconds = (srvAfter - srvBefore).Seconds()
	run.SoftirqCPUSeconds = (threadsCPU(b.softirqs) - irqBefore).Seconds()
	run.PathCPUSeconds = total + run.ClientCPUSeconds + run.ServerCPUSeconds + run.SoftirqCPUSeconds
	if res.AllBytes > 0 {
		gb := float64(res.AllBytes) / 1e9
		run.PathCPUSecondsPerGB = run.PathCPUSeconds / gb
		if len(sess.daemons) > 0 {
			run.CPUSecondsPerGB = total / gb
		}
	}
	return run
}

// begin sets a mode up for one repetition.
func (b *bench) begin(ctx context.Context, mode string) (*session, error) {
	h1, h2 := b.bed.Host(1), b.bed.Host(2)
	switch mode {
	case modeUnderlay:
		sess := &session{reachTimeout: 5 * time.Second}
		sess.set(pathHost, h1.Name, h1.NS, h1.Addr, h2.Name, h2.NS, h2.Addr)
		return sess, nil
	case modeVXLAN:
		x1, x2 := b.vx.Hosts[0], b.vx.Hosts[1]
		sess := &session{reachTimeout: 5 * time.Second}
		sess.set(pathHost, h1.Name, h1.NS, x1.DevAddr, h2.Name, h2.NS, x2.Container.Gateway.Addr())
		sess.set(pathContainer, x1.Container.Name, x1.Container.NS, x1.Container.Addr, x2.Container.Name, x2.Container.NS, x2.Container.Addr)
		return sess, nil
	case modeVXLANIPv6:
		return b.vxlanIPv6Session(), nil
	case modeTulleOffload, modeTulleWater, modeTulleDirect, modeTulleIPv6, modeTulleBaseline:
		driver, config := tulleMode(mode)
		if mode == modeTulleBaseline {
			restore := useTulled(b.cfg.BaselineBin)
			defer restore()
		}
		if err := b.bed.WriteNetworkConfig(ctx, b.runConfig(config)); err != nil {
			return nil, err
		}
		args := append([]string{"--tun-driver", driver}, b.cfg.TulledArgs...)
		sess := &session{reachTimeout: 15 * time.Second}
		err := b.bed.StartAll(ctx, args...)
		if err == nil && mode == modeTulleDirect {
			err = waitDirectRoutes(ctx, h1, h2)
		}
		for _, h := range []*testbed.Host{h1, h2} {
			if t := h.Tulled(); t != nil && !isExited(t) {
				sess.daemons = append(sess.daemons, t)
			}
		}
		if err != nil {
			return nil, errors.Join(fmt.Errorf("start tulled %s: %w", strings.Join(args, " "), err), b.stopDaemons(sess))
		}
		c1, c2 := h1.Container(), h2.Container()
		if c1 == nil || c2 == nil {
			return nil, errors.Join(errors.New("tulled started but the testbed set up no containers"), b.stopDaemons(sess))
		}
		if mode == modeTulleIPv6 {
			if !c1.Addr6.IsValid() || !c2.Addr6.IsValid() {
				return nil, errors.Join(errors.New("tulle-ipv6: the containers have no IPv6 address (no FLANNEL_IPV6_SUBNET?)"), b.stopDaemons(sess))
			}
			sess.set(pathHost, h1.Name, h1.NS, c1.Gateway6.Addr(), h2.Name, h2.NS, c2.Gateway6.Addr())
			sess.set(pathContainer, c1.Name, c1.NS, c1.Addr6, c2.Name, c2.NS, c2.Addr6)
			return sess, nil
		}
		sess.set(pathHost, h1.Name, h1.NS, c1.Gateway.Addr(), h2.Name, h2.NS, c2.Gateway.Addr())
		sess.set(pathContainer, c1.Name, c1.NS, c1.Addr, c2.Name, c2.NS, c2.Addr)
		return sess, nil
	}
	return nil, fmt.Errorf("unknown mode %q", mode)
}

func isExited(t *testbed.Tulled) bool {
	select {
	case <-t.Exited():
		return true
	default:
		return false
	}
}

// end records the daemons' peak RSS and stops them (a Tulle mode); a
// tulled that died during the measurement or does not stop cleanly is an
// error that carries its log tail.
func (b *bench) end(sess *session, s *Sample) error {
	var errs []error
	for _, t := range sess.daemons {
		if isExited(t) {
			errs = append(errs, fmt.Errorf("tulled on %s exited during the measurement (%s); log:\n%s", t.Host.Name, t.ExitDescription(), t.LogTail(20)))
			continue
		}
		d := daemonStat{Host: t.Host.Name, PID: t.Pid()}
		rss, err := processPeakRSS(t.Pid())
		if err != nil {
			errs = append(errs, err)
		}
		d.PeakRSSBytes = rss
		if cpu, err := processCPU(t.Pid()); err == nil {
			d.CPUSeconds = cpu.Seconds()
		}
		if err := b.saveMetrics(t, s, &d); err != nil {
			b.logf("%s: %v", s.Mode, err) // a diagnostic only: the figures stand
		}
		s.Daemons = append(s.Daemons, d)
	}
	errs = append(errs, b.stopDaemons(sess))
	return errors.Join(errs...)
}

// saveMetrics writes the tulled's /metrics into the results folder
// (metrics/<mode>-rep<N>-<host>.prom: batch sizes, per-peer counters) and
// records its non-zero drop counters.
func (b *bench) saveMetrics(t *testbed.Tulled, s *Sample, d *daemonStat) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	code, body, err := t.Get(ctx, "/metrics")
	if err != nil {
		return fmt.Errorf("scrape tulled on %s: %w", t.Host.Name, err)
	}
	if code != 200 {
		return fmt.Errorf("scrape tulled on %s: status %d", t.Host.Name, code)
	}
	dir := filepath.Join(b.cfg.Out, "metrics")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	name := fmt.Sprintf("%s-rep%d-%s.prom", s.Mode, s.Rep, t.Host.Name)
	if err := os.WriteFile(filepath.Join(dir, name), body, 0o644); err != nil {
		return err
	}
	d.Metrics = filepath.Join("metrics", name)
	m, err := testbed.ParseMetrics(body)
	if err != nil {
		return fmt.Errorf("tulled on %s: %w", t.Host.Name, err)
	}
	for _, smp := range m.Samples("tulle_dropped_packets_total") {
		if smp.Value > 0 {
			if d.Drops == nil {
				d.Drops = map[string]float64{}
			}
			d.Drops[smp.Labels["direction"]+"/"+smp.Labels["reason"]] += smp.Value
		}
	}
	return nil
}

// stopDaemons stops the session's tulleds (SIGTERM; they must exit 0).
func (b *bench) stopDaemons(sess *session) error {
	errs := make([]error, len(sess.daemons))
	var wg sync.WaitGroup
	for i, t := range sess.daemons {
		if isExited(t) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = t.Stop()
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// cleanup keeps the tulled logs in the results folder, then removes
// everything the run created: the testbed (which stops every process it
// started and deletes its namespaces, the VXLAN reference's included), then
// the built binaries.
func (b *bench) cleanup() error {
	var errs []error
	if b.bed != nil {
		for _, h := range b.bed.Hosts {
			if data, err := os.ReadFile(h.LogFile); err == nil && len(data) > 0 {
				_ = os.WriteFile(filepath.Join(b.cfg.Out, "tulled-"+h.Name+".log"), data, 0o644)
			}
		}
		if b.failed() || len(b.report.Errors) > 0 {
			b.mu.Lock()
			b.bed.DumpLogs(b.w, 15)
			b.mu.Unlock()
		}
		errs = append(errs, b.bed.Close())
	}
	errs = append(errs, testbed.Cleanup())
	return errors.Join(errs...)
}

// progressLine is the one-line account of a sample.
func progressLine(s Sample) string {
	var parts []string
	if s.Ping != nil {
		parts = append(parts, fmt.Sprintf("RTT %.0f us median, %.0f us mean (%d/%d)", s.Ping.MedianUs, s.Ping.MeanUs, s.Ping.Received, s.Ping.Sent))
	}
	for _, r := range s.TCP {
		if r.Error != "" {
			parts = append(parts, fmt.Sprintf("TCP x%d failed", r.Streams))
			continue
		}
		p := fmt.Sprintf("TCP x%d %.2f Gbit/s", r.Streams, r.Gbit)
		if r.CPUSecondsPerGB > 0 {
			p += fmt.Sprintf(" (%.2f CPU s/GB)", r.CPUSecondsPerGB)
		}
		parts = append(parts, p)
	}
	if s.PolicyRules > 0 {
		parts = append(parts, fmt.Sprintf("%d policy rules applied in %.0f ms", s.PolicyRules, s.PolicyApplySeconds*1e3))
	}
	for _, d := range s.Daemons {
		p := fmt.Sprintf("%s peak RSS %.1f MiB", d.Host, float64(d.PeakRSSBytes)/(1<<20))
		if len(d.Drops) > 0 {
			p += fmt.Sprintf(", drops %v", d.Drops)
		}
		parts = append(parts, p)
	}
	line := strings.Join(parts, "; ")
	if len(s.Errors) > 0 {
		line += fmt.Sprintf(" -- %d error(s): %s", len(s.Errors), firstLines(strings.Join(s.Errors, "\n"), 3))
	}
	return fmt.Sprintf("%s (%.1fs)", line, s.Elapsed.Seconds())
}
