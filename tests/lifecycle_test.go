package tests

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

// leaseKey is the etcd key suffix of a lease, "198.18.3.0-24".
func leaseKey(t *testing.T, h *testbed.Host) string {
	t.Helper()
	l := lease(t, h)
	return fmt.Sprintf("%s-%d", l.Addr(), l.Bits())
}

func TestStoppedHostDisappearsFromPeersWhenItsLeaseExpires(t *testing.T) {
	const ttl = 10 * time.Second
	b := cluster(t, testbed.Options{}, "", "--subnet-lease-ttl", ttl.String())
	ctx := testCtx(t, 2*time.Minute)
	h1, h2, h3 := b.Host(1), b.Host(2), b.Host(3)
	c1, c3 := container(t, b, 1), container(t, b, 3)
	reach(t, ctx, c1, c3, 1)
	key3 := leaseKey(t, h3)
	// Host 3's series are there while it is a peer (so their absence
	// below is not a wrong label).
	for _, h := range []*testbed.Host{h1, h2} {
		if got := peerSeries(t, ctx, h, h3); len(got) != len(peerMetrics) {
			t.Fatalf("host %s exposes %v for peer %s, want all of %v", h.Name, got, h3.Addr, peerMetrics)
		}
	}

	// The live hosts renew their short leases (at TTL/2) and keep them.
	time.Sleep(ttl + 2*time.Second)
	leases, err := b.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(leases) != 3 {
		t.Fatalf("after one TTL the leases are %v, want the 3 hosts' (renewal)", leases)
	}

	// A clean stop leaves the lease in etcd (a restart would reuse it);
	// then it expires, and the others drop host 3.
	if err := h3.Tulled().Stop(); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	for _, h := range []*testbed.Host{h1, h2} {
		v, _, err := waitMetric(t, ctx, h, ttl+15*time.Second, func(v float64) bool { return v == 1 }, "tulle_peers")
		if err != nil {
			t.Fatalf("host %s still counts %v peers %v after host 3 stopped (lease TTL %v): %v", h.Name, v, time.Since(stopped).Round(time.Second), ttl, err)
		}
	}
	t.Logf("hosts 1 and 2 dropped host 3 %v after it stopped (lease TTL %v)", time.Since(stopped).Round(100*time.Millisecond), ttl)
	leases, err = b.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := leases[key3]; ok || len(leases) != 2 {
		t.Fatalf("leases %v: want host 3's %s expired and the other 2 kept", leases, key3)
	}

	// Its subnet is no longer routed: host 1 drops (and counts) what
	// container 1 sends there.
	before := metric(t, ctx, h1, "tulle_dropped_packets_total", "direction", "transmit", "reason", "no_route")
	if r, err := c1.Ping(ctx, c3.Addr, 2); err == nil {
		t.Fatalf("container 3's address still answers after host 3's lease expired:\n%s", r.Output)
	}
	after := metric(t, ctx, h1, "tulle_dropped_packets_total", "direction", "transmit", "reason", "no_route")
	if after < before+2 {
		t.Errorf("host 1 no_route drops %v -> %v for 2 pings into the expired subnet, want +2", before, after)
	}
	// A departed peer's series go with it.
	for _, h := range []*testbed.Host{h1, h2} {
		if got := peerSeries(t, ctx, h, h3); len(got) != 0 {
			t.Errorf("host %s still exposes %v for the departed peer %s", h.Name, got, h3.Addr)
		}
	}
}

// peerMetrics are the series tulled keeps per peer.
var peerMetrics = []string{
	"tulle_peer_transmit_packets_total", "tulle_peer_transmit_bytes_total",
	"tulle_peer_receive_packets_total", "tulle_peer_receive_bytes_total",
}

// peerSeries returns the names of the per-peer metrics that host h exposes
// for peer p.
func peerSeries(t *testing.T, ctx context.Context, h, p *testbed.Host) []string {
	t.Helper()
	m, err := h.Scrape(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, name := range peerMetrics {
		if len(m.Samples(name, "peer", p.Addr.String())) > 0 {
			out = append(out, name)
		}
	}
	return out
}

func TestNewHostIsReachableWithin5sOfJoining(t *testing.T) {
	b := cluster(t, testbed.Options{Hosts: 2}, "")
	ctx := testCtx(t, 2*time.Minute)
	c1 := container(t, b, 1)
	reach(t, ctx, c1, container(t, b, 2), 1)

	h3, err := b.AddHost(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	launched := time.Now()
	if _, err := h3.StartTulled(ctx); err != nil {
		t.Fatal(err)
	}
	joined := time.Now() // lease held, subnet.env written
	if _, err := h3.SetupContainer(ctx); err != nil {
		t.Fatal(err)
	}
	c3 := container(t, b, 3)
	if _, err := c1.WaitReachable(ctx, c3.Addr, 5*time.Second-time.Since(joined)); err != nil {
		t.Fatalf("container 3 not reachable from container 1 within 5 s of host 3 joining: %v", err)
	}
	took := time.Since(joined)
	if took > 5*time.Second {
		t.Fatalf("container 1 reached container 3 %v after host 3 joined, want within 5 s", took.Round(time.Millisecond))
	}
	if _, err := c3.WaitReachable(ctx, container(t, b, 2).Addr, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("host 3 ready %v after launch; container 1 reached container 3 %v after that", joined.Sub(launched).Round(time.Millisecond), took.Round(time.Millisecond))
}

func TestRestartedTulledKeepsItsSubnetAndTrafficResumes(t *testing.T) {
	b := cluster(t, testbed.Options{}, "")
	ctx := testCtx(t, 2*time.Minute)
	h2 := b.Host(2)
	c1, c2 := container(t, b, 1), container(t, b, 2)
	reach(t, ctx, c1, c2, 1)
	key2 := leaseKey(t, h2)

	for _, how := range []string{"SIGTERM", "SIGKILL"} {
		t.Run("after "+how, func(t *testing.T) {
			var err error
			if how == "SIGTERM" {
				err = h2.Tulled().Stop()
			} else {
				err = h2.Tulled().Kill()
			}
			if err != nil {
				t.Fatal(err)
			}
			leases, err := b.Leases(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if leases[key2] != h2.Addr.String() {
				t.Fatalf("after %s the leases are %v: want %s kept for %s", how, leases, key2, h2.Addr)
			}
			if out, err := h2.Exec(ctx, "ip", "-br", "link"); err != nil || strings.Contains(out, "tulle0") {
				t.Errorf("after %s host 2 still has tulle0 (%v):\n%s", how, err, out)
			}
			restarted := time.Now()
			if _, err := h2.StartTulled(ctx); err != nil {
				t.Fatal(err)
			}
			if got := leaseKey(t, h2); got != key2 {
				t.Fatalf("restarted tulled took %s, want its previous subnet %s", got, key2)
			}
			if _, err := h2.SetupContainer(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := c1.WaitReachable(ctx, c2.Addr, 10*time.Second); err != nil {
				t.Fatal(err)
			}
			t.Logf("traffic resumed %v after the restart began", time.Since(restarted).Round(time.Millisecond))
			if _, err := testbed.TransferTCP(ctx, c1, c2, 8<<20); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestTrafficFlowsThroughAnEtcdOutageAndWatchResumes(t *testing.T) {
	b := cluster(t, testbed.Options{Hosts: 2}, "")
	ctx := testCtx(t, 2*time.Minute)
	h1 := b.Host(1)
	c1, c2 := container(t, b, 1), container(t, b, 2)
	reach(t, ctx, c1, c2, 1)

	if err := b.StopEtcd(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := waitMetric(t, ctx, h1, 15*time.Second, func(v float64) bool { return v == 0 }, "tulle_etcd_connected"); err != nil {
		t.Errorf("tulle_etcd_connected stays 1 with etcd down: %v", err)
	}
	// The data plane does not depend on etcd.
	if _, err := c1.Ping(ctx, c2.Addr, 3); err != nil {
		t.Fatal(err)
	}
	if _, err := testbed.TransferTCP(ctx, c1, c2, 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := b.StartEtcd(ctx); err != nil {
		t.Fatal(err)
	}
	if _, took, err := waitMetric(t, ctx, h1, 20*time.Second, func(v float64) bool { return v == 1 }, "tulle_etcd_connected"); err != nil {
		t.Fatalf("tulle_etcd_connected not back to 1 after etcd returned: %v", err)
	} else {
		t.Logf("host 1 reconnected %v after etcd was back", took.Round(100*time.Millisecond))
	}

	// The watch resumed: a host that joins now is routed.
	h3, err := b.AddHost(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h3.StartTulled(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := h3.SetupContainer(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c1.WaitReachable(ctx, container(t, b, 3).Addr, 10*time.Second); err != nil {
		t.Fatalf("a host that joined after the outage is not reachable: %v", err)
	}
}
