package udp

import (
	"iter"
	"net/netip"
	"slices"
	"sync/atomic"

	"github.com/tulle-net/tulle/proto"
)

// peer is the holder of one lease other than ours. The control side keeps
// the same *peer for as long as the lease's subnet and PublicIP stay the
// same, so its counters and learned path MTU survive table updates.
type peer struct {
	addr   netip.AddrPort // PublicIP:Port, where its packets go
	public uint32         // PublicIP as a number, compared with a datagram's source
	subnet netip.Prefix   // its lease
	index  int            // compact index of its counters, unique among current peers

	// innerMTU is the largest inner packet the underlay path to this peer
	// carries (path MTU - 28), learned on the slow path; 0 = no limit known
	// below the TUN MTU.
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

// The route table is a three-level radix tree over the subnet number
// n = (addr - network) >> (32 - SubnetLen): top[n>>12] is a node of 256
// pages, each of 16 slots. A lookup is three dependent loads and no branch
// but one bounds check (absent nodes and pages point to shared empty ones,
// never nil). Memory follows the leases, not the network: a page exists
// only where a lease does, a node only where a page does, and the top level
// is at most 1,024 pointers (maxSubnets). Leases spread thinly over the
// largest network (10,000 in a /8 of /30s) cost 128 B of page each plus
// 2 KiB per node, 3.3 MiB in all; 16-slot pages and 256-entry nodes are
// the split that costs least there. A table is never changed once
// published: an update copies the top level and the nodes and pages it
// touches and shares all the rest with the table before it, so it costs
// O(changes), not O(leases).
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

// table is an immutable route table: the leases of the network, indexed by
// subnet number. Workers load the current one once per batch; the control
// side derives a new one from it on every lease change (edit) and swaps it
// in.
type table struct {
	network uint32 // first address of the overlay network
	shift   uint8  // 32 - SubnetLen: address bits inside one lease
	subnets uint32 // number of subnets in the network
	ownNet  uint32 // our lease, as network address and mask
	ownMask uint32

	top []*node // len = subnets / 4096 rounded up; no nil entries
	// senders are the PublicIPs of all peers, to tell an unknown sender
	// from a known one sending a spoofed source (drop path only).
	senders senderSet
	count   int // number of peers
}

// newTable returns the empty table of network (leases of length subnetLen)
// with our own lease own.
func newTable(network netip.Prefix, subnetLen int, own netip.Prefix) *table {
	net32, _ := proto.AddrUint32(network.Addr())
	own32, _ := proto.AddrUint32(own.Addr())
	subnets := uint32(1) << (subnetLen - network.Bits())
	t := &table{
		network: net32,
		shift:   uint8(32 - subnetLen),
		subnets: subnets,
		ownNet:  own32,
		ownMask: ^uint32(0) << (32 - subnetLen),
		top:     make([]*node, (subnets+1<<topShift-1)>>topShift),
		senders: senderSet{top: new(senderTop)},
	}
	for i := range t.top {
		t.top[i] = emptyNode
	}
	return t
}

// lookup returns the peer whose lease holds addr, or nil when addr is
// outside the network, in our own lease or in a subnet no one holds. O(1).
func (t *table) lookup(addr uint32) *peer {
	// Below the network the subtraction wraps to a number past the end.
	// Numbers past the last subnet but within the last top entry land on
	// slots no lease can fill.
	n := (addr - t.network) >> t.shift
	i := n >> topShift
	if i >= uint32(len(t.top)) {
		return nil
	}
	return t.top[i][n>>leafBits&(nodeSize-1)][n&(leafSize-1)]
}

// inNetwork reports whether addr lies in the overlay network.
func (t *table) inNetwork(addr uint32) bool {
	return (addr-t.network)>>t.shift < t.subnets
}

// isOwn reports whether addr lies in our own lease.
func (t *table) isOwn(addr uint32) bool {
	return addr&t.ownMask == t.ownNet
}

// isSender reports whether ip is the PublicIP of a current peer.
func (t *table) isSender(ip uint32) bool { return t.senders.has(ip) }

// all yields every peer of the table, in subnet order. It walks the
// populated pages: O(peers) for the scraper and the prober, never for the
// data path.
func (t *table) all() iter.Seq[*peer] {
	return func(yield func(*peer) bool) {
		for _, nd := range t.top {
			if nd == emptyNode {
				continue
			}
			for _, lf := range nd {
				if lf == emptyLeaf {
					continue
				}
				for _, p := range lf {
					if p != nil && !yield(p) {
						return
					}
				}
			}
		}
	}
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

// edit starts a new table from t: O(len(top)), at most 1,024 pointers.
func (t *table) edit() *tableEdit {
	nt := *t
	nt.top = slices.Clone(t.top)
	nt.senders = senderSet{top: new(senderTop)}
	*nt.senders.top = *t.senders.top
	return &tableEdit{
		t:       &nt,
		nodes:   map[*node]struct{}{},
		leaves:  map[*leaf]struct{}{},
		senders: map[*senderNode]struct{}{},
	}
}

// add puts p in the slot of its subnet, which must be free.
func (e *tableEdit) add(p *peer) {
	e.set(e.number(p), p)
	e.t.count++
	e.senderNode(p.public).add(p.public)
}

// remove empties the slot of p's subnet, which p must hold.
func (e *tableEdit) remove(p *peer) {
	e.set(e.number(p), nil)
	e.t.count--
	e.senderNode(p.public).remove(p.public)
}

func (e *tableEdit) number(p *peer) uint32 {
	sub32, _ := proto.AddrUint32(p.subnet.Addr())
	return (sub32 - e.t.network) >> e.t.shift
}

// set writes slot n, copying its node and page first unless this edit made
// them. A page or node left empty is dropped, so memory follows the leases.
func (e *tableEdit) set(n uint32, p *peer) {
	i, j, k := n>>topShift, n>>leafBits&(nodeSize-1), n&(leafSize-1)
	nd := e.t.top[i]
	if _, mine := e.nodes[nd]; !mine {
		c := *nd
		nd = &c
		e.nodes[nd] = struct{}{}
		e.t.top[i] = nd
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
			e.t.top[i] = emptyNode
		}
	}
}

// senderNode returns the node of ip's bucket, copied for this edit.
func (e *tableEdit) senderNode(ip uint32) *senderNode {
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

// senderSet is the multiset of the peers' PublicIPs (two leases may name
// one host), hashed into 4,096 sorted buckets under 64 nodes, copied on
// write like the route table: a change copies the top (64 pointers), one
// node and one bucket.
type senderSet struct{ top *senderTop }

type senderTop [64]*senderNode
type senderNode [64][]uint32

// senderHash spreads IPs (often consecutive) over the buckets: Fibonacci
// hashing, the top 12 bits of ip * 2^32/phi.
func senderHash(ip uint32) (top, bucket uint32) {
	h := ip * 0x9E3779B1
	return h >> 26, h >> 20 & 63
}

func (s senderSet) has(ip uint32) bool {
	i, j := senderHash(ip)
	nd := s.top[i]
	if nd == nil {
		return false
	}
	_, found := slices.BinarySearch(nd[j], ip)
	return found
}

// add inserts ip into a fresh copy of its bucket (the old table may share
// the old one).
func (nd *senderNode) add(ip uint32) {
	_, j := senderHash(ip)
	b := nd[j]
	at, _ := slices.BinarySearch(b, ip)
	nb := make([]uint32, 0, len(b)+1)
	nd[j] = append(append(append(nb, b[:at]...), ip), b[at:]...)
}

// remove deletes one occurrence of ip, which must be there, likewise.
func (nd *senderNode) remove(ip uint32) {
	_, j := senderHash(ip)
	b := nd[j]
	at, found := slices.BinarySearch(b, ip)
	if !found {
		return
	}
	if len(b) == 1 {
		nd[j] = nil
		return
	}
	nb := make([]uint32, 0, len(b)-1)
	nd[j] = append(append(nb, b[:at]...), b[at+1:]...)
}
