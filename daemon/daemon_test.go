package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/tulle-net/tulle/daemon/config"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/tools"
)

// These tests run the whole daemon in-process, inside a network namespace
// the test creates (the test binary re-executes itself there, so every
// thread, TUN device and iptables call stays inside), against a real etcd
// (etcdtest) listening on the namespace's loopback. The namespace's underlay
// is a veth with 192.0.2.1/24, MTU 1500, default route via 192.0.2.254.

const (
	etcdURL     = "http://127.0.0.1:2379" // the default, where no etcd listens
	metricsAddr = "127.0.0.1:9285"
	publicIP    = "192.0.2.1"
	networkJSON = `{"Network":"198.18.0.0/16","Backend":{"Type":"udp"}}`
)

// inDaemonNetns re-runs the calling test inside a fresh namespace with an
// underlay and reports whether the caller is that inner run.
func inDaemonNetns(t *testing.T) bool {
	t.Helper()
	if nstest.InChild() {
		return true
	}
	ns := nstest.NewNetns(t)
	ns.AddUnderlay(t, publicIP+"/24", 1500, "192.0.2.254")
	ns.RunTestInNetns(t, t.Name())
	return false
}

func putConfig(t *testing.T, cli *clientv3.Client, value string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, subnet.DefaultPrefix+"/config", value); err != nil {
		t.Fatal(err)
	}
}

// syncBuffer collects the daemon's log lines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// daemonRun is one in-process tulled.
type daemonRun struct {
	t       *testing.T
	cfg     *config.Config
	cancel  context.CancelFunc
	done    chan error
	logs    *syncBuffer
	notes   chan string // sd_notify datagrams
	stopped bool
	err     error
}

// startDaemon runs the daemon against etcd at endpoint with args (and a
// per-test TUN name, subnet file, metrics address) with a systemd notify
// socket and watchdog.
func startDaemon(t *testing.T, endpoint, subnetFile string, args ...string) *daemonRun {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NOTIFY_SOCKET", sock)
	t.Setenv("WATCHDOG_USEC", "1000000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	r := &daemonRun{t: t, done: make(chan error, 1), logs: &syncBuffer{}, notes: make(chan string, 1000)}
	var readers sync.WaitGroup
	readers.Go(func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			select {
			case r.notes <- string(buf[:n]):
			default:
			}
		}
	})
	all := append([]string{"--etcd-endpoints=" + endpoint, "--tun-name=" + nstest.Name("t"), "--subnet-file=" + subnetFile,
		"--metrics-addr=" + metricsAddr, "--workers=1", "--log-level=debug"}, args...)
	cfg, _, err := config.Parse(all, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.cfg = cfg
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	logger := slog.New(slog.NewTextHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	go func() { r.done <- Run(ctx, cfg, logger) }()
	t.Cleanup(func() {
		r.stop(t)
		conn.Close()
		readers.Wait()
		if t.Failed() {
			t.Logf("daemon log:\n%s", r.logs.String())
		}
	})
	return r
}

// stop cancels the daemon and returns what Run returned.
func (r *daemonRun) stop(t *testing.T) error {
	t.Helper()
	if r.stopped {
		return r.err
	}
	r.cancel()
	return r.wait(t, 20*time.Second)
}

// wait waits for Run to return by itself.
func (r *daemonRun) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	if r.stopped {
		return r.err
	}
	select {
	case r.err = <-r.done:
		r.stopped = true
		return r.err
	case <-time.After(d):
		t.Fatalf("daemon did not stop within %s", d)
		return nil
	}
}

// waitNote waits for an sd_notify datagram containing want.
func (r *daemonRun) waitNote(t *testing.T, want string, d time.Duration) string {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case n := <-r.notes:
			if strings.Contains(n, want) {
				return n
			}
		case <-deadline:
			t.Fatalf("no sd_notify %q within %s", want, d)
		}
	}
}

func httpGet(t *testing.T, path string) (int, string) {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + metricsAddr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitReadyz polls /readyz until its body contains want.
func waitReadyz(t *testing.T, want string, d time.Duration) (int, string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		code, body := httpGet(t, "/readyz")
		if code != 0 && strings.Contains(body, want) { // 0: not listening yet
			return code, body
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz never said %q within %s; last: %d %q", want, d, code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func leaseKeys(t *testing.T, cli *clientv3.Client) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, subnet.DefaultPrefix+"/subnets/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, kv := range resp.Kvs {
		m[strings.TrimPrefix(string(kv.Key), subnet.DefaultPrefix+"/subnets/")] = string(kv.Value)
	}
	return m
}

func readEnv(t *testing.T, path string) subnet.Env {
	t.Helper()
	e, err := subnet.ReadEnv(path)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func TestDaemonStartsInOrderServesAndStopsLeavingTheLease(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	ep, cli := loopbackEtcd(t)
	envFile := filepath.Join(t.TempDir(), "run", "subnet.env")
	r := startDaemon(t, ep, envFile)

	// No network config yet: not ready, and /readyz says why.
	code, body := waitReadyz(t, "waiting for network config", 15*time.Second)
	if code != http.StatusServiceUnavailable || !strings.HasPrefix(body, "no lease yet") {
		t.Errorf("/readyz before the config: %d %q", code, body)
	}
	if code, _ := httpGet(t, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz while starting: %d", code)
	}
	putConfig(t, cli, networkJSON)

	ready := r.waitNote(t, "READY=1", 30*time.Second)
	if !strings.Contains(ready, "STATUS=running: subnet 198.18.") {
		t.Errorf("READY without a running status: %q", ready)
	}
	if code, body := httpGet(t, "/readyz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/readyz after READY=1: %d %q", code, body)
	}
	r.waitNote(t, "WATCHDOG=1", 5*time.Second)

	// subnet.env in flannel's format, for the underlay MTU 1500.
	env := readEnv(t, envFile)
	if env.Network != netip.MustParsePrefix("198.18.0.0/16") || env.MTU != 1472 || env.IPMasq || env.Subnet.Bits() != 24 {
		t.Errorf("subnet.env %+v", env)
	}
	lease := env.Subnet

	// The TUN device: <lease .0>/32, MTU 1472, route to the network.
	link, err := netlink.LinkByName(r.cfg.TunName)
	if err != nil {
		t.Fatalf("TUN device %s: %v", r.cfg.TunName, err)
	}
	if link.Attrs().MTU != 1472 {
		t.Errorf("TUN MTU %d", link.Attrs().MTU)
	}
	addrs, _ := netlink.AddrList(link, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != lease.Addr().String()+"/32" {
		t.Errorf("TUN addresses %v, want %s/32", addrs, lease.Addr())
	}
	routes, _ := netlink.RouteList(link, netlink.FAMILY_V4)
	found := false
	for _, rt := range routes {
		found = found || (rt.Dst != nil && rt.Dst.String() == "198.18.0.0/16")
	}
	if !found {
		t.Errorf("no route 198.18.0.0/16 dev %s: %v", r.cfg.TunName, routes)
	}

	// The lease in etcd: flannel's value plus Tulle's mark.
	key := strings.ReplaceAll(lease.String(), "/", "-")
	keys := leaseKeys(t, cli)
	if got, want := keys[key], `{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendData":{"tulle":{"version":"devel","features":["partial-checksum"]}}}`; got != want {
		t.Errorf("lease value %q, want %q (all: %v)", got, want, keys)
	}

	// Metrics: the daemon's, the data plane's, and the whole passes promlint.
	code, metricsText := httpGet(t, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{"tulle_ready 1", "tulle_etcd_connected 1", `tulle_build_info{goversion="go`, "tulle_lease_expiry_timestamp_seconds ", "tulle_peers 0", "go_goroutines ", "process_resident_memory_bytes "} {
		if !strings.Contains(metricsText, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	problems, err := promlint.New(strings.NewReader(metricsText)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}

	// tulled status sees our lease as a Tulle host's.
	var out, errOut bytes.Buffer
	if code := Main([]string{"status", "--etcd-endpoints=" + ep}, nil, &out, &errOut); code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut.String())
	}
	for _, want := range []string{"network:  198.18.0.0/16, subnets /24", "backend:  udp, port 8285", "leases:   1 (1 Tulle, 0 flannel)", lease.String(), "192.0.2.1", "tulle devel"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, out.String())
		}
	}

	// SIGTERM's path: a clean stop leaves the lease and subnet.env, and
	// removes the TUN device.
	if err := r.stop(t); err != nil {
		t.Fatalf("Run after a stop: %v", err)
	}
	r.waitNote(t, "STOPPING=1", time.Second)
	if _, err := netlink.LinkByName(r.cfg.TunName); err == nil {
		t.Errorf("TUN device %s still there after the stop", r.cfg.TunName)
	}
	if _, ok := leaseKeys(t, cli)[key]; !ok {
		t.Errorf("lease %s gone after a clean stop", key)
	}
	if readEnv(t, envFile).Subnet != lease {
		t.Errorf("subnet.env changed by the stop")
	}

	// A restart keeps the subnet.
	r2 := startDaemon(t, ep, envFile)
	r2.waitNote(t, "READY=1", 30*time.Second)
	if got := readEnv(t, envFile).Subnet; got != lease {
		t.Errorf("restart took %s, want %s", got, lease)
	}
	if err := r2.stop(t); err != nil {
		t.Fatal(err)
	}
}

func TestDaemonShowsWhyItWaitsForEtcdAndGivesUpWithExit1(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	// Nothing listens on 127.0.0.1:2379 in this namespace.
	envFile := filepath.Join(t.TempDir(), "subnet.env")
	r := startDaemon(t, etcdURL, envFile, "--etcd-start-timeout=4s")
	code, body := waitReadyz(t, "connection refused", 10*time.Second)
	if code != http.StatusServiceUnavailable || body != "waiting for etcd at http://127.0.0.1:2379: connection refused\n" {
		t.Errorf("/readyz with etcd down: %d %q", code, body)
	}
	note := r.waitNote(t, "connection refused", 5*time.Second)
	if note != "STATUS=starting: waiting for etcd at http://127.0.0.1:2379: connection refused" {
		t.Errorf("STATUS with etcd down: %q", note)
	}
	err := r.wait(t, 20*time.Second)
	if err == nil || ExitCode(err) != ExitFailure {
		t.Fatalf("Run gave %v (exit %d), want a failure after --etcd-start-timeout", err, ExitCode(err))
	}
	if !strings.Contains(err.Error(), "gave up after 4s") {
		t.Errorf("error %q does not say it gave up", err)
	}

	// A stop while waiting is clean.
	r2 := startDaemon(t, etcdURL, envFile)
	waitReadyz(t, "127.0.0.1:2379", 10*time.Second)
	if err := r2.stop(t); err != nil {
		t.Errorf("stop while waiting for etcd: %v", err)
	}
}

func TestDaemonIPMasqRulesLiveAsLongAsTheDaemon(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	ep, cli := loopbackEtcd(t)
	putConfig(t, cli, networkJSON)
	envFile := filepath.Join(t.TempDir(), "subnet.env")
	// A corrupt subnet.env from an earlier life is reported and replaced.
	if err := os.WriteFile(envFile, []byte("FLANNEL_SUBNET=198.18.7\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := startDaemon(t, ep, envFile, "--ip-masq", "--healthz-ip=127.0.0.1", "--healthz-port=8471")
	r.waitNote(t, "READY=1", 30*time.Second)
	if !strings.Contains(r.logs.String(), `msg="ignoring unreadable previous subnet file"`) {
		t.Errorf("corrupt subnet.env not reported")
	}
	// flannel's health endpoint serves the same.
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get("http://127.0.0.1:8471" + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("--healthz-port %s: %d", path, resp.StatusCode)
		}
	}
	env := readEnv(t, envFile)
	if !env.IPMasq {
		t.Errorf("FLANNEL_IPMASQ=false with --ip-masq")
	}
	out, err := tools.Command(context.Background(), "iptables", "-w", "-t", "nat", "-S", "TULLE-POSTRTG").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "! -s 198.18.0.0/16 -d "+env.Subnet.String()+" -m comment --comment \"tulle masq\" -j RETURN") {
		t.Errorf("rules after READY: %v\n%s", err, out)
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	if err := tools.Command(context.Background(), "iptables", "-w", "-t", "nat", "-S", "TULLE-POSTRTG").Run(); err == nil {
		t.Errorf("chain TULLE-POSTRTG still there after the stop")
	}
}

func TestDaemonExitsWithFailureWhenAnotherHostTakesItsSubnet(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	ep, cli := loopbackEtcd(t)
	putConfig(t, cli, networkJSON)
	envFile := filepath.Join(t.TempDir(), "subnet.env")
	r := startDaemon(t, ep, envFile)
	r.waitNote(t, "READY=1", 30*time.Second)
	key := subnet.DefaultPrefix + "/subnets/" + strings.ReplaceAll(readEnv(t, envFile).Subnet.String(), "/", "-")

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, key, `{"PublicIP":"192.0.2.99","PublicIPv6":null}`); err != nil {
		t.Fatal(err)
	}
	err := r.wait(t, 20*time.Second)
	if !errors.Is(err, subnet.ErrLeaseLost) || ExitCode(err) != ExitFailure {
		t.Fatalf("Run gave %v (exit %d), want lease lost and exit 1", err, ExitCode(err))
	}
	if _, err := netlink.LinkByName(r.cfg.TunName); err == nil {
		t.Errorf("TUN device still there after the failure")
	}
}

func TestDaemonRefusesANonUDPNetworkWithExit2(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	ep, cli := loopbackEtcd(t)
	putConfig(t, cli, `{"Network":"198.18.0.0/16","Backend":{"Type":"vxlan"}}`)
	r := startDaemon(t, ep, filepath.Join(t.TempDir(), "subnet.env"))
	err := r.wait(t, 20*time.Second)
	if ExitCode(err) != ExitUsage || !strings.Contains(fmt.Sprint(err), `Backend.Type is "vxlan"`) {
		t.Fatalf("Run gave %v (exit %d), want exit 2 naming the backend type", err, ExitCode(err))
	}
	if keys := leaseKeys(t, cli); len(keys) != 0 {
		t.Errorf("%d lease keys written for a network tulled refuses to carry; want none", len(keys))
	}
}
