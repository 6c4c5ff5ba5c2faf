// Command scale measures tulled with many leases (`make scale`; a smaller
// run is the test TestRouteTableEqualsEtcdAfterChurnAndBurst in `make test`).
//
// For each number of leases (-leases, default 1,000, 10,000 and 30,000) it
// builds a one-host testbed (package tests/testbed: a real etcd in its own
// namespace, the real tulled binary in the host's), writes that many fake
// hosts' leases into etcd (-network, default 198.18.0.0/15 in /30s, as
// flanneld writes them: one etcd lease for all, since only their keys
// matter here), and then measures, one after another:
//
//   - start-up: from launching tulled to its "ready" log line and to its
//     route table holding every lease; its CPU time and RSS then, and the
//     bytes etcd sent the host (the initial list);
//   - idle: tulled's CPU over -idle-for with nothing changing;
//   - churn: -churn-rate lease changes per second for -churn-for (45 %
//     new leases, 45 % deletions, 10 % a lease moved to another PublicIP),
//     each its own etcd request as from many hosts; tulled's CPU as a share
//     of one core, the latency from each write to tulled's log line of it,
//     and etcd's traffic to the host (the watch) per second and per change;
//   - burst: -burst leases (at most half) attached to one etcd lease that is
//     revoked, so that they go in one revision, as a rack's leases expire
//     together; the time until tulled's route table is without them;
//   - tulled's peak RSS (VmHWM) over all of that, before any scrape;
//   - one full /metrics scrape (four series per peer): its time, size, CPU
//     and the RSS after it;
//   - correctness: the route table, as tulled's per-peer series name it,
//     equals the leases in etcd, and the changes tulled's log says it
//     applied equal the changes made (nothing missed, nothing twice).
//
// tulled's state is read from its JSON log (--log-format=json), not by
// polling /metrics, whose scrape at 30,000 peers is itself a load.
//
// The fake hosts' PublicIPs are never sent anything (no traffic runs): one
// per lease from 198.18.0.0/15 outside the overlay network when that has
// room (e.g. -network 198.18.0.0/16), else the documentation underlay
// addresses, shared between leases (flannel and Tulle allow that).
//
// It prints progress and a table, and writes results.json into -out
// (default ./results/scale-<timestamp>/). Everything it creates is removed
// on exit, on Ctrl-C and on failure. It needs root and ip (iproute2).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	cfg, out, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "scale:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	logf := func(format string, args ...any) {
		fmt.Printf("%s  %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
	}
	results, err := runAll(ctx, cfg, logf)
	printTable(os.Stdout, cfg, results)
	if werr := writeResults(out, cfg, results); werr != nil {
		fmt.Fprintln(os.Stderr, "scale:", werr)
	} else {
		fmt.Println("results:", filepath.Join(out, "results.json"))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "scale:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (Config, string, error) {
	fs := flag.NewFlagSet("scale", flag.ContinueOnError)
	leases := fs.String("leases", "1000,10000,30000", "comma-separated `numbers` of leases, one run each")
	network := fs.String("network", "198.18.0.0/15", "overlay `network` (inside 198.18.0.0/15)")
	subnetLen := fs.Int("subnet-len", 30, "lease `length`")
	idle := fs.Duration("idle-for", 5*time.Second, "how `long` to measure tulled idle before the churn")
	rate := fs.Int("churn-rate", 100, "lease changes per `second` during the churn")
	churnFor := fs.Duration("churn-for", 30*time.Second, "how `long` the churn lasts")
	burst := fs.Int("burst", 5000, "leases deleted at once after the churn (at most half the leases)")
	out := fs.String("out", filepath.Join("results", "scale-"+time.Now().UTC().Format("20060102-150405")), "results `directory`")
	profile := fs.Bool("profile", false, "run tulled with --debug-pprof; save its CPU profile of the churn and its heap profile after the burst into -out")
	var tulledArgs multiFlag
	fs.Var(&tulledArgs, "tulled-arg", "extra tulled `flag` (repeatable)")
	if err := fs.Parse(args); err != nil {
		return Config{}, "", err
	}
	cfg := Config{SubnetLen: *subnetLen, IdleFor: *idle, ChurnRate: *rate, ChurnFor: *churnFor, Burst: *burst, TulledArgs: tulledArgs}
	if *profile {
		cfg.ProfileDir = *out
	}
	for _, s := range strings.Split(*leases, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return cfg, "", fmt.Errorf("-leases %q: want positive numbers", *leases)
		}
		cfg.Leases = append(cfg.Leases, n)
	}
	nw, err := netip.ParsePrefix(*network)
	bench := netip.MustParsePrefix("198.18.0.0/15")
	if err != nil || !nw.Addr().Is4() || nw.Bits() < bench.Bits() || !bench.Contains(nw.Addr()) {
		return cfg, "", fmt.Errorf("-network %q: want an IPv4 prefix inside %v", *network, bench)
	}
	cfg.Network = nw.Masked()
	if cfg.SubnetLen < cfg.Network.Bits()+2 || cfg.SubnetLen > 30 {
		return cfg, "", fmt.Errorf("-subnet-len %d: want %d..30", cfg.SubnetLen, cfg.Network.Bits()+2)
	}
	if cfg.ChurnRate < 1 || cfg.ChurnRate > 1000 || cfg.ChurnFor < 0 || cfg.ChurnFor > 10*time.Minute || cfg.Burst < 0 {
		return cfg, "", fmt.Errorf("want -churn-rate 1..1000, -churn-for up to 10m, -burst >= 0")
	}
	return cfg, *out, nil
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, " ") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// runAll runs every number of leases in turn, each on a fresh bed.
func runAll(ctx context.Context, cfg Config, logf func(string, ...any)) ([]Result, error) {
	var results []Result
	for _, n := range cfg.Leases {
		logf("=== %d leases in %v, /%d", n, cfg.Network, cfg.SubnetLen)
		res, err := run(ctx, cfg, n, logf)
		results = append(results, res)
		if err != nil {
			return results, fmt.Errorf("%d leases: %w", n, err)
		}
	}
	return results, nil
}

func printTable(w io.Writer, cfg Config, results []Result) {
	fmt.Fprintf(w, "\n%v in /%d; churn %d changes/s for %v; burst of up to %d deletions\n\n", cfg.Network, cfg.SubnetLen, cfg.ChurnRate, cfg.ChurnFor, cfg.Burst)
	fmt.Fprintln(w, "| leases | ready s | all routes s | start CPU s | start RSS MiB | idle CPU % | churn CPU % of a core | change latency p50 / p99 ms | etcd->host B/s (B/change) | burst deletions applied s | peak RSS MiB | scrape s (MiB) | RSS after scrape MiB | table = etcd, applied = made |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range results {
		fmt.Fprintf(w, "| %d | %.2f | %.2f | %.2f | %.1f | %.1f | %.1f | %.1f / %.1f | %.0f (%.0f) | %.3f (%d) | %.1f | %.2f (%.1f) | %.1f | %v |\n",
			r.Leases, r.ReadySeconds, r.AllRoutesSeconds, r.StartCPUSeconds, mib(r.StartRSS.RSS), r.IdleCPUPercent,
			r.Churn.CPUPercent, r.Churn.LatencyP50Ms, r.Churn.LatencyP99Ms, r.Churn.RxPerSecond, r.Churn.RxPerChange,
			r.Burst.Seconds, r.Burst.Deletions, mib(r.PeakRSS.PeakRSS), r.Scrape.Seconds, float64(r.Scrape.Bytes)/(1<<20),
			mib(r.Scrape.RSSAfter.RSS), r.TableEqualsEtcd && r.AppliedEqualsMade)
	}
}

func writeResults(dir string, cfg Config, results []Result) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("results: %w", err)
	}
	data, err := json.MarshalIndent(struct {
		Config  Config    `json:"config"`
		Time    time.Time `json:"time"`
		Results []Result  `json:"results"`
	}{cfg, time.Now().UTC(), results}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "results.json"), data, 0o644)
}
