package udp

import (
	"math/bits"
	"sync/atomic"

	"github.com/tulle-net/tulle/proto"
)

// Counters. Each TX and RX loop owns one loopStats and is its only writer;
// the Prometheus collector reads them at scrape time. Writers update them once
// per batch (per run of packets for one peer), with atomic adds: on amd64 an
// uncontended LOCK XADD on a cache line the loop owns, a few ns per batch, and
// `go test -race` stays clean, which plain fields with a racy reader would not.

// family is the IP version of a dropped packet, as its version nibble
// says; the names are the values of the family label of
// tulle_dropped_packets_total. famUnknown: no IP version could be read (an
// empty or unparseable datagram, a version nibble neither 4 nor 6, a
// datagram the kernel dropped at a socket, a packet the kernel refused on
// a TUN write).
type family uint8

const (
	famIPv4 family = iota
	famIPv6
	famUnknown
	numFamilies
)

var familyNames = [numFamilies]string{"ipv4", "ipv6", "unknown"}

func (f family) String() string { return familyNames[f] }

// familyOf is the family of the packet pkt by its version nibble.
func familyOf(pkt []byte) family {
	switch proto.Version(pkt) {
	case 4:
		return famIPv4
	case 6:
		return famIPv6
	}
	return famUnknown
}

// dropReason is why a packet was not forwarded; the names are the values of
// the reason label of tulle_dropped_packets_total.
type dropReason uint8

const (
	dropUnknownSender      dropReason = iota // datagram from an address that holds no lease
	dropSpoofedSource                        // inner source outside the sender's lease
	dropForeignDestination                   // inner destination outside our lease
	dropMalformed                            // not a well-formed IPv4 or IPv6 packet
	dropTruncated                            // did not fit the buffer, or shorter than it claims
	dropTTLExpired                           // TTL (hop limit) would reach 0
	dropNoRoute                              // no lease holds the destination (IPv6: none that carries IPv6)
	dropOversize                             // larger than the path carries (DF, IPv6: ICMP sent back)
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
	drops [numFamilies][numDropReasons]atomic.Uint64
	// tun is the TUN read (TX) or write (RX) batch size; udp the send (TX)
	// or receive (RX) batch size, in packets (GSO/GRO segments counted).
	tun, udp histogram
	// steerMisses (RX) counts packets received by this worker that the
	// steering program gives to another one (rxLoop.misses).
	steerMisses atomic.Uint64
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

// batchCounts accumulates a batch's drops locally, by family and reason;
// flush adds the non-zero ones to the loop's counters once per batch.
type batchCounts [numFamilies][numDropReasons]uint32

func (c *batchCounts) flush(s *loopStats) {
	if *c == (batchCounts{}) {
		return
	}
	for f := range c {
		for r, n := range c[f] {
			if n != 0 {
				s.drops[f][r].Add(uint64(n))
				c[f][r] = 0
			}
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
