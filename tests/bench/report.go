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
}

// ModeSummary is one mode over all repetitions: medians and ranges.
type ModeSummary struct {
	Mode            string     `json:"mode"`
	TCP1Gbit        Stat       `json:"tcp_1_stream_gbit"`
	TCPNGbit        Stat       `json:"tcp_n_streams_gbit"`
	Streams         int        `json:"n_streams"`
	RTTMedianUs     Stat       `json:"rtt_median_us"` // of the per-repetition medians
	RTTMeanUs       Stat       `json:"rtt_mean_us"`
	Retransmits1    Stat       `json:"retransmits_1_stream"`
	RetransmitsN    Stat       `json:"retransmits_n_streams"`
	CPUPerGB1       Stat       `json:"daemon_cpu_seconds_per_gb_1_stream"`
	CPUPerGBN       Stat       `json:"daemon_cpu_seconds_per_gb_n_streams"`
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

// summarizeModes reduces the samples to one summary per mode, in cfg.Modes
// order, with ratios to kernel VXLAN when it was measured.
func summarizeModes(cfg Config, samples []Sample) []ModeSummary {
	var out []ModeSummary
	for _, mode := range cfg.Modes {
		var tcp1, tcpN, rttMed, rttMean, re1, reN, cpu1, cpuN, rss []float64
		var hosts []string
		rssByHost := map[string][]float64{}
		m := ModeSummary{Mode: mode, Streams: cfg.Streams}
		for _, s := range samples {
			if s.Mode != mode {
				continue
			}
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
				if r.Streams == 1 {
					tcp1, re1 = append(tcp1, r.Gbit), append(re1, float64(r.Retransmits))
					if r.CPUSecondsPerGB > 0 {
						cpu1 = append(cpu1, r.CPUSecondsPerGB)
					}
				} else {
					tcpN, reN = append(tcpN, r.Gbit), append(reN, float64(r.Retransmits))
					if r.CPUSecondsPerGB > 0 {
						cpuN = append(cpuN, r.CPUSecondsPerGB)
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
		m.PeakRSSMiB = summarize(rss)
		for _, h := range hosts {
			m.PeakRSSMiBHost = append(m.PeakRSSMiBHost, HostStat{Host: h, Stat: summarize(rssByHost[h])})
		}
		out = append(out, m)
	}
	for i := range out {
		var vx *ModeSummary
		for j := range out {
			if ref := referenceMode(out[i].Mode); ref != "" && out[j].Mode == ref {
				vx = &out[j]
			}
		}
		if vx != nil {
			r := &Ratios{
				TCP1: finite(ratio(out[i].TCP1Gbit, vx.TCP1Gbit)),
				TCPN: finite(ratio(out[i].TCPNGbit, vx.TCPNGbit)),
				RTT:  finite(ratio(out[i].RTTMedianUs, vx.RTTMedianUs)),
			}
			if out[i].RTTMedianUs.Valid() && vx.RTTMedianUs.Valid() {
				r.RTTDiffUs = out[i].RTTMedianUs.Median - vx.RTTMedianUs.Median
			}
			out[i].VsVXLAN = r
		}
	}
	return out
}

// finite maps NaN and infinities (not representable in JSON) to 0.
func finite(x float64) float64 {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return 0
	}
	return x
}

// evaluateTargets judges issue 4's targets for the default driver
// (tulle-offload) against kernel VXLAN; nothing if either is missing.
func evaluateTargets(sum []ModeSummary) []Target {
	var t, vx *ModeSummary
	for i := range sum {
		switch sum[i].Mode {
		case modeTulleOffload:
			t = &sum[i]
		case modeVXLAN:
			vx = &sum[i]
		}
	}
	if t == nil || vx == nil || t.VsVXLAN == nil {
		return nil
	}
	var out []Target
	if t.TCP1Gbit.Valid() && vx.TCP1Gbit.Valid() {
		out = append(out, Target{"TCP 1 stream >= 0.7x kernel VXLAN", fmt.Sprintf("%.2fx", t.VsVXLAN.TCP1), t.VsVXLAN.TCP1 >= 0.7})
	}
	if t.TCPNGbit.Valid() && vx.TCPNGbit.Valid() {
		out = append(out, Target{fmt.Sprintf("TCP %d streams >= 0.5x kernel VXLAN", t.Streams), fmt.Sprintf("%.2fx", t.VsVXLAN.TCPN), t.VsVXLAN.TCPN >= 0.5})
	}
	if t.TCPNGbit.Valid() && t.TCP1Gbit.Valid() {
		out = append(out, Target{fmt.Sprintf("TCP %d streams >= Tulle's own 1 stream", t.Streams),
			fmt.Sprintf("%.2f vs %.2f Gbit/s", t.TCPNGbit.Median, t.TCP1Gbit.Median), t.TCPNGbit.Median >= t.TCP1Gbit.Median})
	}
	if t.RTTMedianUs.Valid() && vx.RTTMedianUs.Valid() {
		out = append(out, Target{"ping RTT within 50 us of kernel VXLAN", fmt.Sprintf("%+.0f us", t.VsVXLAN.RTTDiffUs), t.VsVXLAN.RTTDiffUs <= 50})
	}
	if t.PeakRSSMiB.Valid() {
		out = append(out, Target{"tulled peak RSS < 64 MiB", fmt.Sprintf("%.1f MiB (max %.1f)", t.PeakRSSMiB.Median, t.PeakRSSMiB.Max), t.PeakRSSMiB.Max < 64})
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

// printTable writes the summary table, the targets and the errors.
func printTable(w io.Writer, cfg Config, rep Report) {
	path := "container to container"
	if cfg.Path == pathHost {
		path = "host namespace to host namespace"
	}
	fmt.Fprintf(w, "\nTulle throughput benchmark, %s: %d repetition(s), iperf3 TCP %d s (+%d s ramp-up), %d pings %v apart, %s\n",
		rep.Started.Format("2006-01-02 15:04"), cfg.Reps, cfg.Duration, cfg.Omit, cfg.Pings, cfg.PingInterval, path)
	fmt.Fprintf(w, "kernel %s, %d CPUs, %s; medians [min-max] over repetitions; \"vs vxlan\" = ratio of the kernel VXLAN median (vxlan-ipv6 for the IPv6 modes)\n\n",
		rep.Env.Kernel, rep.Env.CPUs, rep.Env.Iperf3)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	n := cfg.Streams
	fmt.Fprintf(tw, "mode\tTCP 1 stream Gbit/s\tvs vxlan\tTCP %d streams Gbit/s\tvs vxlan\tRTT median us\tvs vxlan\ttulled CPU s/GB (1 | %d streams)\ttulled peak RSS MiB (h1 | h2)\n", n, n)
	for _, m := range rep.Summary {
		r1, rN, rRTT := "", "", ""
		if m.VsVXLAN != nil {
			r1, rN = fmtRatio(m.VsVXLAN.TCP1), fmtRatio(m.VsVXLAN.TCPN)
			if m.RTTMedianUs.Valid() && m.VsVXLAN.RTT != 0 {
				rRTT = fmt.Sprintf("%+.0f us (%.2fx)", m.VsVXLAN.RTTDiffUs, m.VsVXLAN.RTT)
			} else {
				rRTT = "-"
			}
		}
		cpu := "-"
		if m.CPUPerGB1.Valid() || m.CPUPerGBN.Valid() {
			cpu = fmtStat(m.CPUPerGB1, 2) + " | " + fmtStat(m.CPUPerGBN, 2)
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
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", mode,
			fmtStat(m.TCP1Gbit, 2), r1, fmtStat(m.TCPNGbit, 2), rN,
			fmtStat(m.RTTMedianUs, 0), rRTT, cpu, rss)
	}
	tw.Flush()
	if len(rep.Targets) > 0 {
		fmt.Fprintf(w, "\ntargets (issue 4: tulle-offload vs kernel VXLAN; issue 11: tulle-direct vs underlay; medians of this run):\n")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
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
			failures = append(failures, fmt.Sprintf("  %s rep %d: %s", s.Mode, s.Rep, firstLines(e, 3)))
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
