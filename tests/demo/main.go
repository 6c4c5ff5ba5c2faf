// Command demo shows Tulle working on one machine, in a few seconds: as root,
// `go run ./tests/demo` (or `make demo`) starts a real etcd and three hosts
// in network namespaces, each running the real tulled with a "container"
// behind a bridge, as Docker would set it up from subnet.env, in a
// dual-stack network (each host leases an IPv4 and an IPv6 subnet). It
// shows each host's leases, pings over IPv4 and IPv6 and transfers data
// over both from container to container across hosts, prints the per-peer
// counters from /metrics and the measured throughput, and removes
// everything again, also on Ctrl-C or a failure.
//
// Flags: -hosts N (2..9), -tun-driver offload|water, -ipv6=false (an
// IPv4-only network, as flannel's udp backend), -hold (keep the network up
// until Ctrl-C, to look around with `ip netns exec`).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
	"github.com/tulle-net/tulle/tests/tools"
)

const (
	transferSize = 64 << 20
	iperfSeconds = 5
)

func main() {
	hosts := flag.Int("hosts", 3, "number of hosts (2..9)")
	driver := flag.String("tun-driver", "offload", "tulled's --tun-driver: offload or water")
	hold := flag.Bool("hold", false, "keep everything running until Ctrl-C (to look around)")
	ipv6 := flag.Bool("ipv6", true, "a dual-stack network: IPv6 containers too (false: IPv4 only)")
	flag.Parse()
	if *hosts < 2 || *hosts > 9 {
		fmt.Fprintln(os.Stderr, "demo: -hosts must be 2..9")
		os.Exit(2)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: needs root (it creates network namespaces and TUN devices): sudo make demo")
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	d := &demo{out: os.Stdout, hosts: *hosts, driver: *driver, hold: *hold, ipv6: *ipv6, steps: 7}
	err := d.run(ctx)
	code := 0
	switch {
	case err != nil && ctx.Err() != nil:
		fmt.Fprintln(d.out, "\ninterrupted")
		code = 130
	case err != nil:
		fmt.Fprintf(d.out, "\ndemo failed: %v\n", err)
		if d.bed != nil {
			fmt.Fprintln(d.out, "\nlast log lines:")
			d.bed.DumpLogs(d.out, 25)
		}
		code = 1
	}
	d.cleanup()
	if code == 0 {
		fmt.Fprintln(d.out, "\nTulle carried container traffic between hosts. Next: README.md (configuration, metrics, migrating from flannel).")
	}
	os.Exit(code)
}

type demo struct {
	out    io.Writer
	hosts  int
	driver string
	hold   bool
	ipv6   bool
	steps  int
	step   int
	bed    *testbed.Bed
}

// begin prints "[n/N] what ... " and returns a function that ends the line.
func (d *demo) begin(what string) func(err error) {
	d.step++
	fmt.Fprintf(d.out, "[%d/%d] %s ... ", d.step, d.steps, what)
	start := time.Now()
	return func(err error) {
		if err != nil {
			fmt.Fprintln(d.out, "FAILED")
			return
		}
		fmt.Fprintf(d.out, "ok (%v)\n", time.Since(start).Round(10*time.Millisecond))
	}
}

func (d *demo) detail(format string, a ...any) {
	for _, line := range strings.Split(strings.TrimRight(fmt.Sprintf(format, a...), "\n"), "\n") {
		fmt.Fprintf(d.out, "      %s\n", line)
	}
}

func (d *demo) run(ctx context.Context) (err error) {
	done := d.begin("building tulled and the test etcd server")
	tulled, err := testbed.BuildTulled(ctx)
	if err == nil {
		_, err = testbed.BuildEtcdServer(ctx)
	}
	done(err)
	if err != nil {
		return err
	}
	d.detail("%s", tulled)

	done = d.begin(fmt.Sprintf("starting etcd and %d hosts in network namespaces", d.hosts))
	d.bed, err = testbed.New(ctx, testbed.Options{Hosts: d.hosts})
	done(err)
	if err != nil {
		return err
	}
	b := d.bed
	d.detail("switch: namespace %s (a bridge)\netcd:   namespace %s, %s\nhosts:  namespaces %s-h1 .. %s-h%d, underlay 192.0.2.1 .. 192.0.2.%d",
		b.SwitchNS, b.Etcd.NS, testbed.EtcdEndpoint, b.Prefix, b.Prefix, d.hosts, d.hosts)

	config := testbed.DefaultNetworkConfig
	if d.ipv6 {
		config = testbed.DualStackNetworkConfig
	}
	done = d.begin("writing the network config to etcd")
	err = b.WriteNetworkConfig(ctx, config)
	done(err)
	if err != nil {
		return err
	}
	d.detail("%s/config = %s", testbed.DefaultEtcdPrefix, config)

	done = d.begin(fmt.Sprintf("starting tulled (--tun-driver %s) on each host, then a container behind a bridge", d.driver))
	err = b.StartAll(ctx, "--tun-driver", d.driver)
	done(err)
	if err != nil {
		return err
	}
	if err := d.showLeases(); err != nil {
		return err
	}

	if err := d.ping(ctx); err != nil {
		return err
	}
	if err := d.transfer(ctx); err != nil {
		return err
	}
	if err := d.counters(ctx); err != nil {
		return err
	}
	if d.hold {
		d.detail("\nholding; look around, e.g.:\n  ip netns exec %s ip addr show tulle0\n  ip netns exec %s ping %s\nCtrl-C ends the demo and removes everything.",
			b.Host(1).NS, b.Host(1).Container().NS, b.Host(2).Container().Addr)
		<-ctx.Done()
		return ctx.Err()
	}
	return nil
}

func (d *demo) showLeases() error {
	tw := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "      host\tunderlay\tleases (subnet.env)\tMTU\tcontainer")
	for _, h := range d.bed.Hosts {
		env, err := h.SubnetEnv()
		if err != nil {
			return err
		}
		c := h.Container()
		fmt.Fprintf(tw, "      %s\t%s\t%s\t%d\t%s\n", h.Name, h.Addr, env.Lease(), env.MTU, c.Addr)
		if env.IPv6Subnet.IsValid() {
			fmt.Fprintf(tw, "      \t\t%s\t\t%s\n", env.IPv6Lease(), c.Addr6)
		}
	}
	return tw.Flush()
}

// pairs returns (from, to) host index pairs around the ring: 1->2, 2->3, ..., n->1.
func (d *demo) pairs() [][2]int {
	var p [][2]int
	for i := 1; i <= d.hosts; i++ {
		p = append(p, [2]int{i, i%d.hosts + 1})
	}
	return p
}

func (d *demo) ping(ctx context.Context) error {
	what := "ping from container to container across hosts"
	if d.ipv6 {
		what += ", IPv4 and IPv6"
	}
	done := d.begin(what)
	var lines []string
	for _, p := range d.pairs() {
		from, to := d.bed.Host(p[0]).Container(), d.bed.Host(p[1]).Container()
		dsts := []netip.Addr{to.Addr}
		if d.ipv6 {
			dsts = append(dsts, to.Addr6)
		}
		for _, dst := range dsts {
			src := from.Addr
			if dst.Is6() {
				src = from.Addr6
			}
			if _, err := from.WaitReachable(ctx, dst, 10*time.Second); err != nil {
				done(err)
				return err
			}
			r, err := from.Ping(ctx, dst, 3)
			if err != nil {
				done(err)
				return err
			}
			lines = append(lines, fmt.Sprintf("%s %s -> %s %s: %d/%d replies, average %v",
				from.Name, src, to.Name, dst, r.Received, r.Sent, r.AvgRTT.Round(time.Microsecond)))
		}
	}
	done(nil)
	d.detail("%s", strings.Join(lines, "\n"))
	return nil
}

func (d *demo) transfer(ctx context.Context) error {
	c1, c2 := d.bed.Host(1).Container(), d.bed.Host(2).Container()
	done := d.begin(fmt.Sprintf("sending %d MiB over TCP from %s to %s (SHA-256 checked)", transferSize>>20, c1.Name, c2.Name))
	tctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	tr, err := testbed.TransferTCP(tctx, &c1.Node, &c2.Node, transferSize)
	cancel()
	done(err)
	if err != nil {
		return err
	}
	d.detail("%d bytes in %v: %s, checksum %x... matches", tr.Bytes, tr.Elapsed.Round(time.Millisecond), testbed.FormatBits(tr.BitsPerSecond()), tr.SHA256[:6])
	if d.ipv6 {
		fmt.Fprintf(d.out, "      the same over IPv6, %s -> %s ... ", c1.Addr6, c2.Addr6)
		tctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		tr, err := testbed.TransferTCPTo(tctx, &c1.Node, &c2.Node, c2.Addr6, transferSize)
		cancel()
		if err != nil {
			fmt.Fprintln(d.out, "FAILED")
			return err
		}
		fmt.Fprintf(d.out, "%d bytes in %v: %s, checksum %x... matches\n", tr.Bytes, tr.Elapsed.Round(time.Millisecond), testbed.FormatBits(tr.BitsPerSecond()), tr.SHA256[:6])
	}
	if _, err := tools.LookPath("iperf3"); err != nil {
		d.detail("(iperf3 is not installed: no %d s iperf3 run; apt-get install iperf3)", iperfSeconds)
		return nil
	}
	// The third host, if any, so that another pair of hosts carries traffic.
	dst := d.bed.Host(d.hosts).Container()
	fmt.Fprintf(d.out, "      iperf3 for %d s, %s -> %s ... ", iperfSeconds, c1.Name, dst.Name)
	r, err := testbed.IPerf3(ctx, &c1.Node, &dst.Node, iperfSeconds, 1)
	if err != nil {
		fmt.Fprintln(d.out, "FAILED")
		return err
	}
	fmt.Fprintf(d.out, "%s (%d retransmits)\n", testbed.FormatBits(r.BitsPerSecond), r.Retransmits)
	return nil
}

func (d *demo) counters(ctx context.Context) error {
	done := d.begin("per-peer counters from each host's /metrics")
	type row struct {
		host, peer, subnet string
		txp, txb, rxp, rxb float64
	}
	var rows []row
	var dropLines []string
	for _, h := range d.bed.Hosts {
		m, err := h.Scrape(ctx)
		if err != nil {
			done(err)
			return err
		}
		peers := map[string]*row{}
		for _, name := range []string{"tulle_peer_transmit_packets_total", "tulle_peer_transmit_bytes_total", "tulle_peer_receive_packets_total", "tulle_peer_receive_bytes_total"} {
			for _, s := range m.Samples(name) {
				r := peers[s.Labels["peer"]]
				if r == nil {
					r = &row{host: h.Name, peer: s.Labels["peer"], subnet: s.Labels["subnet"]}
					peers[s.Labels["peer"]] = r
				}
				switch name {
				case "tulle_peer_transmit_packets_total":
					r.txp += s.Value
				case "tulle_peer_transmit_bytes_total":
					r.txb += s.Value
				case "tulle_peer_receive_packets_total":
					r.rxp += s.Value
				case "tulle_peer_receive_bytes_total":
					r.rxb += s.Value
				}
			}
		}
		keys := make([]string, 0, len(peers))
		for k := range peers {
			keys = append(keys, k)
		}
		sort.Slice(keys, func(i, j int) bool {
			a, _ := netip.ParseAddr(keys[i])
			b, _ := netip.ParseAddr(keys[j])
			return a.Less(b)
		})
		for _, k := range keys {
			rows = append(rows, *peers[k])
		}
		for _, s := range m.Samples("tulle_dropped_packets_total") {
			if s.Value > 0 {
				family := ""
				if f := s.Labels["family"]; f != "" {
					family = " " + f
				}
				dropLines = append(dropLines, fmt.Sprintf("%s: %s%s %s: %.0f", h.Name, s.Labels["direction"], family, s.Labels["reason"], s.Value))
			}
		}
		if len(peers) == 0 {
			dropLines = append(dropLines, fmt.Sprintf("%s: no per-peer series in /metrics (tulle_peers = %.0f)", h.Name, m.Value("tulle_peers")))
		}
	}
	done(nil)
	tw := tabwriter.NewWriter(d.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "      host\tpeer\tsubnet\ttx packets\ttx bytes\trx packets\trx bytes\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "      %s\t%s\t%s\t%.0f\t%s\t%.0f\t%s\t\n", r.host, r.peer, r.subnet, r.txp, humanBytes(r.txb), r.rxp, humanBytes(r.rxb))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(dropLines) == 0 {
		d.detail("dropped packets: none")
	} else {
		d.detail("dropped packets:\n  %s", strings.Join(dropLines, "\n  "))
	}
	return nil
}

func humanBytes(b float64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", b/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", b/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", b/(1<<10))
	default:
		return fmt.Sprintf("%.0f B", b)
	}
}

func (d *demo) cleanup() {
	fmt.Fprint(d.out, "[cleanup] stopping tulled and etcd, deleting the namespaces ... ")
	var err error
	if d.bed != nil {
		err = d.bed.Close()
	}
	err = errors.Join(err, testbed.Cleanup())
	if err != nil {
		fmt.Fprintf(d.out, "FAILED: %v\n", err)
		return
	}
	fmt.Fprintln(d.out, "ok")
}
