package daemon

import (
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
)

// TestReadinessTellsTheTruthWhileEtcdIsGone: with etcd unreachable, tulled
// shows it at once, is not ready once its lease renewal is overdue and
// once its lease watch has been down past the bound, keeps its data plane,
// and is ready again, having logged once that etcd is back.
func TestReadinessTellsTheTruthWhileEtcdIsGone(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	watchDownBound = 3 * time.Second // 30s in production
	e := etcdtest.Start(t)
	putConfig(t, e.Client(), networkJSON)
	p := etcdtest.NewProxy(t, e.Addr())
	// TTL 6s: renewal due 3s before expiry, overdue 0.75s later.
	r := startDaemon(t, p.Endpoint(), filepath.Join(t.TempDir(), "subnet.env"), "--subnet-lease-ttl=6s")
	r.waitNote(t, "READY=1", 30*time.Second)
	waitMetricText(t, "tulle_etcd_connected 1", 5*time.Second)

	p.Cut()
	cut := time.Now()
	waitMetricText(t, "tulle_etcd_connected 0", 2*time.Second)
	t.Logf("tulle_etcd_connected fell %s after etcd went away", time.Since(cut).Round(time.Millisecond))

	code, body := waitReadyz(t, "not renewed since it was due", 8*time.Second)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "waiting for etcd at "+p.Endpoint()+": connection refused") {
		t.Errorf("/readyz with the renewal overdue: %d %q", code, body)
	}
	t.Logf("not ready %s after etcd went away: %s", time.Since(cut).Round(time.Millisecond), strings.TrimSpace(body))
	waitMetricText(t, "tulle_ready 0", 2*time.Second)

	// Past the lease's expiry and the watch bound, both are named; the data
	// plane keeps running.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, v := httpGet(t, "/readyz?verbose")
		if strings.Contains(v, "[-]lease-renewal: lease 198.18.") && strings.Contains(v, "expired in etcd at") &&
			strings.Contains(v, "[-]lease-watch: lease watch down since") && strings.Contains(v, "[+]data-plane ok") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz?verbose does not name the expired lease, the watch and a running data plane:\n%s", v)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if link, err := netlink.LinkByName(r.cfg.TunName); err != nil || link.Attrs().Flags&1 == 0 {
		t.Errorf("TUN device %s gone or down while not ready: %v", r.cfg.TunName, err)
	}

	p.Heal()
	healed := time.Now()
	waitReadyz(t, "ok", 20*time.Second)
	t.Logf("ready again %s after etcd came back", time.Since(healed).Round(time.Millisecond))
	waitMetricText(t, "tulle_etcd_connected 1", time.Second)
	if n := strings.Count(r.logs.String(), `msg="etcd reachable again"`); n != 1 {
		t.Errorf(`"etcd reachable again" logged %d times, want once`, n)
	}
	// Logged once per reason (watch down, renewal overdue, expired,
	// re-acquiring), not once per tick (about 14 in this outage).
	if n := strings.Count(r.logs.String(), `msg="not ready"`); n > 6 {
		t.Errorf(`"not ready" logged %d times: the reason must not change from tick to tick`, n)
	}
}

// waitMetricText polls /metrics until it contains want.
func waitMetricText(t *testing.T, want string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		_, body := httpGet(t, "/metrics")
		if strings.Contains(body, want+"\n") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/metrics lacks %q after %s", want, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// In a dual-stack network the not-ready reasons about the lease name both
// of its subnets: the one key holds both, and both go when it expires.
func TestLeaseProblemNamesBothSubnets(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	l := subnet.Lease{
		Subnet:     netip.MustParsePrefix("198.18.7.0/24"),
		IPv6Subnet: netip.MustParsePrefix("2001:db8:1:7::/64"),
		Expiration: now.Add(time.Minute),
	}
	ms := subnet.ManagerStatus{Lease: l, LeaseHeld: true, RenewAt: now.Add(-time.Minute)}
	const both = "lease 198.18.7.0/24 and 2001:db8:1:7::/64 "
	if got := leaseProblem(ms, now); !strings.HasPrefix(got, both+"not renewed since it was due") {
		t.Errorf("overdue renewal: %q, want it to start with %q", got, both)
	}
	if got := leaseProblem(ms, now.Add(2*time.Minute)); !strings.HasPrefix(got, both+"expired in etcd") {
		t.Errorf("expired: %q, want it to start with %q", got, both)
	}
	ms.Lease.IPv6Subnet = netip.Prefix{}
	if got := leaseProblem(ms, now); !strings.HasPrefix(got, "lease 198.18.7.0/24 not renewed") {
		t.Errorf("IPv4 only: %q", got)
	}
}
