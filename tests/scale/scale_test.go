package main

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

// TestRouteTableEqualsEtcdAfterChurnAndBurst is the harness at small scale
// with its correctness checks and no speed thresholds (speed is measured
// by `make scale`): 1,000 leases in a real etcd, one real tulled, 5 s of
// 100 changes per second, then 500 leases gone in one revision. Afterwards
// tulled's route table equals the leases in etcd, and it applied exactly
// the changes made: none missed, none twice.
func TestRouteTableEqualsEtcdAfterChurnAndBurst(t *testing.T) {
	testbed.RequireRoot(t)
	cfg := Config{
		Leases:    []int{1000},
		Network:   netip.MustParsePrefix("198.18.0.0/15"),
		SubnetLen: 30,
		ChurnRate: 100,
		ChurnFor:  5 * time.Second,
		Burst:     500,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := run(ctx, cfg, 1000, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	if !res.TableEqualsEtcd || !res.AppliedEqualsMade {
		t.Fatalf("table equals etcd: %v, applied equals made: %v: %v", res.TableEqualsEtcd, res.AppliedEqualsMade, res.Differences)
	}
	if res.Churn.Changes < 400 || res.Churn.Adds == 0 || res.Churn.Deletes == 0 || res.Churn.Moves == 0 {
		t.Errorf("churn made %d changes (%d adds, %d deletes, %d moves), want about 500 of each kind", res.Churn.Changes, res.Churn.Adds, res.Churn.Deletes, res.Churn.Moves)
	}
	if res.Burst.Deletions != 500 {
		t.Errorf("burst of %d deletions, want 500", res.Burst.Deletions)
	}
}

func TestCompareFindsMissingExtraMovedAndDuplicatedLeases(t *testing.T) {
	m, err := testbed.ParseMetrics([]byte(`# TYPE tulle_peer_transmit_packets_total counter
tulle_peer_transmit_packets_total{peer="192.0.2.2",subnet="198.18.0.4/30"} 0
tulle_peer_transmit_packets_total{peer="192.0.2.3",subnet="198.18.0.8/30"} 0
tulle_peer_transmit_packets_total{peer="192.0.2.9",subnet="198.18.0.12/30"} 0
# TYPE tulle_peers gauge
tulle_peers 4
`))
	if err != nil {
		t.Fatal(err)
	}
	etcd := map[string]string{
		"198.18.0.0-30":  "192.0.2.1", // our own
		"198.18.0.4-30":  "192.0.2.2",
		"198.18.0.8-30":  "192.0.2.4", // moved
		"198.18.0.16-30": "192.0.2.5", // missing
	}
	got := strings.Join(compare(m, etcd, netip.MustParsePrefix("198.18.0.0/30")), "\n")
	for _, want := range []string{
		"198.18.0.8-30: table has 192.0.2.3, etcd 192.0.2.4",
		"missing from the table: 198.18.0.16-30 (192.0.2.5)",
		"in the table, not in etcd: 198.18.0.12-30 (192.0.2.9)",
		"tulle_peers 4, 3 series",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("differences lack %q; got:\n%s", want, got)
		}
	}
	delete(etcd, "198.18.0.16-30")
	etcd["198.18.0.8-30"] = "192.0.2.3"
	etcd["198.18.0.12-30"] = "192.0.2.9"
	m["tulle_peers"].Metric[0].Gauge.Value = ptr(3.0)
	if d := compare(m, etcd, netip.MustParsePrefix("198.18.0.0/30")); len(d) != 0 {
		t.Errorf("equal table and etcd: differences %v", d)
	}
}

func ptr[T any](v T) *T { return &v }

func TestLogLinesAreReadWholeAndInOrder(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/tulled.log"
	write := func(s string) {
		t.Helper()
		f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteString(s); err != nil {
			t.Fatal(err)
		}
	}
	write("=== old run\n{\"msg\":\"old\"}\n")
	l, err := followLog(path)
	if err != nil {
		t.Fatal(err)
	}
	write("=== start\n{\"time\":\"2026-12-02T04:48:29.5Z\",\"msg\":\"route table updated\",\"peers\":3,\"added\":2,\"removed\":1}\n{\"msg\":\"peer ad")
	var msgs []string
	take := func() {
		for {
			ll, ok, err := l.take()
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				return
			}
			msgs = append(msgs, ll.Msg)
			if ll.Msg == "route table updated" && (ll.Peers == nil || *ll.Peers != 3 || ll.Added != 2 || ll.Removed != 1 || ll.Time.IsZero()) {
				t.Errorf("parsed %+v", ll)
			}
		}
	}
	take()
	write("ded\",\"subnet\":\"198.18.0.4/30\"}\n")
	take()
	if got := strings.Join(msgs, ","); got != "route table updated,peer added" {
		t.Errorf("lines %q, want the new ones, the split one whole", got)
	}
}

func TestPublicIPsAreUniqueOutsideTheOverlayOrDocumentationAddresses(t *testing.T) {
	pubs, _ := choosePublics(netip.MustParsePrefix("198.18.0.0/16"), 20000)
	seen := map[netip.Addr]bool{}
	for _, a := range pubs {
		if seen[a] || !netip.MustParsePrefix("198.19.0.0/16").Contains(a) {
			t.Fatalf("public IP %v repeated or outside 198.19.0.0/16", a)
		}
		seen[a] = true
	}
	if len(pubs) != 20000 {
		t.Fatalf("%d public IPs, want 20000", len(pubs))
	}
	pubs, _ = choosePublics(netip.MustParsePrefix("198.18.0.0/15"), 20000)
	doc := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("198.51.100.0/24")}
	for _, a := range pubs {
		if !doc[0].Contains(a) && !doc[1].Contains(a) || a == testbed.EtcdAddr || a == netip.MustParseAddr("192.0.2.1") {
			t.Fatalf("public IP %v: want a documentation address no bed node has", a)
		}
	}
}
