package udp

import (
	"math/bits"
	"sync/atomic"
)

// Counters. Each TX and RX loop owns one loopStats and is its only writer;
// the Prometheus collector reads them at scrape time. Writers update them once
// per batch (per run of packets for one peer), with atomic adds: on amd64 an
// uncontended LOCK XADD on a cache line the loop owns, a few ns per batch, and
// `go test -race` stays clean, which plain fields with a racy reader would not.

// dropReason is why a packet was not forwarded; the names are the values of
// the reason label of tulle_dropped_packets_total.
type dropReason uint8

const (
	dropUnknownSender      dropReason = iota // datagram from an address that holds no lease
	dropSpoofedSource                        // inner source outside the sender's lease
	dropForeignDestination                   // inner destination outside our lease
	dropMalformed                            // not a well-formed IPv4 packet
	dropTruncated                            // did not fit the buffer, or shorter than it claims
	dropTTLExpired                           // TTL would reach 0
	dropNoRoute                              // no lease holds the destination
	dropOversize                             // larger than the path carries (DF: ICMP sent back)
	dropSendError                            // the socket or TUN refused it
	// dropSocket: the kernel dropped it at a data-plane socket before a
	// loop read it (receive buffer full, or a failed UDP checksum). Read
	// from the sockets at scrape time (udpconn.Conn.Drops), never counted
	// by the loops.
	dropSocket
	numDropReasons
)

var dropReasonNames = [numDropReasons]string{
	"unknown_sender", "spoofed_source", "foreign_destination", "malformed",
	"truncated", "ttl_expired", "no_route", "oversize", "send_error",
	"socket_drop",
}

func (r dropReason) String() string { return dropReasonNames[r] }

// Batch-size histograms: bucket i counts batches of at most 1<<i packets; the
// last bucket counts the rest (+Inf).
const numBuckets = 12 // 1, 2, 4, ..., 1024, +Inf

type histogram struct {
	buckets [numBuckets]atomic.Uint64 // not cumulative; the collector sums
	sum     atomic.Uint64
}

func (h *histogram) observe(n int) {
	if n <= 0 {
		return
	}
	i := min(bits.Len(uint(n-1)), numBuckets-1)
	h.buckets[i].Add(1)
	h.sum.Add(uint64(n))
}

// peerCounters are one direction's packets and bytes to or from one peer.
type peerCounters struct {
	packets atomic.Uint64
	bytes   atomic.Uint64
}

// peerChunkSize peers share one lazily allocated chunk, so that counters
// cost memory in proportion to the peers (16 bytes per peer and loop), and
// counters never move once allocated (the control side may zero them while
// a loop adds).
const peerChunkSize = 256

type peerChunk [peerChunkSize]peerCounters

// loopStats are the counters of one TX or RX loop.
type loopStats struct {
	drops [numDropReasons]atomic.Uint64
	// tun is the TUN read (TX) or write (RX) batch size; udp the send (TX)
	// or receive (RX) batch size, in packets (GSO/GRO segments counted).
	tun, udp histogram
	// chunks[i>>8][i&255] are the counters of the peer with index i. The
	// control side allocates chunks (and grows the directory, copying it)
	// before it publishes a table that uses them, so the data path never
	// allocates.
	chunks atomic.Pointer[[]*peerChunk]
	// steps is odd while the loop runs a step (it may hold a route table
	// and peers from it) and even between steps: the control side reuses a
	// departed peer's counter index only after every loop that was in a
	// step when the peer left has ended that step (see control.retire).
	steps atomic.Uint64
}

func newLoopStats() *loopStats {
	s := &loopStats{}
	s.chunks.Store(new([]*peerChunk))
	return s
}

// enterStep and leaveStep bracket one step of the loop, everything it does
// from loading the route table to adding the counters of its batch.
func (s *loopStats) enterStep() { s.steps.Add(1) }
func (s *loopStats) leaveStep() { s.steps.Add(1) }

// peer returns the counters of peer index i; the chunk must exist.
func (s *loopStats) peer(i int) *peerCounters {
	return &(*s.chunks.Load())[i/peerChunkSize][i%peerChunkSize]
}

// peerOrNil is peer for readers that may run before the chunk exists.
func (s *loopStats) peerOrNil(i int) *peerCounters {
	dir := *s.chunks.Load()
	if i/peerChunkSize >= len(dir) || dir[i/peerChunkSize] == nil {
		return nil
	}
	return &dir[i/peerChunkSize][i%peerChunkSize]
}

// prepare makes sure the counters of peer index i exist and are zero
// (control side, before a table that uses index i is published).
func (s *loopStats) prepare(i int) {
	dir := *s.chunks.Load()
	if c := i / peerChunkSize; c >= len(dir) {
		grown := make([]*peerChunk, c+1)
		copy(grown, dir)
		for k := len(dir); k <= c; k++ {
			grown[k] = new(peerChunk)
		}
		s.chunks.Store(&grown)
		return
	}
	c := &dir[i/peerChunkSize][i%peerChunkSize]
	c.packets.Store(0)
	c.bytes.Store(0)
}

// batchCounts accumulates a batch's drops locally; flush adds the non-zero
// ones to the loop's counters once per batch.
type batchCounts [numDropReasons]uint32

func (c *batchCounts) flush(s *loopStats) {
	for r, n := range c {
		if n != 0 {
			s.drops[r].Add(uint64(n))
			c[r] = 0
		}
	}
}

// peerRun accumulates packets and bytes for consecutive packets of one peer,
// so that counters are touched once per run, not once per packet.
type peerRun struct {
	p              *peer
	packets, bytes uint64
}

// add counts packets/bytes for p, flushing the previous run if p differs.
func (r *peerRun) add(s *loopStats, p *peer, packets, bytes int) {
	if r.p != p {
		r.flush(s)
		r.p = p
	}
	r.packets += uint64(packets)
	r.bytes += uint64(bytes)
}

func (r *peerRun) flush(s *loopStats) {
	if r.p != nil && r.packets != 0 {
		c := s.peer(r.p.index)
		c.packets.Add(r.packets)
		c.bytes.Add(r.bytes)
	}
	*r = peerRun{}
}
