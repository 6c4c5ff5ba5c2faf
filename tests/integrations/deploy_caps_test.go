package integrations

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
	"github.com/tulle-net/tulle/tests/tools"
)

// linuxCaps are the capability numbers the unit may name.
var linuxCaps = map[string]uint{
	"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
}

// unitCaps reads the capabilities of tulled.service and returns them as
// setpriv names ("net_admin") and as a bit mask (as /proc/<pid>/status
// shows them). The bounding and ambient sets must be the same.
func unitCaps(t *testing.T, u unitFile) ([]string, uint64) {
	t.Helper()
	bounding := u.Words("Service", "CapabilityBoundingSet")
	ambient := u.Words("Service", "AmbientCapabilities")
	if !slices.Equal(bounding, ambient) || len(bounding) == 0 {
		t.Fatalf("tulled.service: CapabilityBoundingSet %v and AmbientCapabilities %v should name the same capabilities", bounding, ambient)
	}
	var names []string
	var mask uint64
	for _, c := range bounding {
		bit, ok := linuxCaps[c]
		if !ok {
			t.Fatalf("tulled.service names %s; add it to linuxCaps if it is really needed", c)
		}
		mask |= 1 << bit
		names = append(names, strings.ToLower(strings.TrimPrefix(c, "CAP_")))
	}
	return names, mask
}

// unitSandbox is what tulled.service restricts, as far as capWrapper
// emulates it.
type unitSandbox struct {
	caps       []string // setpriv names ("net_admin")
	noNewPrivs bool
	// tunables: ProtectKernelTunables=yes, /proc/sys and /sys read-only
	// but for the unit's ReadWritePaths= below /proc/sys (tunablesRW).
	tunables   bool
	tunablesRW []string
}

// readUnitSandbox reads the sandbox settings capWrapper emulates from the
// unit.
func readUnitSandbox(t *testing.T, u unitFile) unitSandbox {
	t.Helper()
	sb := unitSandbox{noNewPrivs: u.Value("Service", "NoNewPrivileges") == "yes", tunables: u.Value("Service", "ProtectKernelTunables") == "yes"}
	sb.caps, _ = unitCaps(t, u)
	for _, p := range u.Words("Service", "ReadWritePaths") {
		if p = strings.TrimPrefix(p, "-"); strings.HasPrefix(p, "/proc/sys/") {
			sb.tunablesRW = append(sb.tunablesRW, p)
		}
	}
	return sb
}

// capWrapper writes a script that runs tulled as tulled.service would as
// far as privileges and the file system go: in a mount namespace where
// everything but /proc, /sys and /dev is read-only except writable (the
// unit's ProtectSystem=strict with RuntimeDirectory=; the testbed keeps
// subnet.env in the host's directory instead of /run/flannel), /proc/sys
// and /sys read-only but for the unit's ReadWritePaths= below /proc/sys
// (ProtectKernelTunables=yes), /home, /root and /run/user empty
// (ProtectHome=yes), then as root UID with only sb.caps in the bounding,
// inheritable and ambient (and so permitted and effective) sets and with
// no_new_privs. env is added to the environment. PrivateTmp is not
// emulated: the testbed's files live in /tmp.
func capWrapper(t *testing.T, setpriv, tulled, writable string, sb unitSandbox, env ...string) string {
	t.Helper()
	unshare := requireTool(t, "unshare")
	set := "-all"
	for _, c := range sb.caps {
		set += ",+" + c
	}
	nnp := ""
	if sb.noNewPrivs {
		nnp = " --no-new-privs"
	}
	tunables := ""
	if sb.tunables {
		// As systemd does it: bind each on itself, then remount read-only
		// (and the exceptions read-write again, deeper paths after).
		for _, d := range []string{"/proc/sys", "/sys"} {
			tunables += fmt.Sprintf("mount --bind %[1]s %[1]s\nmount -o remount,bind,ro %[1]s\n", d)
		}
		for _, d := range sb.tunablesRW {
			tunables += fmt.Sprintf("mount --bind %[1]s %[1]s\nmount -o remount,bind,rw %[1]s\n", d)
		}
	}
	var script strings.Builder
	script.WriteString("#!/bin/sh\n")
	for _, e := range env {
		fmt.Fprintf(&script, "export %s\n", e)
	}
	fmt.Fprintf(&script, `exec %s --mount --propagation private /bin/sh -c '
set -e
for m in $(awk "{print \$2}" /proc/self/mounts | sort -u); do
	case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue;; esac
	mount -o remount,bind,ro "$m" 2>/dev/null || true
done
`+tunables+`for d in /home /root /run/user; do
	if [ -d "$d" ]; then mount -t tmpfs -o ro,mode=0755 tmpfs "$d"; fi
done
mount --bind "$0" "$0"
mount -o remount,bind,rw "$0"
if touch /etc/.tulle-sandbox-probe 2>/dev/null; then
	rm -f /etc/.tulle-sandbox-probe
	echo "sandbox emulation failed: /etc is writable" >&2
	exit 97
fi
exec %s --bounding-set=%s --inh-caps=%s --ambient-caps=%s%s -- %s "$@"
' %s "$@"
`, unshare, setpriv, set, set, set, nnp, tulled, writable)
	path := filepath.Join(t.TempDir(), "tulled-as-unit")
	if err := os.WriteFile(path, []byte(script.String()), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := tools.AllowScript(path, "sh", "unshare", "awk", "sort", "mount", "touch", "rm", "setpriv", tulled); err != nil {
		t.Fatal(err)
	}
	return path
}

// procStatus returns the capability and no_new_privs lines of a process.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// mountOption returns "ro" or "rw" for the mount at dir as process pid
// sees it ("" if dir is no mount point there).
func mountOption(t *testing.T, pid int, dir string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	opt := ""
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line) // id parent major:minor root mountpoint options ...
		if len(f) > 5 && f[4] == dir {
			opt = strings.Split(f[5], ",")[0] // the last mount at dir is the visible one
		}
	}
	return opt
}

// notifyListener is the socket systemd gives a Type=notify service.
type notifyListener struct {
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []string
	at   []time.Time
	done chan struct{}
}

func listenNotify(t *testing.T) (*notifyListener, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n := &notifyListener{conn: conn, done: make(chan struct{})}
	go func() {
		defer close(n.done)
		buf := make([]byte, 4096)
		for {
			k, err := conn.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			for _, m := range strings.Split(string(buf[:k]), "\n") {
				n.msgs = append(n.msgs, m)
				n.at = append(n.at, time.Now())
			}
			n.mu.Unlock()
		}
	}()
	t.Cleanup(func() { conn.Close(); <-n.done })
	return n, path
}

// count returns how many messages equal msg, and when the first came.
func (n *notifyListener) count(msg string) (int, time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	var first time.Time
	for i, m := range n.msgs {
		if m == msg {
			if c == 0 {
				first = n.at[i]
			}
			c++
		}
	}
	return c, first
}

// TestTulledWorksWithOnlyTheUnitsCapabilities runs the real tulled on two
// testbed hosts with exactly the privileges tulled.service grants (read
// from the unit file) in a read-only file system as ProtectSystem=strict
// and ProtectKernelTunables=yes make it, in a dual-stack network and with
// --ip-masq so the TUN device's IPv6 settings and both iptables paths run
// too: each becomes ready, tells systemd so over the notify protocol and
// pings the watchdog, containers on the two hosts reach each other over
// IPv4 and IPv6, the metrics the alert rules and the dashboard use are all
// exported, and a SIGTERM stops it cleanly, rules removed.
func TestTulledWorksWithOnlyTheUnitsCapabilities(t *testing.T) {
	testbed.RequireRoot(t)
	setpriv := requireTool(t, "setpriv")
	requireTool(t, "iptables")
	unit := parseUnit(t, deployFile(t, "systemd/tulled.service"))
	if u := unit.Value("Service", "User"); u != "root" {
		t.Fatalf("tulled.service: User=%s; this test emulates root with reduced capabilities", u)
	}
	caps, mask := unitCaps(t, unit)
	sandbox := readUnitSandbox(t, unit)
	noNewPrivs := sandbox.noNewPrivs
	tulled := buildTulled(t)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	b := testbed.NewT(t, testbed.Options{Hosts: 2})
	if err := b.WriteNetworkConfig(ctx, testbed.DualStackNetworkConfig); err != nil {
		t.Fatal(err)
	}

	// Host 1 also gets systemd's notify socket and a 2 s watchdog.
	notify, sock := listenNotify(t)
	const watchdog = 2 * time.Second
	t.Setenv(testbed.EnvTulledBin, capWrapper(t, setpriv, tulled, b.Host(1).Dir, sandbox,
		"NOTIFY_SOCKET="+sock, "WATCHDOG_USEC="+strconv.Itoa(int(watchdog/time.Microsecond))))
	t1, err := b.Host(1).StartTulled(ctx, "--ip-masq")
	if err != nil {
		t.Fatal(err)
	}
	readySeen, readyAt := notify.count("READY=1")
	if readySeen != 1 {
		t.Errorf("READY=1 sent %d times by the time /readyz answered 200, want once", readySeen)
	}
	t.Setenv(testbed.EnvTulledBin, capWrapper(t, setpriv, tulled, b.Host(2).Dir, sandbox))
	t2, err := b.Host(2).StartTulled(ctx, "--ip-masq")
	if err != nil {
		t.Fatal(err)
	}

	want := fmt.Sprintf("%016x", mask)
	for _, tl := range []*testbed.Tulled{t1, t2} {
		st := procStatus(t, tl.Pid())
		for _, k := range []string{"CapEff", "CapPrm", "CapBnd", "CapAmb"} {
			if st[k] != want {
				t.Errorf("host %s: tulled %s = %s, want %s (only %v)", tl.Host.Name, k, st[k], want, caps)
			}
		}
		if noNewPrivs && st["NoNewPrivs"] != "1" {
			t.Errorf("host %s: tulled NoNewPrivs = %s, want 1", tl.Host.Name, st["NoNewPrivs"])
		}
		// It ran in the read-only file system, with its directory writable,
		// and read-only kernel tunables but the unit's exceptions.
		opts := map[string]string{"/": "ro", tl.Host.Dir: "rw"}
		if sandbox.tunables {
			opts["/proc/sys"], opts["/sys"] = "ro", "ro"
			for _, p := range sandbox.tunablesRW {
				opts[p] = "rw"
			}
		}
		for dir, opt := range opts {
			if got := mountOption(t, tl.Pid(), dir); got != opt {
				t.Errorf("host %s: tulled sees %s mounted %q, want %q", tl.Host.Name, dir, got, opt)
			}
		}
		// --ip-masq worked: the rules are in place, for both families.
		for _, cmd := range []string{"iptables", "ip6tables"} {
			if out, err := tl.Host.Exec(ctx, cmd, "-t", "nat", "-S", "TULLE-POSTRTG"); err != nil || !strings.Contains(out, "MASQUERADE") {
				t.Errorf("host %s: %s masquerade rules: %v\n%s", tl.Host.Name, cmd, err, out)
			}
		}
	}

	c1, err := b.Host(1).SetupContainer(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := b.Host(2).SetupContainer(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c1.WaitReachable(ctx, c2.Addr, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := c1.Ping(ctx, c2.Addr, 5); err != nil {
		t.Error(err)
	}
	if _, err := c2.Ping(ctx, c1.Addr, 5); err != nil {
		t.Error(err)
	}
	if _, err := c1.WaitReachable(ctx, c2.Addr6, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Ping(ctx, c1.Addr6, 3); err != nil {
		t.Error(err)
	}

	// The watchdog is pinged at least every half period.
	pingsBefore, _ := notify.count("WATCHDOG=1")
	time.Sleep(2 * watchdog)
	pingsAfter, _ := notify.count("WATCHDOG=1")
	if got := pingsAfter - pingsBefore; got < 3 {
		t.Errorf("%d WATCHDOG=1 pings in %v with WatchdogSec=%v, want at least 3", got, 2*watchdog, watchdog)
	}
	if readyAt.IsZero() {
		t.Error("no READY=1 at all")
	}

	// Every metric the alert rules and the dashboard use is exported by a
	// live tulled with peers and traffic.
	m, err := t1.Scrape(ctx)
	if err != nil {
		t.Fatal(err)
	}
	used := ruleMetricNames(t)
	for _, e := range dashboardExprs(t, readDashboard(t)) {
		used = append(used, metricNames(e)...)
	}
	for _, name := range used {
		if name == "up" { // Prometheus' own
			continue
		}
		family := name
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && m.Has(base) {
				family = base
			}
		}
		if !m.Has(family) {
			t.Errorf("deploy/ uses %s, but tulled's /metrics has no such metric", name)
		}
	}
	if v := m.Value("tulle_peer_receive_packets_total"); v < 10 {
		t.Errorf("tulle_peer_receive_packets_total = %v after 10 pings each way", v)
	}

	// SIGTERM: exit 0 and the masquerade rules are gone.
	for _, tl := range []*testbed.Tulled{t1, t2} {
		if err := tl.Stop(); err != nil {
			t.Error(err)
			continue
		}
		for _, cmd := range []string{"iptables", "ip6tables"} {
			if out, err := tl.Host.Exec(ctx, cmd, "-t", "nat", "-S", "TULLE-POSTRTG"); err == nil {
				t.Errorf("host %s: %s TULLE-POSTRTG still there after a clean stop:\n%s", tl.Host.Name, cmd, out)
			}
		}
	}
	if n, _ := notify.count("STOPPING=1"); n != 1 {
		t.Errorf("STOPPING=1 sent %d times, want once", n)
	}

	// CAP_NET_ADMIN is needed: without any capability tulled fails, with
	// the cause, instead of hanging or half-working.
	t.Setenv(testbed.EnvTulledBin, capWrapper(t, setpriv, tulled, b.Host(2).Dir, unitSandbox{noNewPrivs: noNewPrivs, tunables: sandbox.tunables, tunablesRW: sandbox.tunablesRW}))
	t3, err := b.Host(2).LaunchTulled(ctx)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-t3.Exited():
		if t3.ExitCode() != 1 || !strings.Contains(strings.ToLower(t3.LogTail(20)), "operation not permitted") {
			t.Errorf("tulled without capabilities: %s, want exit status 1 and \"operation not permitted\"; log:\n%s", t3.ExitDescription(), t3.LogTail(20))
		}
	case <-time.After(30 * time.Second):
		t.Errorf("tulled without capabilities still runs after 30 s; log:\n%s", t3.LogTail(20))
	}
}
