package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
)

func gaugeValue(t *testing.T, g prometheus.Gatherer, name string) float64 {
	t.Helper()
	for _, mf := range mustGather(t, g) {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func TestRegistryPassesPromlint(t *testing.T) {
	reg, err := NewRegistry(func() Snapshot {
		return Snapshot{LeaseHeld: true, LeaseExpiry: time.Unix(1700000000, 0), EtcdConnected: true, WatchRevision: 42, Ready: true}
	})
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mustGather(t, reg)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

func mustGather(t *testing.T, g prometheus.Gatherer) []*dto.MetricFamily {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}

func TestDaemonMetricsShowTheSnapshot(t *testing.T) {
	snap := Snapshot{LeaseHeld: true, LeaseExpiry: time.Unix(1700000000, 500e6), RenewFailures: 3, EtcdConnected: true, WatchRevision: 42, MalformedLeases: 2, Ready: true}
	reg, err := NewRegistry(func() Snapshot { return snap })
	if err != nil {
		t.Fatal(err)
	}
	want := `
# HELP tulle_etcd_connected 1 while etcd answers, 0 while it does not.
# TYPE tulle_etcd_connected gauge
tulle_etcd_connected 1
# HELP tulle_etcd_watch_revision Last etcd revision the lease watch has seen.
# TYPE tulle_etcd_watch_revision gauge
tulle_etcd_watch_revision 42
# HELP tulle_lease_renewal_failures_total Failed attempts to renew this host's subnet lease.
# TYPE tulle_lease_renewal_failures_total counter
tulle_lease_renewal_failures_total 3
# HELP tulle_malformed_leases_total Lease keys or values in etcd that could not be parsed and were skipped.
# TYPE tulle_malformed_leases_total counter
tulle_malformed_leases_total 2
# HELP tulle_ready 1 when tulled is ready (lease held and renewed in time, lease watch working, data plane running, subnet.env written), else 0; as /readyz.
# TYPE tulle_ready gauge
tulle_ready 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"tulle_etcd_connected", "tulle_etcd_watch_revision", "tulle_lease_renewal_failures_total", "tulle_malformed_leases_total", "tulle_ready"); err != nil {
		t.Error(err)
	}
	if v := gaugeValue(t, reg, "tulle_lease_expiry_timestamp_seconds"); v != 1700000000.5 {
		t.Errorf("expiry %v", v)
	}

	snap.Reservation, snap.LeaseExpiry = true, time.Time{}
	if v := gaugeValue(t, reg, "tulle_lease_expiry_timestamp_seconds"); v != 0 {
		t.Errorf("reservation expiry %v, want 0", v)
	}
	snap.LeaseHeld = false
	if n, _ := testutil.GatherAndCount(reg, "tulle_lease_expiry_timestamp_seconds"); n != 0 {
		t.Errorf("expiry present without a lease")
	}
	if n, _ := testutil.GatherAndCount(reg, "tulle_build_info", "go_goroutines", "process_start_time_seconds"); n != 3 {
		t.Errorf("build info, Go and process collectors: %d of 3 metrics", n)
	}
}
