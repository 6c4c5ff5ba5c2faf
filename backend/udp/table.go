package udp

import (
	"iter"
	"math/bits"
	"net/netip"
	"slices"
	"sync/atomic"

	"github.com/tulle-net/tulle/proto"
)

// peer is the holder of one lease other than ours. The control side keeps
// the same *peer for as long as the lease's subnets, addresses and
// features that decide how we reach it stay the same, so its counters and
// learned path MTU survive table updates. A peer is found by its IPv4
// lease in the IPv4 table and, if we carry IPv6 to it, by its IPv6 lease in
// the IPv6 table: the same *peer, so its counters count both families.
type peer struct {
	reach
	subnet netip.Prefix // its IPv4 lease
	// subnet6 is its IPv6 lease while it is in the IPv6 table (we carry
	// IPv6 to it: see grantIPv6), else zero: only then is it ever sent, or
	// accepted from, an inner IPv6 packet.
	subnet6 netip.Prefix
	index   int // compact index of its counters, unique among current peers

	// innerMTU is the largest inner packet the underlay path to this peer
	// carries (path MTU - 28, or - 48 on the IPv6 underlay), learned on the
	// slow path; 0 = no limit known below the TUN MTU.
	innerMTU atomic.Int32
	// active is set by the TX path when it sends to the peer and cleared by
	// the path-MTU prober that then looks at the peer.
	active atomic.Bool
	// probed is set once the prober has looked at the peer.
	probed atomic.Bool
	// suspect is set by the TX path when a send to the peer failed in a way
	// that says the path MTU shrank (EMSGSIZE, EINVAL from GSO).
	suspect atomic.Bool
	// partialCsum: the peer advertises FeaturePartialChecksum in its lease;
	// with our own lease advertising it too, partial checksums travel
	// marked both ways (Backend.partialWith, mark.go).
	partialCsum atomic.Bool
}

// sentFrom reports whether a datagram from underlay address src is the
// peer's: from its PublicIP or its PublicIPv6.
func (p *peer) sentFrom(src netip.Addr) bool { return src == p.public || src == p.public6 }

// The route tables are three-level radix trees over the subnet number n
// of an address: for IPv4 (addr - network) >> (32 - SubnetLen), for IPv6
// the same over 128 bits, the bits between the network's length and the
// lease length. top[n>>12] is a node of 256 pages, each of 16 slots. A
// lookup is three dependent loads and no branch but one bounds check
// (absent nodes and pages point to shared empty ones, never nil). Memory
// follows the leases, not the network: a page exists only where a lease
// does, a node only where a page does, and the top level is at most 1,024
// pointers (maxSubnets, for either family). Leases spread thinly over the
// largest network (10,000 in a /8 of /30s) cost 128 B of page each plus 2
// KiB per node, 3.3 MiB in all; 16-slot pages and 256-entry nodes are the
// split that costs least there. A table is never changed once published:
// an update copies the top levels and the nodes and pages it touches and
// shares all the rest with the table before it, so it costs O(changes),
// not O(leases).
const (
	leafBits = 4
	leafSize = 1 << leafBits
	nodeBits = 8
	nodeSize = 1 << nodeBits
	topShift = leafBits + nodeBits // subnet-number bits below one top entry
)

type leaf [leafSize]*peer
type node [nodeSize]*leaf

// emptyLeaf and emptyNode stand for absent pages and nodes; never written.
var (
	emptyLeaf = new(leaf)
	emptyNode = func() *node {
		n := new(node)
		for i := range n {
			n[i] = emptyLeaf
		}
		return n
	}()
)

// radix is the tree of one family's leases by subnet number.
type radix struct {
	top []*node // len = subnets / 4096 rounded up; no nil entries
}

func newRadix(subnets uint64) radix {
	r := radix{top: make([]*node, (subnets+1<<topShift-1)>>topShift)}
	for i := range r.top {
		r.top[i] = emptyNode
	}
	return r
}

// get returns the peer in slot n, nil if none. Numbers past the last subnet
// but within the last top entry land on slots no lease can fill.
func (r *radix) get(n uint32) *peer {
	i := n >> topShift
	if i >= uint32(len(r.top)) {
		return nil
	}
	return r.top[i][n>>leafBits&(nodeSize-1)][n&(leafSize-1)]
}

// all yields every peer of the tree in subnet order, walking the populated
// pages: O(peers).
func (r *radix) all(yield func(*peer) bool) bool {
	for _, nd := range r.top {
		if nd == emptyNode {
			continue
		}
		for _, lf := range nd {
			if lf == emptyLeaf {
				continue
			}
			for _, p := range lf {
				if p != nil && !yield(p) {
					return false
				}
			}
		}
	}
	return true
}

// space4 is the IPv4 network and our IPv4 lease.
type space4 struct {
	network uint32 // first address of the overlay network
	shift   uint8  // 32 - SubnetLen: address bits inside one lease
	subnets uint32 // number of subnets in the network
	ownNet  uint32 // our lease, as network address and mask
	ownMask uint32
}

func (s *space4) number(addr uint32) uint32 { return (addr - s.network) >> s.shift }

// space6 is the IPv6 network and our IPv6 lease, addresses as two 64-bit
// words; subnets is 0 when IPv6 is off (nothing is in the network).
type space6 struct {
	netHi, netLo   uint64
	shift          uint // 128 - IPv6SubnetLen
	subnets        uint64
	ownHi, ownLo   uint64
	maskHi, maskLo uint64
}

// number returns the subnet number of the address hi:lo; ok is false when
// the address lies outside the network.
func (s *space6) number(hi, lo uint64) (n uint64, ok bool) {
	dlo, borrow := bits.Sub64(lo, s.netLo, 0)
	dhi, _ := bits.Sub64(hi, s.netHi, borrow)
	// (dhi:dlo) >> shift, shift in [2, 126]: Go shifts of 64 and more give
	// 0, so one expression serves shifts below and above 64.
	k := s.shift
	n = dlo>>k | dhi<<(64-k) | dhi>>(k-64)
	return n, dhi>>k == 0 && n < s.subnets
}

// table is an immutable route table: the leases of the network, indexed by
// subnet number, one tree per family. Workers load the current one once
// per batch; the control side derives a new one from it on every lease
// change (edit) and swaps it in.
type table struct {
	space4
	v4 radix // every peer, by IPv4 lease
	v6 space6
	r6 radix // the peers we carry IPv6 to, by IPv6 lease
	// senders are the underlay addresses of all peers (PublicIP and
	// PublicIPv6), to tell an unknown sender from a known one sending a
	// spoofed source (drop path only).
	senders senderSet
	count   int // number of peers
}

// newTable returns the empty table of network (leases of length
// subnetLen) with our own lease own, and if network6 is valid of the IPv6
// network (leases of length subnetLen6) with our IPv6 lease own6.
func newTable(network netip.Prefix, subnetLen int, own netip.Prefix, network6 netip.Prefix, subnetLen6 int, own6 netip.Prefix) *table {
	net32, _ := proto.AddrUint32(network.Addr())
	own32, _ := proto.AddrUint32(own.Addr())
	subnets := uint32(1) << (subnetLen - network.Bits())
	t := &table{
		space4: space4{
			network: net32,
			shift:   uint8(32 - subnetLen),
			subnets: subnets,
			ownNet:  own32,
			ownMask: ^uint32(0) << (32 - subnetLen),
		},
		v4:      newRadix(uint64(subnets)),
		v6:      space6{shift: 64}, // no IPv6: no address is in the network
		senders: senderSet{top: new(senderTop)},
	}
	if network6.IsValid() {
		hi, lo, _ := proto.AddrWords(network6.Addr())
		ohi, olo, _ := proto.AddrWords(own6.Addr())
		mhi, mlo := prefixMask(subnetLen6)
		t.v6 = space6{
			netHi: hi, netLo: lo,
			shift:   uint(128 - subnetLen6),
			subnets: uint64(1) << (subnetLen6 - network6.Bits()),
			ownHi:   ohi, ownLo: olo,
			maskHi: mhi, maskLo: mlo,
		}
	}
	t.r6 = newRadix(t.v6.subnets)
	return t
}

// newTableFor is the empty table of the networks and leases of o.
func newTableFor(o *Options) *table {
	return newTable(o.Network, o.SubnetLen, o.Lease.Subnet, o.IPv6Network, o.IPv6SubnetLen, o.Lease.IPv6Subnet)
}

// prefixMask returns the mask of an IPv6 prefix of length bits.
func prefixMask(bits int) (hi, lo uint64) {
	ones := ^uint64(0)
	if bits <= 64 {
		return ^(ones >> bits), 0 // bits = 0: no mask
	}
	return ones, ^(ones >> (bits - 64))
}

// lookup returns the peer whose IPv4 lease holds addr, or nil when addr is
// outside the network, in our own lease or in a subnet no one holds. O(1).
func (t *table) lookup(addr uint32) *peer {
	// Below the network the subtraction wraps to a number past the end.
	return t.v4.get(t.number(addr))
}

// inNetwork reports whether addr lies in the IPv4 overlay network.
func (t *table) inNetwork(addr uint32) bool { return t.number(addr) < t.subnets }

// isOwn reports whether addr lies in our own IPv4 lease.
func (t *table) isOwn(addr uint32) bool { return addr&t.ownMask == t.ownNet }

// lookup6 returns the peer whose IPv6 lease holds the address hi:lo and
// that we carry IPv6 to, or nil. O(1).
func (t *table) lookup6(hi, lo uint64) *peer {
	n, ok := t.v6.number(hi, lo)
	if !ok {
		return nil
	}
	return t.r6.get(uint32(n))
}

// inNetwork6 reports whether hi:lo lies in the IPv6 overlay network.
func (t *table) inNetwork6(hi, lo uint64) bool {
	_, ok := t.v6.number(hi, lo)
	return ok
}

// isOwn6 reports whether hi:lo lies in our own IPv6 lease (never, with
// IPv6 off).
func (t *table) isOwn6(hi, lo uint64) bool {
	v := &t.v6
	return v.subnets != 0 && hi&v.maskHi == v.ownHi && lo&v.maskLo == v.ownLo
}

// isSender reports whether ip is an underlay address of a current peer.
func (t *table) isSender(ip netip.Addr) bool { return t.senders.has(ip) }

// all yields every peer of the table, in IPv4 subnet order (every peer has
// an IPv4 lease). O(peers), for the scraper and the prober, never for the
// data path.
func (t *table) all() iter.Seq[*peer] {
	return func(yield func(*peer) bool) { t.v4.all(yield) }
}

// tableEdit derives a new table from a published one. It owns the nodes
// and pages it copied (so that several changes to one page copy it once)
// and shares everything else with the old table, which it never writes.
type tableEdit struct {
	t       *table
	nodes   map[*node]struct{}
	leaves  map[*leaf]struct{}
	senders map[*senderNode]struct{}
}

// edit starts a new table from t: O(len(top)), at most 1,024 pointers per
// family.
func (t *table) edit() *tableEdit {
	nt := *t
	nt.v4.top = slices.Clone(t.v4.top)
	nt.r6.top = slices.Clone(t.r6.top)
	nt.senders = senderSet{top: new(senderTop)}
	*nt.senders.top = *t.senders.top
	return &tableEdit{
		t:       &nt,
		nodes:   map[*node]struct{}{},
		leaves:  map[*leaf]struct{}{},
		senders: map[*senderNode]struct{}{},
	}
}

// add puts p in the slot of its IPv4 subnet, which must be free, and in
// that of its IPv6 subnet if it has one (free6 said it is free).
func (e *tableEdit) add(p *peer) {
	sub32, _ := proto.AddrUint32(p.subnet.Addr())
	e.set(&e.t.v4, e.t.number(sub32), p)
	if n, ok := e.number6(p.subnet6); ok {
		e.set(&e.t.r6, n, p)
	}
	e.t.count++
	e.senderNode(p.public).add(p.public)
	if p.public6.IsValid() {
		e.senderNode(p.public6).add(p.public6)
	}
}

// remove empties the slots of p's subnets, which p must hold.
func (e *tableEdit) remove(p *peer) {
	sub32, _ := proto.AddrUint32(p.subnet.Addr())
	e.set(&e.t.v4, e.t.number(sub32), nil)
	if n, ok := e.number6(p.subnet6); ok {
		e.set(&e.t.r6, n, nil)
	}
	e.t.count--
	e.senderNode(p.public).remove(p.public)
	if p.public6.IsValid() {
		e.senderNode(p.public6).remove(p.public6)
	}
}

// number6 is the subnet number of the IPv6 lease s; false for none.
func (e *tableEdit) number6(s netip.Prefix) (uint32, bool) {
	hi, lo, ok := proto.AddrWords(s.Addr())
	if !ok {
		return 0, false
	}
	n, ok := e.t.v6.number(hi, lo)
	return uint32(n), ok
}

// holder6 returns the peer that holds the IPv6 lease s in the table being
// built, nil if none (two leases may name one IPv6 subnet: it is not the
// key of a lease).
func (e *tableEdit) holder6(s netip.Prefix) *peer {
	n, ok := e.number6(s)
	if !ok {
		return nil
	}
	return e.t.r6.get(n)
}

// set writes slot n of tree r, copying its node and page first unless
// this edit made them. A page or node left empty is dropped, so memory
// follows the leases.
func (e *tableEdit) set(r *radix, n uint32, p *peer) {
	i, j, k := n>>topShift, n>>leafBits&(nodeSize-1), n&(leafSize-1)
	nd := r.top[i]
	if _, mine := e.nodes[nd]; !mine {
		c := *nd
		nd = &c
		e.nodes[nd] = struct{}{}
		r.top[i] = nd
	}
	lf := nd[j]
	if _, mine := e.leaves[lf]; !mine {
		c := *lf
		lf = &c
		e.leaves[lf] = struct{}{}
		nd[j] = lf
	}
	lf[k] = p
	if p != nil {
		return
	}
	if *lf == (leaf{}) {
		nd[j] = emptyLeaf
		if *nd == *emptyNode {
			r.top[i] = emptyNode
		}
	}
}

// senderNode returns the node of ip's bucket, copied for this edit.
func (e *tableEdit) senderNode(ip netip.Addr) *senderNode {
	i, _ := senderHash(ip)
	nd := e.t.senders.top[i]
	if _, mine := e.senders[nd]; nd != nil && mine {
		return nd
	}
	c := new(senderNode)
	if nd != nil {
		*c = *nd
	}
	e.senders[c] = struct{}{}
	e.t.senders.top[i] = c
	return c
}

// senderSet is the multiset of the peers' underlay addresses (two leases
// may name one host), hashed into 4,096 sorted buckets under 64 nodes,
// copied on write like the route table: a change copies the top (64
// pointers), one node and one bucket.
type senderSet struct{ top *senderTop }

type senderTop [64]*senderNode
type senderNode [64][]netip.Addr

// senderHash spreads addresses (often consecutive) over the buckets:
// Fibonacci hashing, the top 12 bits of x * 2^32/phi, x the IPv4 address
// or the folded IPv6 one.
func senderHash(ip netip.Addr) (top, bucket uint32) {
	var x uint32
	if v, ok := proto.AddrUint32(ip); ok {
		x = v
	} else {
		hi, lo, _ := proto.AddrWords(ip)
		f := hi ^ lo
		x = uint32(f ^ f>>32)
	}
	h := x * 0x9E3779B1
	return h >> 26, h >> 20 & 63
}

func (s senderSet) has(ip netip.Addr) bool {
	i, j := senderHash(ip)
	nd := s.top[i]
	if nd == nil {
		return false
	}
	_, found := slices.BinarySearchFunc(nd[j], ip, netip.Addr.Compare)
	return found
}

// add inserts ip into a fresh copy of its bucket (the old table may share
// the old one).
func (nd *senderNode) add(ip netip.Addr) {
	_, j := senderHash(ip)
	b := nd[j]
	at, _ := slices.BinarySearchFunc(b, ip, netip.Addr.Compare)
	nb := make([]netip.Addr, 0, len(b)+1)
	nd[j] = append(append(append(nb, b[:at]...), ip), b[at:]...)
}

// remove deletes one occurrence of ip, which must be there, likewise.
func (nd *senderNode) remove(ip netip.Addr) {
	_, j := senderHash(ip)
	b := nd[j]
	at, found := slices.BinarySearchFunc(b, ip, netip.Addr.Compare)
	if !found {
		return
	}
	if len(b) == 1 {
		nd[j] = nil
		return
	}
	nb := make([]netip.Addr, 0, len(b)-1)
	nd[j] = append(append(nb, b[:at]...), b[at+1:]...)
}
