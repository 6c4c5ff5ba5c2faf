package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
	"github.com/tulle-net/tulle/tests/tools"
)

// Report is the content of results.json.
type Report struct {
	Benchmark string        `json:"benchmark"`
	Started   time.Time     `json:"started"`
	Finished  time.Time     `json:"finished"`
	Complete  bool          `json:"complete"` // every measurement of the plan succeeded
	Config    Config        `json:"config"`
	Env       Env           `json:"env"`
	Summary   []ModeSummary `json:"summary"`
	Targets   []Target      `json:"targets,omitempty"` // issue 4's targets (not in -smoke runs)
	Samples   []Sample      `json:"samples"`
	Errors    []string      `json:"errors,omitempty"` // what ended the run early
}

// Env describes the machine and the software measured.
type Env struct {
	Kernel   string `json:"kernel"`
	CPUs     int    `json:"cpus"`
	Go       string `json:"go"`
	Iperf3   string `json:"iperf3"`
	Revision string `json:"revision"` // git describe of the source tree
	Tulled   string `json:"tulled,omitempty"`
	Baseline string `json:"baseline_tulled,omitempty"` // the tulled of tulle-offload-baseline
}

// ModeSummary is one mode over all repetitions: medians and ranges.
type ModeSummary struct {
	Mode         string `json:"mode"`
	Path         string `json:"path"` // container or host
	TCP1Gbit     Stat   `json:"tcp_1_stream_gbit"`
	TCPNGbit     Stat   `json:"tcp_n_streams_gbit"`
	Streams      int    `json:"n_streams"`
	RTTMedianUs  Stat   `json:"rtt_median_us"` // of the per-repetition medians
	RTTMeanUs    Stat   `json:"rtt_mean_us"`
	Retransmits1 Stat   `json:"retransmits_1_stream"`
	RetransmitsN Stat   `json:"retransmits_n_streams"`
	CPUPerGB1    Stat   `json:"daemon_cpu_seconds_per_gb_1_stream"`
	CPUPerGBN    Stat   `json:"daemon_cpu_seconds_per_gb_n_streams"`
	// PathCPUPerGB1/N: the CPU all of the data path took (both iperf3
	// processes, ksoftirqd, the tulleds) per GB moved.
	PathCPUPerGB1   Stat       `json:"path_cpu_seconds_per_gb_1_stream"`
	PathCPUPerGBN   Stat       `json:"path_cpu_seconds_per_gb_n_streams"`
	PeakRSSMiB      Stat       `json:"peak_rss_mib"` // the larger of the two tulleds, per repetition
	PeakRSSMiBHost  []HostStat `json:"peak_rss_mib_by_host,omitempty"`
	VsVXLAN         *Ratios    `json:"vs_vxlan,omitempty"`
	FailedSamples   int        `json:"failed_samples"`
	MeasuredSamples int        `json:"measured_samples"`
}

// HostStat is a figure of one host's tulled.
type HostStat struct {
	Host string `json:"host"`
	Stat
}

// Ratios compare a mode's medians with kernel VXLAN's (0 = not measured).
type Ratios struct {
	TCP1      float64 `json:"tcp_1_stream"`
	TCPN      float64 `json:"tcp_n_streams"`
	RTT       float64 `json:"rtt_median"`
	RTTDiffUs float64 `json:"rtt_median_diff_us"`
}

// Target is one of issue 4's targets, judged on the medians of this run.
type Target struct {
	Name string `json:"name"`
	Got  string `json:"got"`
	Met  bool   `json:"met"`
}

// summarizeModes reduces the samples to one summary per path and mode, in
// cfg.Paths and cfg.Modes order (a mode without samples on a path, as the
// underlay on the container path, has none), with ratios to the kernel
// VXLAN of the same path when it was measured.
func summarizeModes(cfg Config, samples []Sample) []ModeSummary {
	var out []ModeSummary
	for _, path := range cfg.Paths {
		first := len(out)
		for _, mode := range cfg.Modes {
			if m, ok := summarizeMode(cfg, mode, path, samples); ok {
				out = append(out, m)
			}
		}
		ratios(out[first:])
	}
	return out
}

// summarizeMode is summarizeModes for one mode on one path; false if the
// mode has no sample there.
func summarizeMode(cfg Config, mode, path string, samples []Sample) (ModeSummary, bool) {
	var tcp1, tcpN, rttMed, rttMean, re1, reN, cpu1, cpuN, all1, allN, rss []float64
	var hosts []string
	rssByHost := map[string][]float64{}
	m := ModeSummary{Mode: mode, Path: path, Streams: cfg.Streams}
	seen := false
	for _, s := range samples {
		if s.Mode != mode || (s.Path != path && s.Path != "") {
			continue
		}
		seen = true
		if len(s.Errors) > 0 {
			m.FailedSamples++
		}
		if s.Ping != nil || len(s.TCP) > 0 {
			m.MeasuredSamples++
		}
		if s.Ping != nil {
			rttMed = append(rttMed, s.Ping.MedianUs)
			rttMean = append(rttMean, s.Ping.MeanUs)
		}
		for _, r := range s.TCP {
			if r.Error != "" {
				continue
			}
			one := r.Streams == 1
			if one {
				tcp1, re1 = append(tcp1, r.Gbit), append(re1, float64(r.Retransmits))
			} else {
				tcpN, reN = append(tcpN, r.Gbit), append(reN, float64(r.Retransmits))
			}
			if r.CPUSecondsPerGB > 0 {
				if one {
					cpu1 = append(cpu1, r.CPUSecondsPerGB)
				} else {
					cpuN = append(cpuN, r.CPUSecondsPerGB)
				}
			}
			if r.PathCPUSecondsPerGB > 0 {
				if one {
					all1 = append(all1, r.PathCPUSecondsPerGB)
				} else {
					allN = append(allN, r.PathCPUSecondsPerGB)
				}
			}
		}
		var peak int64
		for _, d := range s.Daemons {
			peak = max(peak, d.PeakRSSBytes)
			if _, ok := rssByHost[d.Host]; !ok {
				hosts = append(hosts, d.Host)
			}
			rssByHost[d.Host] = append(rssByHost[d.Host], float64(d.PeakRSSBytes)/(1<<20))
		}
		if peak > 0 {
			rss = append(rss, float64(peak)/(1<<20))
		}
	}
	m.TCP1Gbit, m.TCPNGbit = summarize(tcp1), summarize(tcpN)
	m.RTTMedianUs, m.RTTMeanUs = summarize(rttMed), summarize(rttMean)
	m.Retransmits1, m.RetransmitsN = summarize(re1), summarize(reN)
	m.CPUPerGB1, m.CPUPerGBN = summarize(cpu1), summarize(cpuN)
	m.PathCPUPerGB1, m.PathCPUPerGBN = summarize(all1), summarize(allN)
	m.PeakRSSMiB = summarize(rss)
	for _, h := range hosts {
		m.PeakRSSMiBHost = append(m.PeakRSSMiBHost, HostStat{Host: h, Stat: summarize(rssByHost[h])})
	}
	return m, seen
}

// ratios sets VsVXLAN of the summaries of one path: each mode against its
// reference mode (referenceMode) on that path.
func ratios(sum []ModeSummary) {
	for i := range sum {
		var vx *ModeSummary
		for j := range sum {
			if ref := referenceMode(sum[i].Mode); ref != "" && sum[j].Mode == ref {
				vx = &sum[j]
			}
		}
		if vx == nil {
			continue
		}
		r := &Ratios{
			TCP1: finite(ratio(sum[i].TCP1Gbit, vx.TCP1Gbit)),
			TCPN: finite(ratio(sum[i].TCPNGbit, vx.TCPNGbit)),
			RTT:  finite(ratio(sum[i].RTTMedianUs, vx.RTTMedianUs)),
		}
		if sum[i].RTTMedianUs.Valid() && vx.RTTMedianUs.Valid() {
			r.RTTDiffUs = sum[i].RTTMedianUs.Median - vx.RTTMedianUs.Median
		}
		sum[i].VsVXLAN = r
	}
}

// summaryOf finds the summary of mode on path (nil if none).
func summaryOf(sum []ModeSummary, mode, path string) *ModeSummary {
	for i := range sum {
		if sum[i].Mode == mode && sum[i].Path == path {
			return &sum[i]
		}
	}
	return nil
}

// finite maps NaN and infinities (not representable in JSON) to 0.
func finite(x float64) float64 {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return 0
	}
	return x
}

// evaluateTargets judges issue 11's goals for the userspace path
// (tulle-offload) against kernel VXLAN on each path, and, when the run has
// a baseline (-baseline), its CPU per GB against the baseline's; nothing
// for a path that lacks either mode.
func evaluateTargets(cfg Config, sum []ModeSummary) []Target {
	var out []Target
	rss := false
	for _, path := range cfg.Paths {
		t, vx := summaryOf(sum, modeTulleOffload, path), summaryOf(sum, modeVXLAN, path)
		if t == nil {
			continue
		}
		if vx != nil && t.VsVXLAN != nil {
			if t.TCP1Gbit.Valid() && vx.TCP1Gbit.Valid() {
				out = append(out, Target{path + ": TCP 1 stream >= 0.7x kernel VXLAN", fmt.Sprintf("%.2fx", t.VsVXLAN.TCP1), t.VsVXLAN.TCP1 >= 0.7})
			}
			if t.TCPNGbit.Valid() && vx.TCPNGbit.Valid() {
				out = append(out, Target{fmt.Sprintf("%s: TCP %d streams >= 0.6x kernel VXLAN", path, t.Streams), fmt.Sprintf("%.2fx", t.VsVXLAN.TCPN), t.VsVXLAN.TCPN >= 0.6})
			}
			if t.RTTMedianUs.Valid() && vx.RTTMedianUs.Valid() {
				out = append(out, Target{path + ": ping RTT at most 2x kernel VXLAN's", fmt.Sprintf("%.2fx (%+.0f us)", t.VsVXLAN.RTT, t.VsVXLAN.RTTDiffUs), t.VsVXLAN.RTT <= 2})
			}
		}
		if base := summaryOf(sum, modeTulleBaseline, path); base != nil {
			for _, c := range []struct {
				what     string
				now, was Stat
			}{{"1 stream", t.CPUPerGB1, base.CPUPerGB1}, {fmt.Sprintf("%d streams", t.Streams), t.CPUPerGBN, base.CPUPerGBN}} {
				if c.now.Valid() && c.was.Valid() && c.was.Median > 0 {
					cut := 1 - c.now.Median/c.was.Median
					out = append(out, Target{fmt.Sprintf("%s: tulled CPU per GB, %s, >= 30%% below the baseline's", path, c.what),
						fmt.Sprintf("%.2f vs %.2f s/GB: %+.0f%%", c.now.Median, c.was.Median, -100*cut), cut >= 0.3})
				}
			}
		}
		if t.PeakRSSMiB.Valid() && !rss {
			rss = true
			out = append(out, Target{"tulled peak RSS < 64 MiB", fmt.Sprintf("%.1f MiB (max %.1f)", t.PeakRSSMiB.Median, t.PeakRSSMiB.Max), t.PeakRSSMiB.Max < 64})
		}
	}
	return out
}

// fmtStat formats a Stat as "median [min-max]" ("-" when not measured).
func fmtStat(s Stat, prec int) string {
	if !s.Valid() {
		return "-"
	}
	if s.N == 1 || s.Min == s.Max {
		return fmt.Sprintf("%.*f", prec, s.Median)
	}
	return fmt.Sprintf("%.*f [%.*f-%.*f]", prec, s.Median, prec, s.Min, prec, s.Max)
}

func fmtRatio(r float64) string {
	if r == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", r)
}

// pathTitle names a path in the table's heading.
func pathTitle(path string) string {
	if path == pathHost {
		return "host namespace to host namespace"
	}
	return "container to container"
}

// printTable writes the summary tables (one per path), the targets and the
// errors.
func printTable(w io.Writer, cfg Config, rep Report) {
	fmt.Fprintf(w, "\nTulle throughput benchmark, %s: %d repetition(s), iperf3 TCP %d s (+%d s ramp-up), %d pings %v apart\n",
		rep.Started.Format("2006-01-02 15:04"), cfg.Reps, cfg.Duration, cfg.Omit, cfg.Pings, cfg.PingInterval)
	fmt.Fprintf(w, "kernel %s, %d CPUs, %s; medians [min-max] over repetitions; \"vs vxlan\" = ratio of the kernel VXLAN median (vxlan-ipv6 for the IPv6 modes);\n"+
		"CPU s/GB: CPU seconds per GB moved, of everything on the path (both iperf3, ksoftirqd, tulleds) and of the tulleds alone\n",
		rep.Env.Kernel, rep.Env.CPUs, rep.Env.Iperf3)
	n := cfg.Streams
	for _, path := range cfg.Paths {
		fmt.Fprintf(w, "\n%s:\n", pathTitle(path))
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "mode\tTCP 1 stream Gbit/s\tvs vxlan\tTCP %d streams Gbit/s\tvs vxlan\tRTT median us\tvs vxlan\tCPU s/GB, all (1 | %d streams)\ttulled CPU s/GB (1 | %d streams)\ttulled peak RSS MiB (h1 | h2)\n", n, n, n)
		for _, m := range rep.Summary {
			if m.Path != path {
				continue
			}
			r1, rN, rRTT := "", "", ""
			if m.VsVXLAN != nil {
				r1, rN = fmtRatio(m.VsVXLAN.TCP1), fmtRatio(m.VsVXLAN.TCPN)
				if m.RTTMedianUs.Valid() && m.VsVXLAN.RTT != 0 {
					rRTT = fmt.Sprintf("%+.0f us (%.2fx)", m.VsVXLAN.RTTDiffUs, m.VsVXLAN.RTT)
				} else {
					rRTT = "-"
				}
			}
			pair := func(a, b Stat) string {
				if !a.Valid() && !b.Valid() {
					return "-"
				}
				return fmtStat(a, 2) + " | " + fmtStat(b, 2)
			}
			rss := "-"
			if len(m.PeakRSSMiBHost) > 0 {
				var cells []string
				for _, h := range m.PeakRSSMiBHost {
					cells = append(cells, fmtStat(h.Stat, 1))
				}
				rss = strings.Join(cells, " | ")
			}
			mode := m.Mode
			if m.FailedSamples > 0 {
				mode += fmt.Sprintf(" (%d failed)", m.FailedSamples)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", mode,
				fmtStat(m.TCP1Gbit, 2), r1, fmtStat(m.TCPNGbit, 2), rN,
				fmtStat(m.RTTMedianUs, 0), rRTT, pair(m.PathCPUPerGB1, m.PathCPUPerGBN), pair(m.CPUPerGB1, m.CPUPerGBN), rss)
		}
		tw.Flush()
	}
	if len(rep.Targets) > 0 {
		fmt.Fprintf(w, "\ntargets (issue 11: tulle-offload vs kernel VXLAN and its baseline, tulle-direct vs underlay; medians of this run):\n")
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, t := range rep.Targets {
			verdict := "met"
			if !t.Met {
				verdict = "NOT MET"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", t.Name, t.Got, verdict)
		}
		tw.Flush()
	}
	var failures []string
	for _, s := range rep.Samples {
		for _, e := range s.Errors {
			failures = append(failures, fmt.Sprintf("  %s %s rep %d: %s", s.Mode, s.Path, s.Rep, firstLines(e, 3)))
		}
	}
	for _, e := range rep.Errors {
		failures = append(failures, "  run: "+firstLines(e, 3))
	}
	if len(failures) > 0 {
		fmt.Fprintf(w, "\nerrors:\n%s\n", strings.Join(failures, "\n"))
	}
	fmt.Fprintln(w)
}

// writeResults writes results.json and chart.png into the results folder.
func (b *bench) writeResults() error {
	if err := os.MkdirAll(b.cfg.Out, 0o755); err != nil {
		return fmt.Errorf("results folder: %w", err)
	}
	data, err := json.MarshalIndent(b.report, "", "  ")
	if err != nil {
		return fmt.Errorf("results.json: %w", err)
	}
	jsonPath := filepath.Join(b.cfg.Out, "results.json")
	if err := os.WriteFile(jsonPath, append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("results.json: %w", err)
	}
	written := []string{jsonPath}
	if len(b.report.Summary) > 0 {
		chartPath := filepath.Join(b.cfg.Out, "chart.png")
		if err := writeChart(chartPath, b.cfg, b.report); err != nil {
			return err
		}
		written = append(written, chartPath)
	}
	b.logf("wrote %s", strings.Join(written, ", "))
	return nil
}

// collectEnv describes the machine and the source tree (best effort).
func collectEnv(ctx context.Context) Env {
	e := Env{CPUs: runtime.NumCPU(), Go: runtime.Version(), Iperf3: iperfVersion()}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		e.Kernel = strings.TrimSpace(string(data))
	}
	if root, err := testbed.RepoRoot(); err == nil {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if out, err := tools.Command(ctx, "git", "-C", root, "describe", "--always", "--dirty", "--tags").Output(); err == nil {
			e.Revision = strings.TrimSpace(string(out))
		}
	}
	return e
}

// tulledVersion returns the first line of `tulled --version` (best effort).
func tulledVersion(ctx context.Context, bin string) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := tools.Command(ctx, bin, "--version").CombinedOutput()
	if err != nil {
		return "unknown (" + firstLines(err.Error()+": "+string(out), 1) + ")"
	}
	return firstLines(string(out), 1)
}
