package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"image/png"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	return readFile(t, filepath.Join("testdata", name))
}

func TestIperfReportGivesReceiverGoodputAndAllSentBytes(t *testing.T) {
	r, err := parseIperf(readTestdata(t, "iperf3-p1-omit.json"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Streams != 1 || r.Bytes != 3307339776 || math.Abs(r.BitsPerSecond-12751576654.13456) > 1 || r.Retransmits != 11 {
		t.Errorf("got %+v, want 1 stream, 3307339776 bytes received at 12.75 Gbit/s, 11 retransmits", r)
	}
	// The omitted first second counts for the CPU window: 1083965440 more.
	if want := int64(1083965440 + 1509949440 + 1791754240); r.AllBytes != want {
		t.Errorf("AllBytes = %d, want %d (every interval, the omitted one included)", r.AllBytes, want)
	}
	r, err = parseIperf(readTestdata(t, "iperf3-p2.json"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Streams != 2 || r.Bytes != 3065774080 || r.AllBytes < 3068395520 {
		t.Errorf("got %+v, want 2 streams, 3065774080 bytes received, at least 3068395520 sent", r)
	}
}

func TestIperfErrorReportIsAnError(t *testing.T) {
	_, err := parseIperf(readTestdata(t, "iperf3-refused.json"))
	if err == nil || !strings.Contains(err.Error(), "Connection refused") {
		t.Errorf("err = %v, want iperf3's own error text", err)
	}
	if _, err := parseIperf([]byte("iperf3: error - unable to start")); err == nil {
		t.Error("non-JSON output parsed without error")
	}
}

func TestPingOutputGivesMedianAndMeanInMicroseconds(t *testing.T) {
	r, err := parsePing(string(readTestdata(t, "ping.txt")))
	if err != nil {
		t.Fatal(err)
	}
	// Replies: 0.301 0.062 0.036 0.037 0.025 ms.
	if r.Sent != 5 || r.Received != 5 || math.Abs(r.MedianUs-37) > 1e-9 || math.Abs(r.MeanUs-92.2) > 1e-9 || r.MinUs != 25 || math.Abs(r.MaxUs-301) > 1e-9 {
		t.Errorf("got %+v, want 5/5, median 37, mean 92.2, min 25, max 301", r)
	}
}

func TestPingWithoutRepliesIsAnError(t *testing.T) {
	out := "PING 198.19.2.2 (198.19.2.2) 56(84) bytes of data.\n\n--- 198.19.2.2 ping statistics ---\n3 packets transmitted, 0 received, 100% packet loss, time 20ms\n"
	r, err := parsePing(out)
	if err == nil {
		t.Fatalf("got %+v, want an error", r)
	}
	if r.Sent != 3 || r.Received != 0 {
		t.Errorf("sent/received = %d/%d, want 3/0", r.Sent, r.Received)
	}
}

func TestProcStatCPUCountsUserAndSystemTime(t *testing.T) {
	// A command name with spaces and a parenthesis must not shift the fields.
	stat := "4242 (tull ed) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 100 123456 789 18446744073709551615"
	d, err := parseStatCPU(stat)
	if err != nil {
		t.Fatal(err)
	}
	if d != 3250*time.Millisecond {
		t.Errorf("cpu = %v, want 3.25s (325 ticks)", d)
	}
	if _, err := parseStatCPU("4242 (short) S 1"); err == nil {
		t.Error("truncated stat parsed without error")
	}
	self, err := processCPU(os.Getpid())
	if err != nil || self < 0 {
		t.Errorf("own cpu time = %v, %v", self, err)
	}
}

func TestProcStatusPeakRSS(t *testing.T) {
	status := "Name:\ttulled\nVmPeak:\t  800000 kB\nVmHWM:\t   23456 kB\nVmRSS:\t   20000 kB\n"
	v, err := statusKB(bufio.NewScanner(strings.NewReader(status)), "VmHWM")
	if err != nil || v != 23456 {
		t.Errorf("VmHWM = %d, %v; want 23456", v, err)
	}
	if _, err := statusKB(bufio.NewScanner(strings.NewReader("Name:\tx\n")), "VmHWM"); err == nil {
		t.Error("missing VmHWM gave no error")
	}
	rss, err := processPeakRSS(os.Getpid())
	if err != nil || rss <= 0 {
		t.Errorf("own peak RSS = %d, %v", rss, err)
	}
}

func TestSummarizeTakesMedianAndRangeIgnoringFailures(t *testing.T) {
	cases := []struct {
		in   []float64
		want Stat
	}{
		{nil, Stat{}},
		{[]float64{math.NaN()}, Stat{}},
		{[]float64{3}, Stat{N: 1, Median: 3, Min: 3, Max: 3}},
		{[]float64{5, 1, 3}, Stat{N: 3, Median: 3, Min: 1, Max: 5}},
		{[]float64{4, 1, math.NaN(), 2, 8}, Stat{N: 4, Median: 3, Min: 1, Max: 8}},
	}
	for _, c := range cases {
		if got := summarize(c.in); got != c.want {
			t.Errorf("summarize(%v) = %+v, want %+v", c.in, got, c.want)
		}
	}
}

// fakeSamples is a finished run of every mode on both paths (the underlay
// on the host path only), two repetitions; the host path moves 1 Gbit/s
// more and answers pings 20 us sooner.
func fakeSamples() []Sample {
	mk := func(mode, path string, rep int, g1, gN, rtt float64, cpu float64, rss int64) Sample {
		if path == pathHost {
			g1, gN, rtt = g1+1, gN+1, rtt-20
		}
		s := Sample{Mode: mode, Path: path, Rep: rep, Ping: &pingResult{Sent: 50, Received: 50, MedianUs: rtt, MeanUs: rtt + 3}}
		for _, r := range []struct {
			streams int
			g       float64
		}{{1, g1}, {4, gN}} {
			run := tcpRun{iperfResult: iperfResult{Streams: r.streams, BitsPerSecond: r.g * 1e9}, Gbit: r.g}
			run.PathCPUSecondsPerGB = 0.5 + cpu
			if cpu > 0 {
				run.DaemonCPUSeconds = []float64{cpu / 2, cpu / 2}
				run.CPUSecondsPerGB = cpu
			}
			s.TCP = append(s.TCP, run)
		}
		if rss > 0 {
			s.Daemons = []daemonStat{{Host: "h1", PeakRSSBytes: rss}, {Host: "h2", PeakRSSBytes: rss / 2}}
		}
		return s
	}
	out := []Sample{mk(modeUnderlay, pathHost, 1, 20, 40, 40, 0, 0), mk(modeUnderlay, pathHost, 2, 22, 42, 44, 0, 0)}
	for _, path := range []string{pathContainer, pathHost} {
		out = append(out,
			mk(modeVXLAN, path, 1, 14, 30, 90, 0, 0), mk(modeVXLAN, path, 2, 16, 34, 100, 0, 0),
			mk(modeTulleOffload, path, 1, 10, 16, 120, 1.5, 30<<20), mk(modeTulleOffload, path, 2, 12, 18, 130, 1.7, 34<<20),
			mk(modeTulleWater, path, 1, 2, 3, 200, 6, 20<<20),
			Sample{Mode: modeTulleWater, Path: path, Rep: 2, Errors: []string{"start tulled: boom"}},
			mk(modeVXLANIPv6, path, 1, 10, 20, 100, 0, 0),
			mk(modeTulleIPv6, path, 1, 8, 10, 130, 1.8, 30<<20),
			mk(modeTulleBaseline, path, 1, 9, 15, 160, 2.5, 30<<20),
		)
	}
	return out
}

var bothPaths = []string{pathContainer, pathHost}

func TestSummaryGivesTulleAsRatioOfKernelVXLANOnEachPath(t *testing.T) {
	modes := append(slices.Clone(allModes), modeTulleBaseline)
	cfg := Config{Modes: modes, Paths: bothPaths, Streams: 4}
	sum := summarizeModes(cfg, fakeSamples())
	// tulle-direct has no samples; the underlay none on the container path
	if want := 2*(len(modes)-1) - 1; len(sum) != want {
		t.Fatalf("%d summaries, want %d", len(sum), want)
	}
	if summaryOf(sum, modeUnderlay, pathContainer) != nil || summaryOf(sum, modeUnderlay, pathHost) == nil {
		t.Error("the underlay is summarized on the container path, or not on the host path")
	}
	off := summaryOf(sum, modeTulleOffload, pathContainer)
	if off == nil || off.TCP1Gbit.Median != 11 || off.TCPNGbit.Median != 17 || off.RTTMedianUs.Median != 125 {
		t.Fatalf("tulle-offload summary %+v", off)
	}
	if off.VsVXLAN == nil || math.Abs(off.VsVXLAN.TCP1-11.0/15) > 1e-9 || math.Abs(off.VsVXLAN.TCPN-17.0/32) > 1e-9 || off.VsVXLAN.RTTDiffUs != 30 {
		t.Errorf("ratios %+v, want TCP1 11/15, TCPN 17/32, RTT +30 us", off.VsVXLAN)
	}
	if off.CPUPerGB1.Median != 1.6 || off.PathCPUPerGB1.Median != 2.1 || off.PeakRSSMiB.Max != 34 {
		t.Errorf("CPU/GB %+v (all %+v), peak RSS %+v; want medians 1.6 and 2.1 s/GB and max 34 MiB (the larger tulled)", off.CPUPerGB1, off.PathCPUPerGB1, off.PeakRSSMiB)
	}
	if host := summaryOf(sum, modeTulleOffload, pathHost); host == nil || host.VsVXLAN == nil || math.Abs(host.VsVXLAN.TCP1-12.0/16) > 1e-9 {
		t.Errorf("host path ratios %+v, want TCP1 12/16 (against the host path's VXLAN)", host)
	}
	if vx := summaryOf(sum, modeVXLAN, pathContainer); vx.VsVXLAN != nil || vx.PathCPUPerGB1.Median != 0.5 {
		t.Errorf("vxlan: ratio to itself %+v, CPU all %+v", vx.VsVXLAN, vx.PathCPUPerGB1)
	}
	if w := summaryOf(sum, modeTulleWater, pathContainer); w.FailedSamples != 1 || w.TCP1Gbit.N != 1 {
		t.Errorf("water: %d failed, %d measured; want 1 and 1", w.FailedSamples, w.TCP1Gbit.N)
	}
	// The IPv6 modes: Tulle against the kernel VXLAN carrying IPv6.
	if m := summaryOf(sum, modeVXLANIPv6, pathContainer); m.VsVXLAN != nil || m.TCP1Gbit.Median != 10 {
		t.Errorf("vxlan-ipv6 summary %+v: a reference has no ratio", m)
	}
	if v6 := summaryOf(sum, modeTulleIPv6, pathContainer); v6.VsVXLAN == nil || v6.VsVXLAN.TCP1 != 0.8 || v6.VsVXLAN.TCPN != 0.5 || v6.VsVXLAN.RTTDiffUs != 30 {
		t.Errorf("tulle-ipv6 ratios %+v, want TCP1 8/10, TCPN 10/20, RTT +30 us (vs vxlan-ipv6)", v6.VsVXLAN)
	}
	v6met := map[string]bool{}
	for _, tg := range ipv6Targets(cfg, sum) {
		v6met[tg.Name] = tg.Met
	}
	if len(v6met) != 4 || !v6met["container: IPv6: TCP 1 stream >= 0.7x kernel VXLAN carrying IPv6"] || v6met["container: IPv6: TCP 4 streams >= 0.6x kernel VXLAN carrying IPv6"] {
		t.Errorf("IPv6 targets %v, want 1 stream met and 4 streams not met on each path", v6met)
	}

	targets := evaluateTargets(cfg, sum)
	met := map[string]bool{}
	for _, tg := range targets {
		met[tg.Name] = tg.Met
	}
	want := map[string]bool{
		"container: TCP 1 stream >= 0.7x kernel VXLAN":                         true,  // 11/15
		"container: TCP 4 streams >= 0.6x kernel VXLAN":                        false, // 17/32
		"container: ping RTT at most 2x kernel VXLAN's":                        true,
		"container: tulled CPU per GB, 1 stream, >= 30% below the baseline's":  true, // 1.6 vs 2.5
		"container: tulled CPU per GB, 4 streams, >= 30% below the baseline's": true,
		"host: TCP 1 stream >= 0.7x kernel VXLAN":                              true,
		"host: TCP 4 streams >= 0.6x kernel VXLAN":                             false,
		"host: ping RTT at most 2x kernel VXLAN's":                             true,
		"host: tulled CPU per GB, 1 stream, >= 30% below the baseline's":       true,
		"host: tulled CPU per GB, 4 streams, >= 30% below the baseline's":      true,
		"tulled peak RSS < 64 MiB":                                             true,
	}
	if len(met) != len(want) {
		t.Errorf("targets %+v, want %v", targets, want)
	}
	for k, v := range want {
		if got, ok := met[k]; !ok || got != v {
			t.Errorf("target %q: met=%v (present %v), want %v", k, got, ok, v)
		}
	}
}

func TestTableAndJSONAndChartAreWritten(t *testing.T) {
	cfg := Config{Modes: allModes, Streams: 4, Reps: 2, Duration: 5, Omit: 1, Pings: 50, PingInterval: 10 * time.Millisecond, Paths: bothPaths, Out: t.TempDir()}
	b := newBench(cfg, io.Discard)
	b.report.Samples = fakeSamples()
	b.report.Summary = summarizeModes(cfg, b.report.Samples)
	b.report.Targets = evaluateTargets(cfg, b.report.Summary)

	var buf bytes.Buffer
	printTable(&buf, cfg, b.report)
	table := buf.String()
	for _, want := range []string{"container to container:", "host namespace to host namespace:", "tulle-offload", "11.00 [10.00-12.00]", "0.73x", "+30 us",
		"2.10 [2.00-2.20] | 2.10 [2.00-2.20]", "1.60 [1.50-1.70]", "32.0 [30.0-34.0] | 16.0 [15.0-17.0]", "tulle-water (1 failed)", "start tulled: boom", "met"} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}

	if err := b.writeResults(); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(readFile(t, filepath.Join(cfg.Out, "results.json")), &back); err != nil {
		t.Fatalf("results.json: %v", err)
	}
	if len(back.Samples) != len(b.report.Samples) || len(back.Summary) != len(b.report.Summary) || summaryOf(back.Summary, modeTulleOffload, pathHost).VsVXLAN == nil {
		t.Errorf("results.json round trip lost data: %d samples, %d summaries", len(back.Samples), len(back.Summary))
	}
	img, err := png.Decode(bytes.NewReader(readFile(t, filepath.Join(cfg.Out, "chart.png"))))
	if err != nil {
		t.Fatalf("chart.png: %v", err)
	}
	if r := img.Bounds(); r.Dx() != 2000 || r.Dy() != 900 {
		t.Errorf("chart is %dx%d, want 2000x900 (a row per path)", r.Dx(), r.Dy())
	}

	// -render prints the same table from results.json and writes the chart again.
	if err := os.Remove(filepath.Join(cfg.Out, "chart.png")); err != nil {
		t.Fatal(err)
	}
	var again bytes.Buffer
	if err := render(cfg.Out, &again); err != nil {
		t.Fatalf("render: %v", err)
	}
	if got := strings.TrimSuffix(again.String(), "wrote "+filepath.Join(cfg.Out, "chart.png")+"\n"); got != table {
		t.Errorf("-render's table differs from the run's:\n%s\nwant:\n%s", got, table)
	}
	if _, err := png.Decode(bytes.NewReader(readFile(t, filepath.Join(cfg.Out, "chart.png")))); err != nil {
		t.Errorf("chart.png written by -render: %v", err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestSmokeFlagMakesOneShortRepetition(t *testing.T) {
	c, err := parseFlags([]string{"-smoke", "-reps", "7"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Reps != 1 || c.Duration != 1 || c.Omit != 0 || c.Pings != 10 || len(c.Modes) != len(allModes) || !strings.HasPrefix(c.Out, "results/") {
		t.Errorf("smoke config %+v", c)
	}
}

func TestBadFlagsAreRejectedWithTheRule(t *testing.T) {
	for _, args := range [][]string{
		{"-modes", "underlay,gre"},
		{"-reps", "0"},
		{"-streams", "1"},
		{"-path", "bridge"},
		{"-path", "host,bridge"},
		{"-modes", "vxlan," + modeTulleBaseline},
		{"-ping-interval", "1ms"},
		{"extra"},
	} {
		if _, err := parseFlags(args, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) accepted", args)
		}
	}
	c, err := parseFlags([]string{"-modes", " vxlan, underlay,vxlan", "-tulled-arg=--workers=1", "-tulled-arg", "--log-level=debug"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(c.Modes, ",") != "vxlan,underlay" || strings.Join(c.TulledArgs, " ") != "--workers=1 --log-level=debug" {
		t.Errorf("modes %q, tulled args %q", c.Modes, c.TulledArgs)
	}
	if strings.Join(c.Paths, ",") != "container,host" {
		t.Errorf("paths %q, want both by default", c.Paths)
	}
	c, err = parseFlags([]string{"-modes", "vxlan,tulle-offload", "-path", "host", "-baseline", "main"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(c.Paths, ",") != "host" || strings.Join(c.Modes, ",") != "vxlan,tulle-offload,"+modeTulleBaseline || c.Baseline != "main" {
		t.Errorf("-path host -baseline main: paths %q, modes %q, baseline %q", c.Paths, c.Modes, c.Baseline)
	}
}
