package udp

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"

	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
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

// wantScrapeLines checks that the scrape text holds each of lines whole.
func wantScrapeLines(t *testing.T, text string, lines ...string) {
	t.Helper()
	for _, want := range lines {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("scrape lacks %q", want)
		}
	}
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
		w.rx.drops[famIPv4][dropSpoofedSource] = 4
		w.rx.drops[famIPv6][dropSpoofedSource] = 1
		w.rx.drops.flush(w.rx.stats)
		w.tx.stats.tun.observe(44)
		w.rx.stats.udp.observe(1)
	}
	text := collectText(t, b)
	wantScrapeLines(t, text,
		`tulle_peer_transmit_packets_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 6`,
		`tulle_peer_transmit_bytes_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 600`,
		`tulle_peer_receive_packets_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 4`,
		`tulle_peer_receive_bytes_total{peer="192.0.2.2",subnet="198.18.2.0/24"} 200`,
		`tulle_dropped_packets_total{direction="receive",family="ipv4",reason="spoofed_source"} 8`,
		`tulle_dropped_packets_total{direction="receive",family="ipv6",reason="spoofed_source"} 2`,
		`tulle_dropped_packets_total{direction="receive",family="unknown",reason="spoofed_source"} 0`,
		`tulle_dropped_packets_total{direction="transmit",family="ipv4",reason="send_error"} 0`,
		`tulle_tun_read_batch_size_bucket{le="32"} 0`,
		`tulle_tun_read_batch_size_bucket{le="64"} 2`,
		`tulle_tun_read_batch_size_sum 88`,
		`tulle_udp_receive_batch_size_bucket{le="1"} 2`,
		`tulle_tun_write_batch_size_count 0`,
		`tulle_udp_send_batch_size_count 0`,
		"tulle_receive_steering_misses_total 0",
		"tulle_peers 1",
	)
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

// TestTunReadCountsTheSegmentsThatAreSent reads TSO superpackets whose
// headers would add a segment to a count by length (45 segments of 1400
// bytes: 63,052 bytes with headers, 46 by ceil(len/gso_size)) and checks
// that tulle_tun_read_batch_size counts the 45 segments Split cuts, for
// a superpacket that is sent (45 datagrams arrive, 45 counted to the peer)
// and for one that is dropped (45 no_route drops). The peer is a UDP
// socket on loopback.
func TestTunReadCountsTheSegmentsThatAreSent(t *testing.T) {
	const mss, segs = 1400, 45
	peerSock, err := udpconn.Listen(netip.MustParseAddrPort("127.0.0.2:0"), udpconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer peerSock.Close()
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.opts.Port = int(peerSock.LocalAddr().Port())
	b.Apply([]subnet.Event{added("198.18.2.0/24", "127.0.0.2")})
	w := b.workers[0]
	if w.conn, err = udpconn.Listen(netip.MustParseAddrPort("127.0.0.1:0"), udpconn.Options{}); err != nil {
		t.Fatal(err)
	}
	defer w.conn.Close()
	tx := &w.tx
	tx.out[underlay4].conn = w.conn
	tb := b.table.Load()

	h, pkt := tcpSuper("198.18.1.5", "198.18.2.7", segs*mss, mss, 1)
	if byLength := (len(pkt) + mss - 1) / mss; byLength != segs+1 {
		t.Fatalf("test superpacket: %d segments by length, want %d (one more than sent)", byLength, segs+1)
	}
	txRead(t, tx, tb, 0, h, pkt)
	if err := tx.flush(); err != nil {
		t.Fatal(err)
	}
	msgs := make([]udpconn.Message, 8)
	for i := range msgs {
		msgs[i].Buf = make([]byte, udpconn.GROBufferSize)
	}
	peerSock.SetReadDeadline(time.Now().Add(5 * time.Second))
	for got := 0; got < segs; {
		n, err := peerSock.ReadBatch(msgs)
		if err != nil {
			t.Fatalf("peer received %d of %d segments: %v", got, segs, err)
		}
		for _, m := range msgs[:n] {
			if m.SegSize > 0 {
				got += (m.N + m.SegSize - 1) / m.SegSize
			} else {
				got++
			}
		}
	}

	h, pkt = tcpSuper("198.18.1.5", "198.18.9.7", segs*mss, mss, 1) // nobody's subnet
	tx.icmpToken, tx.icmpLast = 0, time.Now().AddDate(3000, 0, 0)   // no ICMP error: no TUN queue to write it to
	txRead(t, tx, tb, 0, h, pkt)
	if err := tx.flush(); err != nil {
		t.Fatal(err)
	}
	text := collectText(t, b)
	wantScrapeLines(t, text,
		`tulle_tun_read_batch_size_sum 90`,
		`tulle_tun_read_batch_size_count 2`,
		`tulle_peer_transmit_packets_total{peer="127.0.0.2",subnet="198.18.2.0/24"} 45`,
		`tulle_udp_send_batch_size_sum 45`,
		`tulle_dropped_packets_total{direction="transmit",family="ipv4",reason="no_route"} 45`,
	)
	if t.Failed() {
		t.Log(text)
	}
}

// TestKernelDropsAtTheSocketAreCounted floods a data plane whose loops do
// not run, so its socket's receive buffer overflows, and checks that
// tulle_dropped_packets_total{direction="receive",family="unknown",reason="socket_drop"}
// reports what the kernel dropped: its Udp InErrors in the namespace, which
// counts a full receive buffer (RcvbufErrors) and UDP memory pressure
// (MemErrors, global to the machine: other loads raise it).
func TestKernelDropsAtTheSocketAreCounted(t *testing.T) {
	h := newTwoHosts(t)
	var b *Backend
	err := nstest.In(h.a, func() error {
		var err error
		b, err = New(Options{TunName: h.tunName("a"), Workers: 1, PublicIP: hostA, MTU: 1472, Network: network,
			SubnetLen: 24, Lease: subnet.Lease{Subnet: leaseA}, Logger: discardLogger()})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	b.Apply([]subnet.Event{lease(leaseB, hostB)})
	before := udpSNMP(t, h.a, "InErrors")
	flood := listenUDP(t, h.b, netip.AddrPortFrom(hostB, 0))
	to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(hostA, subnet.DefaultPort))
	payload := make([]byte, 1000)
	for range 40000 { // about 40 MB of skbs: well over the 16 MiB receive buffer
		if _, err := flood.WriteToUDP(payload, to); err != nil {
			t.Fatal(err)
		}
	}
	want := `tulle_dropped_packets_total{direction="receive",family="unknown",reason="socket_drop"} `
	var kernel uint64
	waitFor(t, 5*time.Second, "the scrape to report the kernel's receive-buffer drops", func() bool {
		kernel = udpSNMP(t, h.a, "InErrors") - before
		return kernel > 0 && strings.Contains(collectText(t, b), fmt.Sprintf("%s%d\n", want, kernel))
	})
	t.Logf("%d datagrams dropped by the kernel, reported as socket_drop", kernel)
}
