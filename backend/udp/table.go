package udp

import (
	"net/netip"
	"slices"
	"sync/atomic"

	"github.com/tulle-net/tulle/proto"
)

// peer is the holder of one lease other than ours. The control side keeps
// the same *peer for as long as the lease's subnet and PublicIP stay the
// same, so its counters and learned path MTU survive table rebuilds.
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
	// partialCsum: the peer advertises FeaturePartialChecksum in its lease,
	// so packets with a partial checksum are sent to it marked, and its
	// marked packets are taken as partial (see markBit).
	partialCsum atomic.Bool
}

// table is an immutable route table: the leases of the network, indexed by
// subnet number. Workers load the current one once per batch; the control
// side builds a new one on every lease change and swaps it in.
type table struct {
	network uint32 // first address of the overlay network
	shift   uint8  // 32 - SubnetLen: address bits inside one lease
	ownNet  uint32 // our lease, as network address and mask
	ownMask uint32

	// slots[n] is the holder of subnet n (network + n<<shift), nil when no
	// peer holds it. One pointer per subnet (512 KiB for a /8 in /24s), so a
	// lookup is one load.
	slots []*peer
	// peers holds the current peers by peer.index; freed indices are nil.
	peers []*peer
	// senders are the PublicIPs of all peers, sorted, to tell an unknown
	// sender from a known one sending a spoofed source (drop path only).
	senders []uint32
	count   int // number of peers
}

// newTable builds a table for network (lengths subnetLen) with our own
// lease own and the given peers, each at its own index.
func newTable(network netip.Prefix, subnetLen int, own netip.Prefix, peers []*peer) *table {
	net32, _ := proto.AddrUint32(network.Addr())
	own32, _ := proto.AddrUint32(own.Addr())
	t := &table{
		network: net32,
		shift:   uint8(32 - subnetLen),
		ownNet:  own32,
		ownMask: ^uint32(0) << (32 - subnetLen),
		slots:   make([]*peer, 1<<(subnetLen-network.Bits())),
		count:   len(peers),
	}
	maxIndex := -1
	for _, p := range peers {
		maxIndex = max(maxIndex, p.index)
	}
	t.peers = make([]*peer, maxIndex+1)
	t.senders = make([]uint32, 0, len(peers))
	for _, p := range peers {
		t.peers[p.index] = p
		sub32, _ := proto.AddrUint32(p.subnet.Addr())
		t.slots[(sub32-net32)>>t.shift] = p
		t.senders = append(t.senders, p.public)
	}
	slices.Sort(t.senders)
	return t
}

// lookup returns the peer whose lease holds addr, or nil when addr is
// outside the network, in our own lease or in a subnet no one holds. O(1).
func (t *table) lookup(addr uint32) *peer {
	// Below the network the subtraction wraps to a number past the end.
	n := (addr - t.network) >> t.shift
	if n >= uint32(len(t.slots)) {
		return nil
	}
	return t.slots[n]
}

// inNetwork reports whether addr lies in the overlay network.
func (t *table) inNetwork(addr uint32) bool {
	return (addr-t.network)>>t.shift < uint32(len(t.slots))
}

// isOwn reports whether addr lies in our own lease.
func (t *table) isOwn(addr uint32) bool {
	return addr&t.ownMask == t.ownNet
}

// isSender reports whether ip is the PublicIP of a current peer.
func (t *table) isSender(ip uint32) bool {
	_, found := slices.BinarySearch(t.senders, ip)
	return found
}
