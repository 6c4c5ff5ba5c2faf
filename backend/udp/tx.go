package udp

import (
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
	// txSlots is the most packets (or superpackets) one TX batch reads; it
	// stops earlier once txBatchBytes are read. Measured (tests/bench,
	// ratio to kernel VXLAN, 4 alternating runs each): batches of one 64
	// KiB superpacket 0.71x, of about three 0.72-0.74x at 7% less CPU per
	// GB, of up to eight 0.62x (the receiver idles while the sender reads).
	txSlots      = 8
	txBatchBytes = 192 << 10
	// txHeaderArena holds the headers of the segments of one batch (a 64
	// KiB superpacket of 1400-byte segments needs under 3 KiB); when it is
	// full the messages so far are sent.
	txHeaderArena = 32 << 10
	// txPieces is the pool of iovecs of one batch (a segment is two: its
	// headers and its payload).
	txPieces = 2048
	// txMessages is the most messages one batch sends at once.
	txMessages = 128
	// icmpBatch is the most ICMP errors one TX batch writes back; icmpRate
	// and icmpBurst bound them per loop (1 per ms, as Linux's icmp_ratelimit).
	icmpBatch = 8
	icmpRate  = time.Millisecond
	icmpBurst = 100
	// icmpBufLen holds the largest ICMP error built here: an ICMPv6 error
	// fills the IPv6 minimum MTU (an ICMPv4 one is at most 20 + 8 + 60 + 8).
	icmpBufLen = proto.IPv6MinMTU
)

// txLoop moves packets from the TUN queue to the socket without copying
// them: a message is a list of pieces (udpconn.Message.Iov) pointing into
// the read slots. A TSO/USO superpacket is cut with tundev.Split: each
// segment is its headers (built in the header arena) and its payload (a
// slice of the superpacket), and the segments to one peer go out as one
// UDP GSO train, which the kernel cuts at the segment size.
type txLoop struct {
	w     *worker
	stats *loopStats
	vnet  bool
	slots [][]byte // read buffers, one packet or superpacket each

	arena  []byte   // segment headers of this batch
	used   int      // bytes of arena in use
	pieces [][]byte // iovec pool of this batch
	npiece int      // pieces in use
	// out are the messages of this batch by underlay: out[underlay4] go
	// to the IPv4 socket, out[underlay6] to the IPv6 one.
	out   [2]outbox
	split tundev.Split

	maxSegs int
	flow    uint32 // flowKey of the packet or superpacket being handled
	bytes   int    // bytes read in this batch
	packets int    // packets read in this batch, a superpacket's segments counted

	icmp      [][]byte // ICMP errors to write back into the TUN (headroom + icmpBufLen each; the headroom is a zero virtio header)
	icmpOut   [][]byte // views of the filled ones
	icmpToken int
	icmpLast  time.Time
	icmpIov   [1][]byte

	drops batchCounts
	run   peerRun
}

// outbox is the messages of one batch for one of the worker's sockets.
type outbox struct {
	conn *udpconn.Conn
	msgs []udpconn.Message
	meta []train // meta[k] describes msgs[k]
}

// train describes msgs[k]: packets of one flow to one peer, all segSize
// bytes but the last, which may be shorter and then closes the train.
type train struct {
	peer    *peer
	flow    uint32 // flowKey of its packets
	packets int
	ipv6    int // how many of the packets are IPv6 (drops are counted by family)
	segSize int
	bytes   int
	first   int // index of its first piece in the pool
	closed  bool
}

// init allocates the TX loop's buffers; vnet tells whether the queue
// carries virtio headers, maxSegs is the socket's GSO segment limit.
func (tx *txLoop) init(w *worker, vnet bool, maxSegs int) {
	slotSize := tundev.ReadBufferSize
	if !vnet {
		slotSize = proto.MaxIPv4Len
	}
	*tx = txLoop{
		w:      w,
		stats:  newLoopStats(),
		vnet:   vnet,
		slots:  make([][]byte, txSlots),
		arena:  make([]byte, txHeaderArena),
		pieces: make([][]byte, txPieces),

		maxSegs: max(maxSegs, 1),
		icmp:    make([][]byte, icmpBatch),
		icmpOut: make([][]byte, 0, icmpBatch),
	}
	for i := range tx.slots {
		tx.slots[i] = make([]byte, slotSize)
	}
	for i, c := range []*udpconn.Conn{w.conn, w.conn6} {
		tx.out[i] = outbox{conn: c, msgs: make([]udpconn.Message, 0, txMessages), meta: make([]train, 0, txMessages)}
	}
	for i := range tx.icmp {
		tx.icmp[i] = make([]byte, headroom+icmpBufLen)
	}
}

// handle routes one read: a packet, or with a virtio header a packet or a
// superpacket, of either family. Drops are counted (an ICMP error may be
// queued).
func (tx *txLoop) handle(t *table, raw []byte) error {
	var h tundev.VirtioHdr
	pkt := raw
	if tx.vnet {
		if len(raw) <= tundev.VirtioHdrLen {
			tx.drops[famUnknown][dropMalformed]++
			return nil
		}
		h = tundev.DecodeVirtioHdr(raw)
		pkt = raw[tundev.VirtioHdrLen:]
	}
	tx.bytes += len(pkt)
	// n is what this read stands for in the counters: the packets that
	// would go out, a superpacket's segments as Split cuts them.
	n, gso := 1, h.GSOType != tundev.GSONone
	if gso {
		if err := tx.split.Init(h, pkt); err != nil {
			tx.packets++
			tx.drops[familyOf(pkt)][dropMalformed]++
			return nil
		}
		n = tx.split.Segments()
	}
	tx.packets += n
	// A train carries one flow: the receiver's steering (steer.go) picks
	// a worker for a whole GSO train by its first packet, so a train of
	// two flows would put the second flow's packets on that flow's
	// worker and the rest of them on another, where they could overtake
	// each other.
	tx.flow, _ = flowKey(pkt)
	// The one branch on the family: each forwards a packet or the
	// segments of a superpacket (Split checked it is exactly its IP length).
	switch proto.Version(pkt) {
	case 4:
		return tx.forward4(t, pkt, h, n, gso)
	case 6:
		return tx.forward6(t, pkt, h, n, gso)
	}
	tx.drops[famUnknown][dropMalformed] += uint32(n)
	return nil
}

// forward4 routes an IPv4 packet or superpacket (n packets, in the
// counters) and hands it to single or segments.
func (tx *txLoop) forward4(t *table, pkt []byte, h tundev.VirtioHdr, n int, gso bool) error {
	p, pkt := tx.route4(t, pkt, n)
	if p == nil {
		return nil
	}
	// A reserved bit that we did not set (an application's or a raw
	// socket's; RFC 791: must be zero) is cleared, so that no peer takes
	// it for our mark and trusts a checksum nobody checked (mark.go).
	clearMark(pkt)
	size := len(pkt)
	if gso {
		size = tx.split.SegmentSize()
	}
	ok, alone := tx.fits4(p, pkt, size, n)
	if !ok {
		return nil
	}
	partial := tx.w.b.partialWith(p)
	if gso {
		if partial {
			setMark(pkt) // Split copies it into every segment
		}
		return tx.segments(p, alone, partial, false)
	}
	if h.Flags&tundev.VirtioNeedsCsum != 0 {
		if partial && partialTransport(pkt) && int(h.CsumStart) == proto.IPv4HeaderLength(pkt) &&
			int(h.CsumOffset) == proto.TransportChecksumOffset(proto.IPv4Protocol(pkt)) {
			setMark(pkt)
		} else if err := tundev.CompleteChecksum(pkt, int(h.CsumStart), int(h.CsumOffset)); err != nil {
			tx.drops[famIPv4][dropMalformed]++
			return nil
		}
	}
	return tx.single(p, pkt, alone, false)
}

// forward6 is forward4 for IPv6: no fragmenting (an oversize packet gets
// Packet Too Big), and the partial-checksum mark is the payload length
// (mark.go), set in each segment.
func (tx *txLoop) forward6(t *table, pkt []byte, h tundev.VirtioHdr, n int, gso bool) error {
	p, pkt := tx.route6(t, pkt, n)
	if p == nil {
		return nil
	}
	size := len(pkt)
	if gso {
		size = tx.split.SegmentSize()
	}
	ok, alone := tx.fits6(p, pkt, size, n)
	if !ok {
		return nil
	}
	partial := tx.w.b.partialWith(p)
	if gso {
		return tx.segments(p, alone, partial, true)
	}
	if h.Flags&tundev.VirtioNeedsCsum != 0 {
		if partial && partialTransport6(pkt) && int(h.CsumStart) == proto.IPv6HeaderLen &&
			int(h.CsumOffset) == proto.TransportChecksumOffset(proto.IPv6NextHeader(pkt)) {
			markIPv6(pkt)
		} else if err := tundev.CompleteChecksum(pkt, int(h.CsumStart), int(h.CsumOffset)); err != nil {
			tx.drops[famIPv6][dropMalformed]++
			return nil
		}
	}
	return tx.single(p, pkt, alone, true)
}

// route4 checks pkt, decrements its TTL and finds the peer it goes to. It
// returns nil if pkt is dropped (counted n times; an ICMP error may be
// queued), else the peer and the packet trimmed to its IP length.
func (tx *txLoop) route4(t *table, pkt []byte, n int) (*peer, []byte) {
	d := &tx.drops[famIPv4]
	total, err := proto.CheckIPv4(pkt)
	if err != nil {
		d[dropMalformed] += uint32(n)
		return nil, nil
	}
	pkt = pkt[:total]
	if !proto.DecrementTTL(pkt) {
		d[dropTTLExpired] += uint32(n)
		return nil, nil
	}
	dst := proto.IPv4DstUint32(pkt)
	p := t.lookup(dst)
	if p == nil {
		d[dropNoRoute] += uint32(n)
		code := uint8(proto.ICMPv4CodeHostUnreach)
		if !t.inNetwork(dst) {
			code = proto.ICMPv4CodeNetUnreach
		}
		if buf := tx.icmpSlot(); buf != nil {
			m, err := proto.ICMPv4DestinationUnreachable(buf[headroom:], proto.IPv4Dst(pkt), pkt, code)
			tx.icmpQueue(buf, m, err)
		}
		return nil, nil
	}
	return p, pkt
}

// route6 is route4 for IPv6: the hop limit is decremented, and the peer
// is one that carries IPv6 (a flannel host is no route).
func (tx *txLoop) route6(t *table, pkt []byte, n int) (*peer, []byte) {
	d := &tx.drops[famIPv6]
	total, err := proto.CheckIPv6(pkt)
	if err != nil {
		d[dropMalformed] += uint32(n)
		return nil, nil
	}
	pkt = pkt[:total]
	if !proto.DecrementHopLimit(pkt) {
		d[dropTTLExpired] += uint32(n)
		return nil, nil
	}
	hi, lo := proto.IPv6DstWords(pkt)
	p := t.lookup6(hi, lo)
	if p == nil {
		d[dropNoRoute] += uint32(n)
		code := uint8(proto.ICMPv6CodeAddressUnreachable)
		if !t.inNetwork6(hi, lo) {
			code = proto.ICMPv6CodeNoRoute
		}
		if buf := tx.icmpSlot(); buf != nil {
			m, err := proto.ICMPv6DestinationUnreachable(buf[headroom:], proto.IPv6Dst(pkt), pkt, code)
			tx.icmpQueue(buf, m, err)
		}
		return nil, nil
	}
	return p, pkt
}

// fits4 applies the path MTU to a packet (or the segments of a
// superpacket, n of them) of size bytes to p: ok says whether to send it,
// alone that it must not join a GSO train (a non-DF packet above the path
// MTU, for the kernel to fragment). A DF packet that does not fit is
// counted and answered with ICMP "fragmentation needed".
func (tx *txLoop) fits4(p *peer, pkt []byte, size, n int) (ok, alone bool) {
	limit := int(p.innerMTU.Load())
	if limit == 0 || size <= limit {
		return true, false
	}
	if !proto.IPv4DontFragment(pkt) {
		return true, true
	}
	tx.drops[famIPv4][dropOversize] += uint32(n)
	if buf := tx.icmpSlot(); buf != nil {
		m, err := proto.ICMPv4FragmentationNeeded(buf[headroom:], proto.IPv4Dst(pkt), pkt, limit)
		tx.icmpQueue(buf, m, err)
	}
	return false, false
}

// fits6 is fits4 for IPv6, where nothing is fragmented on the way: a
// packet above the path MTU is counted and answered with ICMPv6 Packet Too
// Big, except one within the IPv6 minimum MTU, which every path must carry
// (RFC 8200 5): it goes alone and the kernel fragments the outer datagram.
func (tx *txLoop) fits6(p *peer, pkt []byte, size, n int) (ok, alone bool) {
	limit := int(p.innerMTU.Load())
	if limit == 0 || size <= limit {
		return true, false
	}
	if size <= proto.IPv6MinMTU {
		return true, true
	}
	tx.drops[famIPv6][dropOversize] += uint32(n)
	if buf := tx.icmpSlot(); buf != nil {
		m, err := proto.ICMPv6PacketTooBig(buf[headroom:], proto.IPv6Dst(pkt), pkt, limit)
		tx.icmpQueue(buf, m, err)
	}
	return false, false
}

// single forwards one packet (IPv6 if ipv6), its checksum already
// completed or marked partial by forward4/6.
func (tx *txLoop) single(p *peer, pkt []byte, alone, ipv6 bool) error {
	if err := tx.room(0, 1); err != nil {
		return err
	}
	tx.add(p, len(pkt), alone, ipv6, pkt, nil)
	return nil
}

// segments forwards the segments of the superpacket (IPv6 if ipv6) that
// handle gave to tx.split, with partial checksums if partial. With partial
// IPv6 each segment's header gets the mark; forward4 marked the IPv4
// superpacket's header, which every segment copies.
func (tx *txLoop) segments(p *peer, alone, partial, ipv6 bool) error {
	s := &tx.split
	hl := s.HeaderLen()
	for i := range s.Segments() {
		if err := tx.room(hl, 2); err != nil {
			return err
		}
		hdr := tx.arena[tx.used : tx.used+hl : tx.used+hl]
		tx.used += hl
		payload := s.Segment(i, hdr, partial)
		if partial && ipv6 {
			markIPv6(hdr)
		}
		tx.add(p, hl+len(payload), alone, ipv6, hdr, payload)
	}
	return nil
}

// room makes sure the batch has room for one more packet of hdrBytes
// header bytes and np pieces, possibly in a new message, by sending the
// batch so far if it has not.
func (tx *txLoop) room(hdrBytes, np int) error {
	if tx.used+hdrBytes > len(tx.arena) || tx.npiece+np > len(tx.pieces) ||
		len(tx.out[0].msgs) == cap(tx.out[0].msgs) || len(tx.out[1].msgs) == cap(tx.out[1].msgs) {
		return tx.send()
	}
	return nil
}

// add appends a packet of size bytes for p, given as one or two pieces
// (b may be nil), to the last train for p's underlay if it may join it
// (same peer, not longer than its segments, room left), else starts a new
// message. The caller made room.
func (tx *txLoop) add(p *peer, size int, alone, ipv6 bool, a, b []byte) {
	six := 0
	if ipv6 {
		six = 1
	}
	o := &tx.out[p.underlay]
	if k := len(o.msgs) - 1; k >= 0 && !alone {
		m, msg := &o.meta[k], &o.msgs[k]
		if m.peer == p && m.flow == tx.flow && !m.closed && size <= m.segSize && m.packets < tx.maxSegs && m.bytes+size <= maxGSOPayload {
			tx.putPieces(a, b)
			msg.Iov = tx.pieces[m.first:tx.npiece]
			m.packets++
			m.ipv6 += six
			m.bytes += size
			m.closed = size < m.segSize
			return
		}
	}
	if !p.active.Load() {
		p.active.Store(true)
		if !p.probed.Load() {
			tx.w.b.prober.poke()
		}
	}
	first := tx.npiece
	tx.putPieces(a, b)
	o.msgs = append(o.msgs, udpconn.Message{Iov: tx.pieces[first:tx.npiece], Addr: p.addr, SegSize: size})
	o.meta = append(o.meta, train{peer: p, flow: tx.flow, packets: 1, ipv6: six, segSize: size, bytes: size, first: first, closed: alone})
}

func (tx *txLoop) putPieces(a, b []byte) {
	tx.pieces[tx.npiece] = a
	tx.npiece++
	if b != nil {
		tx.pieces[tx.npiece] = b
		tx.npiece++
	}
}

// send sends the messages built so far, each outbox on its socket, counts
// the outcome per peer and frees the pools.
func (tx *txLoop) send() error {
	var err error
	packets, sending := 0, false
	for i := range tx.out {
		o := &tx.out[i]
		if len(o.msgs) == 0 {
			continue
		}
		sending = true
		sent, e := o.conn.WriteBatch(o.msgs)
		if err == nil {
			err = e
		}
		for k := range o.msgs {
			m := &o.meta[k]
			packets += m.packets
			if k >= sent || o.msgs[k].Err != 0 {
				tx.drops[famIPv4][dropSendError] += uint32(m.packets - m.ipv6)
				tx.drops[famIPv6][dropSendError] += uint32(m.ipv6)
				if k < sent && (o.msgs[k].Err == syscall.EMSGSIZE || o.msgs[k].Err == syscall.EINVAL) {
					m.peer.suspect.Store(true)
					tx.w.b.prober.poke()
				}
				continue
			}
			tx.run.add(tx.stats, m.peer, m.packets, m.bytes)
		}
		clear(o.msgs) // keep no references to packet buffers between batches
		o.msgs, o.meta = o.msgs[:0], o.meta[:0]
	}
	if sending {
		tx.run.flush(tx.stats)
		tx.stats.udp.observe(packets)
		clear(tx.pieces[:tx.npiece])
	}
	tx.used, tx.npiece = 0, 0
	return err
}

// flush ends a batch: counts what it read, sends it, adds its drops to
// the counters and writes its ICMP errors into the TUN.
func (tx *txLoop) flush() error {
	tx.stats.tun.observe(tx.packets)
	err := tx.send()
	tx.drops.flush(tx.stats)
	tx.writeICMP()
	tx.bytes, tx.packets = 0, 0
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
	for _, buf := range tx.icmpOut {
		if tx.vnet {
			tx.icmpIov[0] = buf // a zero virtio header, then the packet
		} else {
			tx.icmpIov[0] = buf[headroom:]
		}
		_ = tx.w.queue.WritePacket(tx.icmpIov[:])
	}
	tx.icmpIov[0] = nil
	clear(tx.icmpOut)
	tx.icmpOut = tx.icmpOut[:0]
}
