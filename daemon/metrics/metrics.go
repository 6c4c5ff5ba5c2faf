// Package metrics builds tulled's Prometheus registry: the daemon's own
// metrics (lease, etcd, readiness, build), the Go and process collectors,
// and whatever collectors the data plane brings. Daemon values are read at
// scrape time from a Snapshot the daemon supplies; nothing is updated on a
// hot path.
package metrics

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/tulle-net/tulle/daemon/buildinfo"
)

// Snapshot is the daemon's state as the metrics show it.
type Snapshot struct {
	LeaseHeld       bool
	LeaseExpiry     time.Time // zero for a reservation
	Reservation     bool
	RenewFailures   uint64
	EtcdConnected   bool
	WatchRevision   int64
	MalformedLeases uint64
	Ready           bool
}

var (
	descLeaseExpiry = prometheus.NewDesc("tulle_lease_expiry_timestamp_seconds",
		"Unix time at which this host's subnet lease expires in etcd unless renewed; 0 for a reservation, which never expires. Absent while no lease is held.",
		nil, nil)
	descRenewFailures = prometheus.NewDesc("tulle_lease_renewal_failures_total",
		"Failed attempts to renew this host's subnet lease.", nil, nil)
	descEtcdConnected = prometheus.NewDesc("tulle_etcd_connected",
		"1 while etcd answers, 0 while it does not.", nil, nil)
	descWatchRevision = prometheus.NewDesc("tulle_etcd_watch_revision",
		"Last etcd revision the lease watch has seen.", nil, nil)
	descMalformed = prometheus.NewDesc("tulle_malformed_leases_total",
		"Lease keys or values in etcd that could not be parsed and were skipped.", nil, nil)
	descReady = prometheus.NewDesc("tulle_ready",
		"1 when tulled is ready (lease held and renewed in time, lease watch working, data plane running, subnet.env written), else 0; as /readyz.", nil, nil)
	descBuildInfo = prometheus.NewDesc("tulle_build_info",
		"Always 1; the labels say which tulled runs.", []string{"version", "revision", "goversion"}, nil)
)

type daemonCollector struct {
	snapshot func() Snapshot
	build    buildinfo.Info
}

func (c *daemonCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descLeaseExpiry, descRenewFailures, descEtcdConnected, descWatchRevision, descMalformed, descReady, descBuildInfo} {
		ch <- d
	}
}

func (c *daemonCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.snapshot()
	if s.LeaseHeld {
		expiry := 0.0
		if !s.Reservation && !s.LeaseExpiry.IsZero() {
			expiry = float64(s.LeaseExpiry.UnixNano()) / 1e9
		}
		ch <- prometheus.MustNewConstMetric(descLeaseExpiry, prometheus.GaugeValue, expiry)
	}
	ch <- prometheus.MustNewConstMetric(descRenewFailures, prometheus.CounterValue, float64(s.RenewFailures))
	ch <- prometheus.MustNewConstMetric(descEtcdConnected, prometheus.GaugeValue, b2f(s.EtcdConnected))
	ch <- prometheus.MustNewConstMetric(descWatchRevision, prometheus.GaugeValue, float64(s.WatchRevision))
	ch <- prometheus.MustNewConstMetric(descMalformed, prometheus.CounterValue, float64(s.MalformedLeases))
	ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, b2f(s.Ready))
	ch <- prometheus.MustNewConstMetric(descBuildInfo, prometheus.GaugeValue, 1, c.build.Version, c.build.Revision, c.build.GoVersion)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// NewRegistry returns a registry with the daemon collector (reading
// snapshot at every scrape), the Go and process collectors, and extra
// (e.g. the data plane's collector, added later with Register).
func NewRegistry(snapshot func() Snapshot, extra ...prometheus.Collector) (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	cs := append([]prometheus.Collector{
		&daemonCollector{snapshot: snapshot, build: buildinfo.Get()},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	}, extra...)
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics collector %T: %w", c, err)
		}
	}
	return reg, nil
}
