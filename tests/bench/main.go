// Command bench is Tulle's throughput benchmark (`make bench`; CI runs
// `go run ./tests/bench -smoke`).
//
// In one run, on a two-host testbed (package tests/testbed: a switch, a real
// etcd, hosts 192.0.2.1 and 192.0.2.2), it measures one after another:
//
//   - underlay: host1 -> host2 over the bare underlay veths (192.0.2.x);
//
//   - vxlan: the kernel's VXLAN between the same two hosts, set up as
//     flannel's vxlan backend does (VNI 1, dstport 8472, nolearning, static
//     neigh and fdb entries, MTU underlay-50) on the overlay 198.19.0.0/16;
//
//   - tulle-offload and tulle-water: tulled on both hosts with
//     --tun-driver offload or water (overlay 198.18.0.0/16);
//
//   - tulle-direct: tulled (offload) with DirectRouting in the network
//     config: the kernel routes container traffic directly (direct.go);
//
//   - vxlan-ipv6 and tulle-ipv6: the same VXLAN devices and tulled
//     (offload) carrying inner IPv6, container to container (ipv6.go),
//     each IPv6 mode compared with the other.
//
//   - tulle-offload-baseline: tulle-offload with another tulled (-baseline:
//     a binary or a git revision), for before and after in one run.
//
// Each mode's session measures two paths one after the other (-path):
// container to container, the path real workloads take (a namespace behind
// a veth on a bridge in each host, as Docker or CNI build it from
// subnet.env; the testbed's containers for Tulle, an identical pair built
// here, MTU 1450, for VXLAN), and host namespace to host namespace (the
// overlay device addresses), which leaves out the veth and bridge hops.
// The underlay mode has only the second.
//
// For every mode, path and repetition: ping RTT (warm-up, then -pings echo
// requests -ping-interval apart: median and mean), iperf3 TCP with 1 stream
// and with -streams streams (-duration seconds each after -omit seconds of
// ramp-up). It reads from /proc the CPU time used during each iperf3 run
// by everything that moves the data (both iperf3 processes, the kernel's
// softirq threads, the tulleds: CPU seconds per GB moved, every mode) and
// by the tulleds alone, and each tulled's peak RSS (VmHWM). The modes
// alternate (the order rotates every repetition), each tulled run lasts one
// mode repetition.
//
// It prints progress, then a table of medians with min-max over the
// repetitions, Tulle as a ratio of kernel VXLAN, and writes results.json and
// chart.png into -out (default ./results/<timestamp>/). Everything it
// creates (namespaces, links, tulled, etcd and iperf3 processes) is removed
// on exit, on Ctrl-C and on failure. It needs root, iperf3 and ping.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/tests/tools"
)

// Mode names, in the default measuring order.
const (
	modeUnderlay     = "underlay"
	modeVXLAN        = "vxlan"
	modeTulleOffload = "tulle-offload"
	modeTulleWater   = "tulle-water"
)

var allModes = []string{modeUnderlay, modeVXLAN, modeTulleOffload, modeTulleWater, modeTulleDirect, modeVXLANIPv6, modeTulleIPv6}

// Traffic paths (-path).
const (
	pathContainer = "container"
	pathHost      = "host"
)

// Config is the benchmark's configuration, from the flags; it is recorded in
// results.json.
type Config struct {
	Smoke        bool          `json:"smoke"`
	Reps         int           `json:"reps"`
	Duration     int           `json:"duration_seconds"` // iperf3 -t
	Omit         int           `json:"omit_seconds"`     // iperf3 -O
	Streams      int           `json:"streams"`          // iperf3 -P of the multi-stream test
	Pings        int           `json:"pings"`
	PingInterval time.Duration `json:"ping_interval_ns"`
	Modes        []string      `json:"modes"`
	Paths        []string      `json:"paths"` // container, host: each mode session measures each
	// Baseline is the tulled the tulle-offload-baseline mode runs: a
	// binary, or a git revision built for the run (-baseline).
	Baseline    string        `json:"baseline,omitempty"`
	BaselineBin string        `json:"-"`
	Out         string        `json:"out"`
	TulledArgs  []string      `json:"tulled_args,omitempty"`
	Settle      time.Duration `json:"settle_ns"` // pause before each measurement
	Timeout     time.Duration `json:"timeout_ns"`
	Verbose     bool          `json:"-"`
	Render      string        `json:"-"` // a results folder to print and chart again
}

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, " ") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// parseFlags reads the command line into a Config; -smoke overrides the
// load flags with a single short repetition.
func parseFlags(args []string, stderr io.Writer) (Config, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c Config
	var modes, paths string
	var tulledArgs stringList
	fs.BoolVar(&c.Smoke, "smoke", false, "one short repetition (1 s per iperf3 run, 10 pings) for CI; no thresholds")
	fs.IntVar(&c.Reps, "reps", 3, "repetitions of every mode (modes alternate)")
	fs.IntVar(&c.Duration, "duration", 5, "seconds measured per iperf3 run (iperf3 -t)")
	fs.IntVar(&c.Omit, "omit", 1, "seconds of TCP ramp-up left out before each measurement (iperf3 -O)")
	fs.IntVar(&c.Streams, "streams", 4, "TCP streams of the multi-stream test (iperf3 -P)")
	fs.IntVar(&c.Pings, "pings", 50, "echo requests per RTT measurement")
	fs.DurationVar(&c.PingInterval, "ping-interval", 10*time.Millisecond, "interval between echo requests (>= 2ms)")
	fs.StringVar(&modes, "modes", strings.Join(allModes, ","), "comma-separated modes to measure: "+strings.Join(append(allModes, policyModes...), ", ")+
		" (the policy modes are judged against tulle-offload)")
	fs.StringVar(&paths, "path", pathContainer+","+pathHost, "overlay traffic paths, measured one after the other in each mode's session: container (container to container, as workloads), host (host namespace to host namespace), or both")
	fs.StringVar(&c.Baseline, "baseline", "", "a tulled binary, or a git revision of this repository to build one from, measured as mode "+modeTulleBaseline+" (offload driver) beside the others: before and after in one run")
	fs.StringVar(&c.Out, "out", "", "results folder (default ./results/<timestamp>)")
	fs.Var(&tulledArgs, "tulled-arg", "extra argument for tulled, repeatable (e.g. -tulled-arg=--workers=1)")
	fs.DurationVar(&c.Settle, "settle", time.Second, "pause before each measurement, so the previous one's traffic has drained")
	fs.DurationVar(&c.Timeout, "timeout", 40*time.Minute, "upper bound of the whole run")
	fs.BoolVar(&c.Verbose, "v", false, "also print the testbed's progress")
	fs.StringVar(&c.Render, "render", "", "a results folder of an earlier run: print its table and write its chart.png again from its results.json; measures nothing")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: go run ./tests/bench [flags]   (as root)\n\n"+
			"Measures the underlay, kernel VXLAN and Tulle (offload and water TUN drivers)\n"+
			"on a two-host namespace testbed with iperf3 and ping.\n\nflags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q (flags only)", fs.Args())
	}
	c.TulledArgs = tulledArgs
	if c.Smoke {
		c.Reps, c.Duration, c.Omit, c.Pings = 1, 1, 0, 10
		c.Settle = 200 * time.Millisecond
	}
	seen := map[string]bool{}
	for _, m := range strings.Split(modes, ",") {
		m = strings.TrimSpace(m)
		if m == "" || seen[m] {
			continue
		}
		if !contains(allModes, m) && !contains(policyModes, m) && m != modeTulleBaseline {
			return c, fmt.Errorf("-modes: unknown mode %q (want some of %s)", m, strings.Join(append(allModes, policyModes...), ","))
		}
		seen[m] = true
		c.Modes = append(c.Modes, m)
	}
	for _, p := range strings.Split(paths, ",") {
		p = strings.TrimSpace(p)
		if p != pathContainer && p != pathHost {
			return c, fmt.Errorf("-path %q: want %s, %s or both (comma-separated)", paths, pathContainer, pathHost)
		}
		if !contains(c.Paths, p) {
			c.Paths = append(c.Paths, p)
		}
	}
	if c.Baseline != "" && !contains(c.Modes, modeTulleBaseline) {
		c.Modes = append(c.Modes, modeTulleBaseline)
	}
	if c.Baseline == "" && contains(c.Modes, modeTulleBaseline) {
		return c, fmt.Errorf("-modes: %s needs -baseline", modeTulleBaseline)
	}
	switch {
	case len(c.Modes) == 0:
		return c, errors.New("-modes: no mode given")
	case c.Reps < 1 || c.Reps > 50:
		return c, fmt.Errorf("-reps %d: want 1..50", c.Reps)
	case c.Duration < 1 || c.Duration > 60:
		return c, fmt.Errorf("-duration %d: want 1..60 seconds", c.Duration)
	case c.Omit < 0 || c.Omit > 10:
		return c, fmt.Errorf("-omit %d: want 0..10 seconds", c.Omit)
	case c.Streams < 2 || c.Streams > 16:
		return c, fmt.Errorf("-streams %d: want 2..16", c.Streams)
	case c.Pings < 1 || c.Pings > 1000:
		return c, fmt.Errorf("-pings %d: want 1..1000", c.Pings)
	case c.PingInterval < 2*time.Millisecond || c.PingInterval > time.Second:
		return c, fmt.Errorf("-ping-interval %v: want 2ms..1s", c.PingInterval)
	case c.Settle < 0 || c.Settle > time.Minute:
		return c, fmt.Errorf("-settle %v: want 0..1m", c.Settle)
	case c.Timeout < time.Minute:
		return c, fmt.Errorf("-timeout %v: want at least 1m", c.Timeout)
	}
	if c.Out == "" {
		c.Out = filepath.Join("results", time.Now().Format("20060102-150405"))
	}
	return c, nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func main() {
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(2)
	}
	if cfg.Render != "" {
		if err := render(cfg.Render, os.Stdout); err != nil {
			fmt.Fprintf(os.Stderr, "bench: -render: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(run(cfg))
}

// render prints the table of the run saved in dir and writes its chart again.
func render(dir string, w io.Writer) error {
	data, err := os.ReadFile(filepath.Join(dir, "results.json"))
	if err != nil {
		return err
	}
	var rep Report
	if err := json.Unmarshal(data, &rep); err != nil {
		return fmt.Errorf("%s: %w", filepath.Join(dir, "results.json"), err)
	}
	printTable(w, rep.Config, rep)
	chart := filepath.Join(dir, "chart.png")
	if err := writeChart(chart, rep.Config, rep); err != nil {
		return err
	}
	fmt.Fprintf(w, "wrote %s\n", chart)
	return nil
}

// run performs the benchmark and returns the exit status: 0 when every
// measurement succeeded, 1 when one failed or the run was interrupted.
func run(cfg Config) int {
	if err := checkPrerequisites(); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Timeout)
	defer cancel()
	stopSignals := cancelOnSignal(cancel)
	defer stopSignals()

	b := newBench(cfg, os.Stdout)
	err := b.run(ctx)
	if err != nil {
		b.logf("error: %v", err)
	}
	cleanupErr := b.cleanup()
	if cleanupErr != nil {
		b.logf("cleanup: %v", cleanupErr)
	}
	if err != nil || cleanupErr != nil || b.failed() {
		if ctx.Err() != nil && !errors.Is(err, context.DeadlineExceeded) {
			b.logf("interrupted")
		}
		return 1
	}
	return 0
}

// cancelOnSignal calls cancel on the first SIGINT or SIGTERM and then
// restores the default action, so a second Ctrl-C ends the process at once
// (a later run removes what it leaves). The returned function stops the
// watcher and waits for it.
func cancelOnSignal(cancel context.CancelFunc) func() {
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		select {
		case s := <-sigc:
			fmt.Fprintf(os.Stderr, "\nbench: %v: stopping and cleaning up (again to quit at once, leaving namespaces for the next run to remove)\n", s)
			signal.Stop(sigc)
			cancel()
		case <-done:
			signal.Stop(sigc)
		}
	}()
	return func() {
		close(done)
		<-finished
	}
}

// checkPrerequisites fails early, with the remedy, when the run can not work.
func checkPrerequisites() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, veth, VXLAN and TUN devices): sudo go run ./tests/bench")
	}
	for _, tool := range []string{"ip", "bridge", "ss", "iperf3", "ping"} {
		if _, err := tools.LookPath(tool); err != nil {
			return fmt.Errorf("needs the %s program (or run make deps): %w", tool, err)
		}
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return fmt.Errorf("needs /dev/net/tun: %w", err)
	}
	return nil
}
