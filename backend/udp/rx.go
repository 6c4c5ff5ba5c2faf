package udp

import (
	"errors"
	"net/netip"

	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/proto"
)

// rxMessages is the number of datagrams (GRO trains) one receive batch
// takes; each buffer holds 64 KiB.
const rxMessages = 16

// rxLoop moves datagrams from the socket to the TUN queue without copying
// them: the accepted packets of a GRO train are handed, as slices of the
// receive buffer, to a tundev.Coalescer, which merges the segments of a
// flow into one TUN write (virtio GSO) gathered from those slices.
type rxLoop struct {
	w       *worker
	conn    *udpconn.Conn // the socket it reads
	stats   *loopStats
	vnet    bool
	msgs    []udpconn.Message // each Buf holds 64 KiB: a GRO train or the largest datagram
	co      *tundev.Coalescer // with a virtio header
	one     [1][]byte         // without: one packet per write
	written int               // packets written into the TUN in this batch
	drops   batchCounts
	run     peerRun
	// group is the size of the socket's SO_REUSEPORT group when the
	// steering program picks its sockets (steer.go), else 0; misses
	// counts this batch's packets that the program gives to another
	// worker (their GRO train was steered by another flow's packet).
	group  int
	misses uint32
}

// init allocates the RX loop's buffers for reading conn; udpGRO enables
// merging UDP (the device took USO).
func (rx *rxLoop) init(w *worker, conn *udpconn.Conn, vnet, udpGRO bool) {
	*rx = rxLoop{
		w:     w,
		conn:  conn,
		stats: newLoopStats(),
		vnet:  vnet,
		msgs:  make([]udpconn.Message, rxMessages),
		co:    tundev.NewCoalescer(udpGRO),
	}
	for i := range rx.msgs {
		rx.msgs[i].Buf = make([]byte, udpconn.GROBufferSize)
	}
}

// deliver checks each datagram of the n messages received (a GRO train is
// split into its datagrams) and writes the accepted ones into the TUN.
func (rx *rxLoop) deliver(t *table, n int) error {
	packets := 0
	var err error
	for i := range rx.msgs[:n] {
		m := &rx.msgs[i]
		if m.Truncated {
			rx.drops[famUnknown][dropTruncated]++
			continue
		}
		src := m.Addr.Addr()
		if m.N == 0 {
			rx.reject(t, src, famUnknown, dropMalformed)
			continue
		}
		seg := m.SegSize
		if seg <= 0 || seg > m.N {
			seg = m.N
		}
		for off := 0; off < m.N && err == nil; off += seg {
			packets++
			pkt := m.Buf[off:min(off+seg, m.N)]
			if p, partial := rx.accept(t, src, pkt); p != nil {
				if rx.group > 0 {
					if k, ok := flowKey(pkt); ok && steerIndex(k, rx.group) != rx.w.id {
						rx.misses++
					}
				}
				rx.run.add(rx.stats, p, 1, len(pkt))
				err = rx.write(pkt, partial)
			}
		}
	}
	if rx.misses > 0 { // counted before the batch is written
		rx.stats.steerMisses.Add(uint64(rx.misses))
		rx.misses = 0
	}
	if err == nil {
		err = rx.flush()
	}
	rx.stats.udp.observe(packets)
	rx.stats.tun.observe(rx.written)
	rx.written = 0
	rx.run.flush(rx.stats)
	rx.drops.flush(rx.stats)
	return err
}

// accept applies the trust checks of the packet's family to one datagram
// from src and decrements its TTL or hop limit. It returns the peer it
// came from, or nil if it is dropped (counted), and whether its transport
// checksum is partial (marked, and both leases advertise partial
// checksums; the mark is then removed here).
func (rx *rxLoop) accept(t *table, src netip.Addr, pkt []byte) (_ *peer, partial bool) {
	switch proto.Version(pkt) {
	case 4:
		return rx.accept4(t, src, pkt)
	case 6:
		return rx.accept6(t, src, pkt)
	}
	rx.reject(t, src, famUnknown, dropMalformed)
	return nil, false
}

// accept4: the sender holds the lease of the inner source, the inner
// destination is in ours, the IPv4 header is whole and its checksum right.
func (rx *rxLoop) accept4(t *table, src netip.Addr, pkt []byte) (_ *peer, partial bool) {
	d := &rx.drops[famIPv4]
	total, err := proto.CheckIPv4(pkt)
	if err != nil || total != len(pkt) || !proto.IPv4HeaderChecksumValid(pkt) {
		reason := dropMalformed
		if errors.Is(err, proto.ErrShort) && len(pkt) >= proto.IPv4HeaderLen {
			reason = dropTruncated // shorter than its IP header says
		}
		rx.reject(t, src, famIPv4, reason)
		return nil, false
	}
	p := t.lookup(proto.IPv4SrcUint32(pkt))
	if p == nil || !p.sentFrom(src) {
		rx.reject(t, src, famIPv4, dropSpoofedSource)
		return nil, false
	}
	if !t.isOwn(proto.IPv4DstUint32(pkt)) {
		d[dropForeignDestination]++
		return nil, false
	}
	if !proto.DecrementTTL(pkt) {
		d[dropTTLExpired]++
		return nil, false
	}
	if marked(pkt) && rx.w.b.partialWith(p) {
		if !partialTransport(pkt) {
			d[dropMalformed]++ // only TCP and UDP are ever marked
			return nil, false
		}
		clearMark(pkt)
		partial = true
	}
	return p, partial
}

// accept6: the sender holds the IPv6 lease of the inner source and
// carries IPv6 (a flannel host never does), the inner destination is in
// our IPv6 lease, the packet is exactly its length (or marked, mark.go).
// Only the fixed header is read: extension headers are the destination's.
func (rx *rxLoop) accept6(t *table, src netip.Addr, pkt []byte) (_ *peer, partial bool) {
	d := &rx.drops[famIPv6]
	total, err := proto.CheckIPv6(pkt)
	mark := err == nil && markedIPv6(pkt)
	if err != nil || (total != len(pkt) && !mark) {
		reason := dropMalformed
		if errors.Is(err, proto.ErrShort) && len(pkt) >= proto.IPv6HeaderLen {
			reason = dropTruncated // shorter than its payload length says
		}
		rx.reject(t, src, famIPv6, reason)
		return nil, false
	}
	p := t.lookup6(proto.IPv6SrcWords(pkt))
	if p == nil || !p.sentFrom(src) {
		rx.reject(t, src, famIPv6, dropSpoofedSource)
		return nil, false
	}
	if !t.isOwn6(proto.IPv6DstWords(pkt)) {
		d[dropForeignDestination]++
		return nil, false
	}
	if !proto.DecrementHopLimit(pkt) {
		d[dropTTLExpired]++
		return nil, false
	}
	if mark {
		if !rx.w.b.partialWith(p) || !partialTransport6(pkt) {
			d[dropMalformed]++ // a mark we do not take: its length is wrong
			return nil, false
		}
		unmarkIPv6(pkt)
		partial = true
	}
	return p, partial
}

// reject counts a dropped datagram of family f: as unknown_sender if src
// holds no lease, whatever else is wrong with it, else for reason.
func (rx *rxLoop) reject(t *table, src netip.Addr, f family, reason dropReason) {
	if !t.isSender(src) {
		reason = dropUnknownSender
	}
	rx.drops[f][reason]++
}

// write queues pkt for the TUN: with a virtio header into the coalescer
// (writing the group it cannot join), else written at once, its partial
// checksum completed here.
func (rx *rxLoop) write(pkt []byte, partial bool) error {
	rx.written++
	if rx.vnet {
		if rx.co.Add(pkt, partial) {
			return nil
		}
		if err := rx.flush(); err != nil {
			return err
		}
		rx.co.Add(pkt, partial)
		return nil
	}
	if partial {
		start, off := transportAt(pkt)
		_ = tundev.CompleteChecksum(pkt, start, off) // partialTransport(6) checked the room
	}
	rx.one[0] = pkt
	err := rx.w.queue.WritePacket(rx.one[:])
	rx.one[0] = nil
	return err
}

// flush writes the pending coalesced group, if any.
func (rx *rxLoop) flush() error {
	if !rx.co.Pending() {
		return nil
	}
	err := rx.w.queue.WritePacket(rx.co.Group())
	rx.co.Reset()
	return err
}
