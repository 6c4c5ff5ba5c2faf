package udp

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"

	"github.com/tulle-net/tulle/subnet"
)

// collectText scrapes b's collector in the text exposition format.
func collectText(t testing.TB, b *Backend) string {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(b.Collector()); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Error(err)
		return ""
	}
	var sb strings.Builder
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&sb, mf); err != nil {
			t.Error(err)
		}
	}
	return sb.String()
}

func TestCollectorSumsLoopsAndNamesMetricsAsTheBrief(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 2)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")})
	p := b.table.Load().lookup(addr32("198.18.2.1"))
	for _, w := range b.workers {
		w.tx.run.add(w.tx.stats, p, 3, 300)
		w.tx.run.flush(w.tx.stats)
		w.rx.run.add(w.rx.stats, p, 2, 100)
		w.rx.run.flush(w.rx.stats)
		w.rx.drops[dropSpoofedSource] = 4
		w.rx.drops.flush(w.rx.stats)
		w.tx.stats.tun.observe(44)
		w.rx.stats.udp.observe(1)
	}
	text := collectText(t, b)
	for _, want := range []string{
		`tulle_peer_transmit_packets_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 6`,
		`tulle_peer_transmit_bytes_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 600`,
		`tulle_peer_receive_packets_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 4`,
		`tulle_peer_receive_bytes_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 200`,
		`tulle_dropped_packets_total{direction="receive",reason="spoofed_source"} 8`,
		`tulle_dropped_packets_total{direction="transmit",reason="send_error"} 0`,
		`tulle_tun_read_batch_size_bucket{le="32"} 0`,
		`tulle_tun_read_batch_size_bucket{le="64"} 2`,
		`tulle_tun_read_batch_size_sum 88`,
		`tulle_udp_receive_batch_size_bucket{le="1"} 2`,
		`tulle_tun_write_batch_size_count 0`,
		`tulle_udp_send_batch_size_count 0`,
		"tulle_peers 1",
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("scrape lacks %q", want)
		}
	}
	if t.Failed() {
		t.Log(text)
	}
}

func TestCollectorPassesPromlint(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")})
	problems, err := testutil.CollectAndLint(b.Collector())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

func TestHistogramBuckets(t *testing.T) {
	var h histogram
	for _, n := range []int{1, 2, 3, 4, 5, 128, 129, 1024, 1025, 5000} {
		h.observe(n)
	}
	want := [numBuckets]uint64{1, 1, 2, 1, 0, 0, 0, 1, 1, 0, 1, 2}
	for i := range want {
		if got := h.buckets[i].Load(); got != want[i] {
			t.Errorf("bucket %d (<= %d) = %d, want %d", i, 1<<i, got, want[i])
		}
	}
}
