package testbed

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/tools"
)

func netnsList(t *testing.T) map[string]bool {
	t.Helper()
	out, err := tools.Command(context.Background(), "ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	set := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			set[f[0]] = true
		}
	}
	return set
}

func TestBedConnectsHostsSurvivesEtcdRestartAndLeavesNothingBehind(t *testing.T) {
	RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	before := netnsList(t)

	b, err := New(ctx, Options{Hosts: 3, HostMTU: map[int]int{3: 1400}, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			b.Close()
		}
	}()
	for _, name := range []string{b.SwitchNS, b.Etcd.NS, b.Host(1).NS, b.Host(3).NS} {
		if !netnsList(t)[name] {
			t.Errorf("namespace %s missing", name)
		}
	}

	// The underlay: every host reaches every other host and etcd.
	for _, from := range b.Hosts {
		for _, to := range b.Hosts {
			if from != to {
				if _, err := from.Ping(ctx, to.Addr, 1); err != nil {
					t.Error(err)
				}
			}
		}
		if _, err := from.Ping(ctx, EtcdAddr, 1); err != nil {
			t.Error(err)
		}
	}
	if out, err := b.Host(3).Exec(ctx, "ip", "-o", "link", "show", b.Host(3).Link); err != nil || !strings.Contains(out, "mtu 1400") {
		t.Errorf("host 3 link: want mtu 1400: %v %s", err, out)
	}
	if out, err := b.Host(1).Exec(ctx, "cat", "/proc/sys/net/ipv4/ip_forward"); err != nil || strings.TrimSpace(out) != "1" {
		t.Errorf("host 1 ip_forward = %q, %v; want 1", out, err)
	}

	// etcd keeps its data across a restart, and the client reconnects.
	if err := b.WriteNetworkConfig(ctx, DefaultNetworkConfig); err != nil {
		t.Fatal(err)
	}
	if _, err := b.PutFlannelLease(ctx, netip.MustParsePrefix("198.18.7.0/24"), netip.MustParseAddr("192.0.2.7"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := b.StopEtcd(); err != nil {
		t.Fatal(err)
	}
	if code, _, err := HTTPGet(ctx, b.Etcd.NS, EtcdEndpoint+"/health"); err == nil {
		t.Fatalf("etcd answers (%d) after StopEtcd", code)
	}
	if err := b.StartEtcd(ctx); err != nil {
		t.Fatal(err)
	}
	c, err := b.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get(ctx, DefaultEtcdPrefix+"/config")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != DefaultNetworkConfig {
		t.Fatalf("config after restart: %v %v", resp, err)
	}
	leases, err := b.Leases(ctx)
	if err != nil || leases["198.18.7.0-24"] != "192.0.2.7" {
		t.Fatalf("leases after restart = %v, %v; want 198.18.7.0-24 -> 192.0.2.7", leases, err)
	}
	resp, err = c.Get(ctx, FlannelLeaseKey(netip.MustParsePrefix("198.18.7.0/24")))
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != `{"PublicIP":"192.0.2.7","PublicIPv6":null}` || resp.Kvs[0].Lease == 0 {
		t.Fatalf("flannel lease value: %v %v", resp, err)
	}

	dir := b.Dir
	closed = true
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	after := netnsList(t)
	for name := range after {
		if strings.HasPrefix(name, b.Prefix) {
			t.Errorf("namespace %s left behind", name)
		}
		if !before[name] && strings.HasPrefix(name, "tl") {
			t.Logf("note: namespace %s appeared meanwhile (another run?)", name)
		}
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("bed directory %s left behind (%v)", dir, err)
	}
}

func TestContainerFollowsSubnetEnvAndCarriesTCP(t *testing.T) {
	b := NewT(t, Options{Hosts: 2, NoEtcd: true})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := b.Host(1)
	env := "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.5.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
	if err := os.WriteFile(h.SubnetFile, []byte(env), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := h.SetupContainer(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr != netip.MustParseAddr("198.18.5.2") || c.Gateway != netip.MustParsePrefix("198.18.5.1/24") || c.MTU != 1472 {
		t.Fatalf("container = %+v", c)
	}
	if _, err := c.Ping(ctx, c.Gateway.Addr(), 2); err != nil {
		t.Fatal(err)
	}
	// Through the host's forwarding to the underlay address of the host.
	if _, err := TransferTCP(ctx, &c.Node, &h.Node, 1<<20); err != nil {
		t.Fatal(err)
	}
	// Host to host over the underlay.
	tr, err := TransferTCP(ctx, &b.Host(2).Node, &h.Node, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("underlay TCP 8 MiB in %v (%s)", tr.Elapsed, FormatBits(tr.BitsPerSecond()))

	// Same subnet: kept. A new subnet: replaced.
	if c2, err := h.SetupContainer(ctx); err != nil || c2 != c {
		t.Fatalf("SetupContainer again = %p, %v; want the same container %p", c2, err, c)
	}
	env = strings.ReplaceAll(env, "198.18.5.1", "198.18.6.1")
	if err := os.WriteFile(h.SubnetFile, []byte(env), 0o644); err != nil {
		t.Fatal(err)
	}
	c3, err := h.SetupContainer(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if c3.Addr != netip.MustParseAddr("198.18.6.2") {
		t.Fatalf("replaced container address %s, want 198.18.6.2", c3.Addr)
	}
	if _, err := c3.Ping(ctx, c3.Gateway.Addr(), 1); err != nil {
		t.Fatal(err)
	}
}

func TestReadSubnetEnvParsesFlannelFormat(t *testing.T) {
	p := filepath.Join(t.TempDir(), "subnet.env")
	if err := os.WriteFile(p, []byte("FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.79.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e, err := ReadSubnetEnv(p)
	if err != nil {
		t.Fatal(err)
	}
	if e.Network.String() != "198.18.0.0/16" || e.Subnet.String() != "198.18.79.1/24" || e.Lease().String() != "198.18.79.0/24" || e.MTU != 1472 || !e.IPMasq {
		t.Fatalf("got %+v", e)
	}
	if err := os.WriteFile(p, []byte("FLANNEL_NETWORK=198.18.0.0/16\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSubnetEnv(p); err == nil || !strings.Contains(err.Error(), "FLANNEL_SUBNET") {
		t.Fatalf("incomplete file: err = %v, want one naming FLANNEL_SUBNET", err)
	}
}

func TestParseMetricsSumsMatchingSeries(t *testing.T) {
	text := `# TYPE tulle_dropped_packets_total counter
tulle_dropped_packets_total{direction="receive",reason="unknown_sender"} 3
tulle_dropped_packets_total{direction="receive",reason="spoofed_source"} 2
tulle_dropped_packets_total{direction="transmit",reason="no_route"} 1
# TYPE tulle_peers gauge
tulle_peers 2
# TYPE tulle_udp_receive_batch_size histogram
tulle_udp_receive_batch_size_bucket{le="1"} 4
tulle_udp_receive_batch_size_bucket{le="+Inf"} 5
tulle_udp_receive_batch_size_sum 9
tulle_udp_receive_batch_size_count 5
`
	m, err := ParseMetrics([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"tulle_dropped_packets_total", nil, 6},
		{"tulle_dropped_packets_total", []string{"direction", "receive"}, 5},
		{"tulle_dropped_packets_total", []string{"reason", "spoofed_source"}, 2},
		{"tulle_peers", nil, 2},
		{"tulle_udp_receive_batch_size", nil, 5},
		{"absent", nil, 0},
	} {
		if got := m.Value(c.name, c.labels...); got != c.want {
			t.Errorf("Value(%s, %v) = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if s := m.Samples("tulle_dropped_packets_total"); len(s) != 3 || s[0].Labels["reason"] != "spoofed_source" {
		t.Errorf("Samples sorted by labels = %+v", s)
	}
}

func TestMetricsAddrOfTakesTheLastFlag(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--metrics-addr", "192.0.2.1:9285"}, "192.0.2.1:9285"},
		{[]string{"--metrics-addr", "a:1", "-metrics-addr=b:2"}, "b:2"},
		{[]string{"--metrics-addr="}, ""},
		{[]string{"--iface", "x"}, ""},
	} {
		if got := metricsAddrOf(c.args); got != c.want {
			t.Errorf("metricsAddrOf(%q) = %q, want %q", c.args, got, c.want)
		}
	}
}

func TestPrefixesFitLinkNames(t *testing.T) {
	for i := 0; i < 30; i++ {
		p := newPrefix()
		if len(p+"sn49") > 15 || !staleName.MatchString(p+"-h1") {
			t.Fatalf("prefix %q: too long for a link name or not matched by the stale sweep", p)
		}
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	_ = Cleanup()
	os.Exit(code)
}

func TestBuiltTulledNamesItsRevision(t *testing.T) {
	if os.Getenv(EnvTulledBin) != "" {
		t.Skipf("%s names a prebuilt tulled", EnvTulledBin)
	}
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	rev := gitRevision(context.Background(), root)
	if rev == "" {
		t.Fatal("git cannot tell the revision of the checkout")
	}
	bin, err := BuildTulled(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out, err := tools.Command(context.Background(), bin, "--version").Output()
	if err != nil || !strings.Contains(string(out), "(revision "+rev+",") {
		t.Errorf("tulled --version: %q (%v), want revision %s", out, err, rev)
	}
}

// TestWaitReachableCountsOnlyAnswersWithinTheTimeout: ping's own deadline
// is whole seconds, so an answer 0.8 s into a 0.4 s wait must still fail.
func TestWaitReachableCountsOnlyAnswersWithinTheTimeout(t *testing.T) {
	b := NewT(t, Options{Hosts: 2, NoEtcd: true})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h1, h2 := b.Host(1), b.Host(2)
	if _, err := h1.WaitReachable(ctx, h2.Addr, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	const silence = 800 * time.Millisecond
	if err := setSysctl(ctx, h2.NS, "net/ipv4/icmp_echo_ignore_all", "1"); err != nil {
		t.Fatal(err)
	}
	answering := make(chan error, 1)
	go func() {
		time.Sleep(silence) // the condition under test is the wait's length
		answering <- setSysctl(ctx, h2.NS, "net/ipv4/icmp_echo_ignore_all", "0")
	}()
	took, err := h1.WaitReachable(ctx, h2.Addr, silence/2)
	if err == nil {
		t.Errorf("WaitReachable(%v) succeeded after %v while echo was off for %v", silence/2, took, silence)
	}
	if err := <-answering; err != nil {
		t.Fatal(err)
	}
	if took > silence/2+500*time.Millisecond {
		t.Errorf("WaitReachable(%v) returned after %v", silence/2, took)
	}
	if _, err := h1.WaitReachable(ctx, h2.Addr, 5*time.Second); err != nil {
		t.Errorf("after echo is back on: %v", err)
	}
}
