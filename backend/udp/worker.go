package udp

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/proto"
)

const (
	headroom = tundev.Headroom
	// maxGSOPayload is the most UDP payload one GSO send may carry (the
	// 16-bit IPv4 total length less the outer IPv4 and UDP headers).
	maxGSOPayload = proto.MaxIPv4Len - proto.EncapOverhead
	// icmpBatch is the most ICMP errors one TX batch writes back; icmpRate
	// and icmpBurst bound them per loop (1 per ms, as Linux's icmp_ratelimit).
	icmpBatch = 8
	icmpRate  = time.Millisecond
	icmpBurst = 100
	// icmpBufLen holds the largest ICMPv4 error built here (20 + 8 + 60 + 8).
	icmpBufLen = 128
)

// worker owns one TUN queue and one UDP socket and runs a TX and an RX loop
// on them. All buffers are allocated here, once.
type worker struct {
	id    int
	b     *Backend
	queue tundev.Queue
	conn  *udpconn.Conn
	// writeMu serializes TUN writes (a queue takes one writer at a time):
	// the RX loop's packets and the TX loop's ICMP errors.
	writeMu sync.Mutex
	tx      txLoop
	rx      rxLoop
}

// txLoop moves packets from the TUN queue to the socket.
//
// Read buffers overlap: packet i lands at arena[headroom+i*stride:], and the
// headroom of buffer i+1 is the tail of buffer i, which the drivers never
// write on Read. So full-size packets (a TSO superpacket split into MTU-sized
// segments) lie back to back and a train of them is sent with GSO in place;
// other trains are copied into the send arena.
type txLoop struct {
	w      *worker
	stats  *loopStats
	stride int // bytes between packet starts: the TUN MTU
	arena  []byte
	bufs   [][]byte
	sizes  []int
	send   []byte // trains of non-adjacent packets, copied
	used   int    // bytes of send in use in this batch

	msgs    []udpconn.Message
	meta    []train
	maxSegs int

	icmp      [][]byte // ICMP errors to write back into the TUN (headroom + icmpBufLen each)
	icmpOut   [][]byte // views of the filled ones
	icmpToken int
	icmpLast  time.Time

	drops batchCounts
	run   peerRun
}

// train describes msgs[k]: packets to one peer, all segSize bytes but the
// last, which may be shorter and then closes the train.
type train struct {
	peer    *peer
	packets int
	segSize int
	inPlace bool // msgs[k].Buf points into the read arena
	end     int  // arena offset just past its last packet, when in place
	closed  bool
}

// rxLoop moves datagrams from the socket to the TUN queue.
type rxLoop struct {
	w     *worker
	stats *loopStats
	msgs  []udpconn.Message // each Buf holds 64 KiB: a GRO train or the largest datagram
	wbufs [][]byte          // TUN write buffers, headroom + 64 KiB of capacity to coalesce into
	out   [][]byte          // views of the filled wbufs handed to Write
	drops batchCounts
	run   peerRun
}

func newWorker(b *Backend, id int, q tundev.Queue, conn *udpconn.Conn, maxPeers int) *worker {
	w := &worker{id: id, b: b, queue: q, conn: conn}
	w.tx.init(w, max(q.BatchSize(), 1), b.opts.MTU, conn.MaxSegments(), maxPeers)
	w.rx.init(w, maxPeers)
	return w
}

// init allocates the TX loop's buffers: batch packets of at most mtu bytes,
// GSO trains of at most maxSegs segments.
func (tx *txLoop) init(w *worker, batch, mtu, maxSegs, maxPeers int) {
	*tx = txLoop{
		w:       w,
		stats:   newLoopStats(maxPeers),
		stride:  mtu,
		arena:   make([]byte, headroom+batch*mtu),
		bufs:    make([][]byte, batch),
		sizes:   make([]int, batch),
		send:    make([]byte, batch*mtu),
		msgs:    make([]udpconn.Message, 0, batch),
		meta:    make([]train, 0, batch),
		maxSegs: max(maxSegs, 1),
		icmp:    make([][]byte, icmpBatch),
		icmpOut: make([][]byte, 0, icmpBatch),
	}
	for i := range tx.bufs {
		end := headroom + (i+1)*mtu
		tx.bufs[i] = tx.arena[i*mtu : end : end]
	}
	for i := range tx.icmp {
		tx.icmp[i] = make([]byte, headroom+icmpBufLen)
	}
}

// init allocates the RX loop's buffers.
func (rx *rxLoop) init(w *worker, maxPeers int) {
	*rx = rxLoop{
		w:     w,
		stats: newLoopStats(maxPeers),
		msgs:  make([]udpconn.Message, rxMessages),
		wbufs: make([][]byte, tunWriteBatch),
		out:   make([][]byte, 0, tunWriteBatch),
	}
	for i := range rx.msgs {
		rx.msgs[i].Buf = make([]byte, udpconn.GROBufferSize)
	}
	for i := range rx.wbufs {
		rx.wbufs[i] = make([]byte, headroom+proto.MaxIPv4Len)
	}
}

// loopErr turns an I/O error into the loop's result: nil while the backend
// is shutting down (closing the device and sockets is how loops are
// stopped), else the error naming the worker.
func (w *worker) loopErr(op string, err error) error {
	if w.b.stopping.Load() {
		return nil
	}
	return fmt.Errorf("worker %d: %s: %w", w.id, op, err)
}

// writeTUN writes bufs to the TUN queue, one writer at a time.
func (w *worker) writeTUN(bufs [][]byte) error {
	w.writeMu.Lock()
	defer w.writeMu.Unlock()
	_, err := w.queue.Write(bufs, headroom)
	return err
}

// ---- TX: TUN -> UDP ----

// runTX reads batches from the TUN queue and forwards them until the queue
// or the socket fails or is closed.
func (w *worker) runTX() error {
	tx := &w.tx
	for {
		n, err := w.queue.Read(tx.bufs, tx.sizes, headroom)
		if err != nil {
			return w.loopErr("tun read", err)
		}
		tx.stats.tun.observe(n)
		if err := tx.forward(w.b.table.Load(), n); err != nil {
			return w.loopErr("udp send", err)
		}
	}
}

// forward routes the n packets just read, sends them in GSO trains, and
// writes the ICMP errors it made back into the TUN.
func (tx *txLoop) forward(t *table, n int) error {
	tx.msgs, tx.meta, tx.used = tx.msgs[:0], tx.meta[:0], 0
	for i := 0; i < n; i++ {
		pos := headroom + i*tx.stride
		pkt := tx.arena[pos : pos+tx.sizes[i]]
		if p, pkt, alone := tx.route(t, pkt); p != nil {
			tx.add(p, pos, pkt, alone)
		}
	}
	err := tx.sendBatch()
	tx.drops.flush(tx.stats)
	tx.writeICMP()
	return err
}

// route checks pkt, decrements its TTL and finds the peer it goes to. It
// returns nil if pkt is dropped (counted; an ICMP error may be queued), else
// the peer, the packet trimmed to its IP length, and alone = it must not
// join a GSO train (a non-DF packet above the path MTU, for the kernel to
// fragment).
func (tx *txLoop) route(t *table, pkt []byte) (p *peer, _ []byte, alone bool) {
	total, err := proto.CheckIPv4(pkt)
	if err != nil {
		if proto.Version(pkt) == 6 {
			tx.drops[dropNoRoute]++ // IPv6 is not carried by flannel's udp backend
		} else {
			tx.drops[dropMalformed]++
		}
		return nil, nil, false
	}
	pkt = pkt[:total]
	if !proto.DecrementTTL(pkt) {
		tx.drops[dropTTLExpired]++
		return nil, nil, false
	}
	dst := proto.IPv4DstUint32(pkt)
	if p = t.lookup(dst); p == nil {
		tx.drops[dropNoRoute]++
		code := uint8(proto.ICMPv4CodeHostUnreach)
		if !t.inNetwork(dst) {
			code = proto.ICMPv4CodeNetUnreach
		}
		if buf := tx.icmpSlot(); buf != nil {
			n, err := proto.ICMPv4DestinationUnreachable(buf[headroom:], proto.IPv4Dst(pkt), pkt, code)
			tx.icmpQueue(buf, n, err)
		}
		return nil, nil, false
	}
	if limit := int(p.innerMTU.Load()); limit != 0 && total > limit {
		if !proto.IPv4DontFragment(pkt) {
			return p, pkt, true
		}
		tx.drops[dropOversize]++
		if buf := tx.icmpSlot(); buf != nil {
			n, err := proto.ICMPv4FragmentationNeeded(buf[headroom:], proto.IPv4Dst(pkt), pkt, limit)
			tx.icmpQueue(buf, n, err)
		}
		return nil, nil, false
	}
	return p, pkt, false
}

// add appends pkt (at arena offset pos) for p to the last train if it may
// join it (same peer, not longer than its segments, room left), else starts
// a new message.
func (tx *txLoop) add(p *peer, pos int, pkt []byte, alone bool) {
	size := len(pkt)
	if k := len(tx.msgs) - 1; k >= 0 && !alone {
		m, msg := &tx.meta[k], &tx.msgs[k]
		if m.peer == p && !m.closed && size <= m.segSize && m.packets < tx.maxSegs && len(msg.Buf)+size <= maxGSOPayload {
			if m.inPlace && pos == m.end {
				msg.Buf = tx.arena[pos-len(msg.Buf) : pos+size]
			} else {
				if m.inPlace {
					msg.Buf = tx.copyOut(msg.Buf)
					m.inPlace = false
				}
				// The train is the last thing in the send arena: grow it.
				msg.Buf = msg.Buf[:len(msg.Buf)+copy(tx.send[tx.used:], pkt)]
				tx.used += size
			}
			m.packets++
			m.end = pos + size
			m.closed = size < m.segSize
			msg.SegSize = m.segSize
			return
		}
	}
	if !p.active.Load() {
		p.active.Store(true)
		if !p.probed.Load() {
			tx.w.b.prober.poke()
		}
	}
	tx.msgs = append(tx.msgs, udpconn.Message{Buf: pkt, Addr: p.addr})
	tx.meta = append(tx.meta, train{peer: p, packets: 1, segSize: size, inPlace: true, end: pos + size, closed: alone})
}

// copyOut copies b to the end of the send arena and returns the copy.
func (tx *txLoop) copyOut(b []byte) []byte {
	start := tx.used
	tx.used += copy(tx.send[start:], b)
	return tx.send[start:tx.used:len(tx.send)]
}

// sendBatch sends the batch's messages and counts the outcome per peer.
func (tx *txLoop) sendBatch() error {
	if len(tx.msgs) == 0 {
		return nil
	}
	sent, err := tx.w.conn.WriteBatch(tx.msgs)
	packets := 0
	for k := range tx.msgs {
		m := &tx.meta[k]
		packets += m.packets
		if k >= sent || tx.msgs[k].Err != 0 {
			tx.drops[dropSendError] += uint32(m.packets)
			if k < sent && (tx.msgs[k].Err == syscall.EMSGSIZE || tx.msgs[k].Err == syscall.EINVAL) {
				m.peer.suspect.Store(true)
				tx.w.b.prober.poke()
			}
			continue
		}
		tx.run.add(tx.stats, m.peer, m.packets, len(tx.msgs[k].Buf))
	}
	tx.run.flush(tx.stats)
	tx.stats.udp.observe(packets)
	clear(tx.msgs) // keep no references to packet buffers between batches
	return err
}

// icmpSlot returns a free ICMP buffer if the batch and the rate limit allow
// one more ICMP error, else nil.
func (tx *txLoop) icmpSlot() []byte {
	if len(tx.icmpOut) == len(tx.icmp) {
		return nil
	}
	if tx.icmpToken == 0 {
		now := time.Now()
		refill := int(now.Sub(tx.icmpLast) / icmpRate)
		if refill <= 0 {
			return nil
		}
		tx.icmpToken, tx.icmpLast = min(refill, icmpBurst), now
	}
	tx.icmpToken--
	return tx.icmp[len(tx.icmpOut)]
}

// icmpQueue queues the n-byte ICMP error just built in buf.
func (tx *txLoop) icmpQueue(buf []byte, n int, err error) {
	if err == nil {
		tx.icmpOut = append(tx.icmpOut, buf[:headroom+n])
	}
}

// writeICMP writes the batch's ICMP errors into the TUN (best effort: a
// failure here is the device going away, which the read loop reports).
func (tx *txLoop) writeICMP() {
	if len(tx.icmpOut) == 0 {
		return
	}
	_ = tx.w.writeTUN(tx.icmpOut)
	clear(tx.icmpOut)
	tx.icmpOut = tx.icmpOut[:0]
}

// ---- RX: UDP -> TUN ----

// runRX receives batches from the socket and delivers them until the
// socket or the queue fails or is closed.
func (w *worker) runRX() error {
	rx := &w.rx
	for {
		n, err := w.conn.ReadBatch(rx.msgs)
		if err != nil {
			return w.loopErr("udp receive", err)
		}
		if err := rx.deliver(w.b.table.Load(), n); err != nil {
			return w.loopErr("tun write", err)
		}
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
			rx.drops[dropTruncated]++
			continue
		}
		src, _ := proto.AddrUint32(m.Addr.Addr())
		if m.N == 0 {
			rx.reject(t, src, dropMalformed)
			continue
		}
		seg := m.SegSize
		if seg <= 0 || seg > m.N {
			seg = m.N
		}
		for off := 0; off < m.N && err == nil; off += seg {
			packets++
			err = rx.accept(t, src, m.Buf[off:min(off+seg, m.N)])
		}
	}
	if err == nil {
		err = rx.flush()
	}
	rx.stats.udp.observe(packets)
	rx.run.flush(rx.stats)
	rx.drops.flush(rx.stats)
	return err
}

// accept applies the trust checks to one datagram from src and queues it
// for the TUN. The error is the TUN's (only when it is closed or gone).
func (rx *rxLoop) accept(t *table, src uint32, pkt []byte) error {
	total, err := proto.CheckIPv4(pkt)
	if err != nil || total != len(pkt) || !proto.IPv4HeaderChecksumValid(pkt) {
		reason := dropMalformed
		if errors.Is(err, proto.ErrShort) && len(pkt) >= proto.IPv4HeaderLen {
			reason = dropTruncated // shorter than its IP header says
		}
		rx.reject(t, src, reason)
		return nil
	}
	p := t.lookup(proto.IPv4SrcUint32(pkt))
	if p == nil || p.public != src {
		rx.reject(t, src, dropSpoofedSource)
		return nil
	}
	if !t.isOwn(proto.IPv4DstUint32(pkt)) {
		rx.drops[dropForeignDestination]++
		return nil
	}
	if !proto.DecrementTTL(pkt) {
		rx.drops[dropTTLExpired]++
		return nil
	}
	k := len(rx.out)
	rx.out = append(rx.out, rx.wbufs[k][:headroom+copy(rx.wbufs[k][headroom:], pkt)])
	rx.run.add(rx.stats, p, 1, len(pkt))
	if len(rx.out) == len(rx.wbufs) {
		return rx.flush()
	}
	return nil
}

// reject counts a dropped datagram: as unknown_sender if src holds no
// lease, whatever else is wrong with it, else for reason.
func (rx *rxLoop) reject(t *table, src uint32, reason dropReason) {
	if !t.isSender(src) {
		reason = dropUnknownSender
	}
	rx.drops[reason]++
}

// flush writes the queued packets into the TUN.
func (rx *rxLoop) flush() error {
	if len(rx.out) == 0 {
		return nil
	}
	rx.stats.tun.observe(len(rx.out))
	err := rx.w.writeTUN(rx.out)
	rx.out = rx.out[:0]
	return err
}
