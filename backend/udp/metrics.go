package udp

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	descPeerTxPackets = prometheus.NewDesc("tulle_peer_transmit_packets_total",
		"Inner packets (IPv4 and IPv6) sent to the peer (the holder of the lease subnet at the public IP peer).",
		[]string{"peer", "subnet"}, nil)
	descPeerTxBytes = prometheus.NewDesc("tulle_peer_transmit_bytes_total",
		"Bytes of inner packets sent to the peer (without the outer IP and UDP headers).",
		[]string{"peer", "subnet"}, nil)
	descPeerRxPackets = prometheus.NewDesc("tulle_peer_receive_packets_total",
		"Inner packets (IPv4 and IPv6) received from the peer and accepted for delivery into the TUN device.",
		[]string{"peer", "subnet"}, nil)
	descPeerRxBytes = prometheus.NewDesc("tulle_peer_receive_bytes_total",
		"Bytes of inner packets received from the peer and accepted (without outer headers).",
		[]string{"peer", "subnet"}, nil)
	descDropped = prometheus.NewDesc("tulle_dropped_packets_total",
		"Packets the data plane dropped, by direction (transmit: TUN to UDP; receive: UDP to TUN), family of the inner packet (ipv4, ipv6; unknown: no IP version could be read, or the kernel dropped it at a socket or refused it on a TUN write) and reason (socket_drop: the kernel dropped the datagram at a data-plane socket before it was read, as its receive buffer was full or its UDP checksum failed).",
		[]string{"direction", "family", "reason"}, nil)
	descTunRead = prometheus.NewDesc("tulle_tun_read_batch_size",
		"Packets returned by the TUN reads of one batch (a TSO/USO superpacket counts the segments it is cut into).",
		nil, nil)
	descTunWrite = prometheus.NewDesc("tulle_tun_write_batch_size",
		"Packets handed to one TUN write, before the driver coalesces them.",
		nil, nil)
	descUDPReceive = prometheus.NewDesc("tulle_udp_receive_batch_size",
		"Datagrams returned by one receive batch (recvmmsg; GRO trains count each datagram).",
		nil, nil)
	descUDPSend = prometheus.NewDesc("tulle_udp_send_batch_size",
		"Datagrams passed to one send batch (sendmmsg; GSO trains count each datagram).",
		nil, nil)
	descSteerMisses = prometheus.NewDesc("tulle_receive_steering_misses_total",
		"Inner packets received by a data-plane worker other than the one the receive steering gives their flow to: the GRO train they came in was steered by another flow's packet, so their flow's packets were handled by two workers and may have been reordered. Tulle hosts send each flow in trains of its own; a receiver's GRO may still merge the datagrams of several flows (from flannel hosts, or on a NIC with UDP GRO).",
		nil, nil)
	descPeers = prometheus.NewDesc("tulle_peers",
		"Leases in the route table, our own excluded.",
		nil, nil)
)

// Collector returns a prometheus.Collector of the data plane's metrics. It
// reads the per-loop counters at scrape time; the data path never touches a
// Prometheus object. Counters of a peer start at 0 when it joins and
// disappear when its lease goes. Packets the kernel refused on a TUN write
// are included as receive/send_error, and datagrams the kernel dropped at
// the data-plane sockets before they were read as receive/socket_drop.
func (b *Backend) Collector() prometheus.Collector { return collector{b} }

type collector struct{ b *Backend }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		descPeerTxPackets, descPeerTxBytes, descPeerRxPackets, descPeerRxBytes,
		descDropped, descTunRead, descTunWrite, descUDPReceive, descUDPSend, descSteerMisses, descPeers,
	} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	b := c.b
	b.ctl.scrapes.RLock() // keeps the indices of t's peers from reuse
	defer b.ctl.scrapes.RUnlock()
	t := b.table.Load()
	ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, float64(t.count))

	txLoops, rxLoops := make([]*loopStats, 0, len(b.workers)), make([]*loopStats, 0, len(b.workers))
	for _, w := range b.workers {
		txLoops = append(txLoops, w.tx.stats)
		for _, rx := range w.receivers() {
			rxLoops = append(rxLoops, rx.stats)
		}
	}

	for p := range t.all() {
		labels := []string{p.addr.Addr().String(), p.subnet.String()}
		txp, txb := sumPeer(txLoops, p.index)
		rxp, rxb := sumPeer(rxLoops, p.index)
		ch <- prometheus.MustNewConstMetric(descPeerTxPackets, prometheus.CounterValue, float64(txp), labels...)
		ch <- prometheus.MustNewConstMetric(descPeerTxBytes, prometheus.CounterValue, float64(txb), labels...)
		ch <- prometheus.MustNewConstMetric(descPeerRxPackets, prometheus.CounterValue, float64(rxp), labels...)
		ch <- prometheus.MustNewConstMetric(descPeerRxBytes, prometheus.CounterValue, float64(rxb), labels...)
	}

	txDrops, rxDrops := sumDrops(txLoops), sumDrops(rxLoops)
	if b.dev != nil {
		rxDrops[famUnknown][dropSendError] += b.dev.Stats().WriteErrors
	}
	for _, w := range b.workers {
		for _, c := range w.conns() {
			if n, err := c.Drops(); err == nil { // fails only once closed
				rxDrops[famUnknown][dropSocket] += n
			}
		}
	}
	for f := range numFamilies {
		for r := range numDropReasons {
			ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(txDrops[f][r]), "transmit", f.String(), r.String())
			ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(rxDrops[f][r]), "receive", f.String(), r.String())
		}
	}

	var misses uint64
	for _, s := range rxLoops {
		misses += s.steerMisses.Load()
	}
	ch <- prometheus.MustNewConstMetric(descSteerMisses, prometheus.CounterValue, float64(misses))

	ch <- histogramMetric(descTunRead, txLoops, func(s *loopStats) *histogram { return &s.tun })
	ch <- histogramMetric(descUDPSend, txLoops, func(s *loopStats) *histogram { return &s.udp })
	ch <- histogramMetric(descUDPReceive, rxLoops, func(s *loopStats) *histogram { return &s.udp })
	ch <- histogramMetric(descTunWrite, rxLoops, func(s *loopStats) *histogram { return &s.tun })
}

func sumPeer(loops []*loopStats, index int) (packets, bytes uint64) {
	for _, s := range loops {
		if c := s.peerOrNil(index); c != nil {
			packets += c.packets.Load()
			bytes += c.bytes.Load()
		}
	}
	return packets, bytes
}

func sumDrops(loops []*loopStats) (d [numFamilies][numDropReasons]uint64) {
	for _, s := range loops {
		for f := range d {
			for r := range d[f] {
				d[f][r] += s.drops[f][r].Load()
			}
		}
	}
	return d
}

// histogramMetric sums one histogram over loops into a const histogram with
// buckets 1, 2, 4, ..., 1024 (cumulative, as Prometheus wants them).
func histogramMetric(d *prometheus.Desc, loops []*loopStats, h func(*loopStats) *histogram) prometheus.Metric {
	var counts [numBuckets]uint64
	var sum uint64
	for _, s := range loops {
		hist := h(s)
		for i := range counts {
			counts[i] += hist.buckets[i].Load()
		}
		sum += hist.sum.Load()
	}
	buckets := make(map[float64]uint64, numBuckets-1)
	var cum uint64
	for i := 0; i < numBuckets-1; i++ {
		cum += counts[i]
		buckets[float64(uint(1)<<i)] = cum
	}
	total := cum + counts[numBuckets-1]
	return prometheus.MustNewConstHistogram(d, total, float64(sum), buckets)
}
