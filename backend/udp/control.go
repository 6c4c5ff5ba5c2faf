package udp

import (
	"encoding/json"
	"net/netip"
	"slices"
	"sync"

	"github.com/tulle-net/tulle/subnet"
)

// control is the state behind the route table: the current peers by lease
// subnet and the allocator of their counter indices. Only Apply touches it
// (the collector holds scrapes for reading while it scrapes).
type control struct {
	mu    sync.Mutex
	peers map[netip.Prefix]*peer
	// Counter indices. A departed peer's index is retired, not freed: a
	// loop still in a step that loaded an older table may add that peer's
	// last packets to it, and they must not land in the series of a new
	// peer given the same index. An index returns to free once every loop
	// that was in a step when the peer left has ended that step.
	free    []int            // indices nothing can still touch
	retired []retiredIndices // in the order they were retired
	next    int              // next never-used index
	// scrapes is held for reading by every scrape of the collector, which
	// reads counters by the indices of the table it loaded: retired indices
	// are freed only when no scrape runs.
	scrapes sync.RWMutex
}

// retiredIndices are the counter indices of peers that left in one Apply,
// with every loop's step count read right after the table without them was
// published.
type retiredIndices struct {
	indices []int
	steps   []uint64
}

func (c *control) init() { c.peers = make(map[netip.Prefix]*peer) }

// Apply takes one batch of lease events in order and, if the set of peers
// changed, publishes a new route table. Leases that do not fit the network
// (wrong length, outside it, no IPv4 PublicIP) are logged and ignored; our
// own lease and leases whose PublicIP is ours are not peers. A renewal
// (same subnet, same addresses and the same features that decide how we
// reach the peer, see dualstack.go) keeps the peer, its counters and its
// learned path MTU. Apply never waits for the data path. Its cost follows
// the changes in the batch, not the number of leases: the new table shares
// everything the batch did not touch with the old one (see tableEdit), and
// a batch is published as one table.
func (b *Backend) Apply(events []subnet.Event) {
	c := &b.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	defer b.applyDirect(events) // direct.go: kernel routes to on-link peers follow the leases
	var (
		e              *tableEdit // nil until the first change
		added, removed int
		gone           []int // counter indices of the peers that left
	)
	edit := func() *tableEdit {
		if e == nil {
			e = b.table.Load().edit()
		}
		return e
	}
	for _, ev := range events {
		l := ev.Lease
		if !b.leaseFits(l) {
			b.log.Warn("ignoring lease that does not fit the network", "subnet", l.Subnet,
				"peer", l.Attrs.PublicIP, "network", b.opts.Network, "subnet_len", b.opts.SubnetLen)
			continue
		}
		if l.Subnet == b.opts.Lease.Subnet {
			if ev.Type == subnet.EventAdded {
				b.setOwnFeatures(l.Attrs.BackendData)
			}
			continue
		}
		public := l.Attrs.PublicIP.Unmap()
		if public == b.opts.PublicIP {
			b.log.Warn("ignoring lease held by our own public IP (a stale lease of this host?)",
				"subnet", l.Subnet, "peer", public)
			continue
		}
		old := c.peers[l.Subnet]
		switch ev.Type {
		case subnet.EventAdded:
			feats := leaseFeatures(l.Attrs.BackendData)
			want := b.reachFor(l, feats)
			if old != nil && old.reach == want {
				// Renewal, or the same host restarted (e.g. flannel
				// replaced by Tulle): its checksum feature may have changed.
				if partial := feats.has(FeaturePartialChecksum); old.partialCsum.Load() != partial {
					old.partialCsum.Store(partial)
					b.log.Info("peer features changed", "subnet", l.Subnet, "peer", public, "partial_checksum", partial)
				}
				continue
			}
			if old != nil {
				edit().remove(old)
				gone = append(gone, old.index)
				removed++
				b.log.Info("peer changed its address, IPv6 lease or features", "subnet", l.Subnet,
					"old_peer", old.addr.Addr(), "peer", want.addr.Addr(), "ipv6_subnet", want.want6)
			} else {
				b.log.Debug("peer added", "subnet", l.Subnet, "peer", want.addr.Addr(), "ipv6_subnet", want.want6)
			}
			p := b.newPeer(l.Subnet, want)
			p.partialCsum.Store(feats.has(FeaturePartialChecksum))
			b.grantIPv6(edit(), p)
			c.peers[l.Subnet] = p
			edit().add(p)
			added++
		case subnet.EventRemoved:
			if old == nil {
				continue
			}
			edit().remove(old)
			gone = append(gone, old.index)
			delete(c.peers, l.Subnet)
			removed++
			b.log.Debug("peer removed", "subnet", l.Subnet, "peer", old.addr.Addr())
		}
	}
	if e == nil {
		return
	}
	b.table.Store(e.t)
	if len(gone) > 0 {
		c.retire(gone, b.stats)
	}
	b.log.Info("route table updated", "peers", e.t.count, "added", added, "removed", removed)
}

// setOwnFeatures notes the features our own lease advertises (it may be
// rewritten, e.g. a reservation replaced by a lease with our BackendData).
func (b *Backend) setOwnFeatures(data json.RawMessage) {
	partial := hasFeature(data, FeaturePartialChecksum)
	if b.ownPartial.Swap(partial) != partial {
		b.log.Info("own lease features changed", "subnet", b.opts.Lease.Subnet, "partial_checksum", partial)
	}
}

// leaseFits reports whether l is an IPv4 lease of the network's length with
// an IPv4 PublicIP.
func (b *Backend) leaseFits(l subnet.Lease) bool {
	s := l.Subnet
	pub := l.Attrs.PublicIP.Unmap()
	return s.IsValid() && s.Addr().Is4() && s.Bits() == b.opts.SubnetLen && s == s.Masked() &&
		b.opts.Network.Contains(s.Addr()) && pub.Is4() && !pub.IsUnspecified()
}

// newPeer makes the peer for lease subnet s reached as r says, with a
// counter index whose counters exist and are zero in every loop.
func (b *Backend) newPeer(s netip.Prefix, r reach) *peer {
	index := b.ctl.allocIndex(b.stats)
	for _, st := range b.stats {
		st.prepare(index)
	}
	return &peer{reach: r, subnet: s, index: index}
}

// allocIndex returns a counter index no loop and no scrape can touch: a
// free one if there is one, else a new one.
func (c *control) allocIndex(loops []*loopStats) int {
	if len(c.free) == 0 {
		c.reclaim(loops)
	}
	if n := len(c.free); n > 0 {
		i := c.free[n-1]
		c.free = c.free[:n-1]
		return i
	}
	c.next++
	return c.next - 1
}

// retire records the indices of peers that left, after the table without
// them was published: each loop's step count now tells when no step can
// hold an older table any more.
func (c *control) retire(indices []int, loops []*loopStats) {
	steps := make([]uint64, len(loops))
	for i, s := range loops {
		steps[i] = s.steps.Load()
	}
	c.retired = append(c.retired, retiredIndices{indices: indices, steps: steps})
}

// released reports whether every loop that was in a step (odd count) when
// r was retired has ended that step.
func (r retiredIndices) released(loops []*loopStats) bool {
	for i, s := range loops {
		if r.steps[i]%2 == 1 && s.steps.Load() == r.steps[i] {
			return false
		}
	}
	return true
}

// reclaim frees the retired indices that no loop and no scrape can still
// touch: every loop that was in a step (odd count) when they were retired
// has moved on since, and no scrape runs (a scrape started later loads a
// table without their peers). The retired are in order, and a loop that
// holds back one batch holds back every later one.
func (c *control) reclaim(loops []*loopStats) {
	if len(c.retired) == 0 || !c.scrapes.TryLock() {
		return
	}
	defer c.scrapes.Unlock()
	k := 0
	for k < len(c.retired) && c.retired[k].released(loops) {
		c.free = append(c.free, c.retired[k].indices...)
		k++
	}
	c.retired = slices.Delete(c.retired, 0, k)
}

// FeaturePartialChecksum is the data-plane feature a Tulle host advertises
// in its lease's BackendData as {"tulle":{"features":["partial-checksum"]}}:
// two hosts whose leases both list it send each other packets with
// partial checksums, marked (mark.go). Flannel hosts advertise nothing and
// get complete checksums.
const FeaturePartialChecksum = "partial-checksum"

// HostInfo is what a Tulle host writes into its lease's BackendData, under
// "tulle": {"tulle":{"version":"v0.1.0","features":["partial-checksum"]}}.
// Flannel's udp backend never reads BackendData, so a flannel host treats
// the lease as any udp lease; Tulle's data plane reads the features of its
// peers, and `tulled status` tells Tulle hosts from flannel ones by it.
type HostInfo struct {
	Version string `json:"version"`
	// Features are what the host's data plane offers peers that also list
	// them (FeaturePartialChecksum).
	Features []string `json:"features,omitempty"`
}

type hostMark struct {
	Tulle *HostInfo `json:"tulle,omitempty"`
}

// BackendData encodes i as a lease's BackendData.
func (i HostInfo) BackendData() json.RawMessage {
	b, _ := json.Marshal(hostMark{Tulle: &i}) // strings only: cannot fail
	return b
}

// ParseHostInfo reads the HostInfo of a lease's BackendData (other fields
// ignored); ok is false when it carries none, as a flannel host's lease.
func ParseHostInfo(data json.RawMessage) (_ HostInfo, ok bool) {
	var m hostMark
	if len(data) == 0 || json.Unmarshal(data, &m) != nil || m.Tulle == nil {
		return HostInfo{}, false
	}
	return *m.Tulle, true
}

// hasFeature reports whether the lease BackendData data lists feature f.
func hasFeature(data json.RawMessage, f string) bool {
	return leaseFeatures(data).has(f)
}

// features are the features a lease's BackendData lists (none for a
// flannel host).
type features []string

func leaseFeatures(data json.RawMessage) features {
	info, _ := ParseHostInfo(data)
	return info.Features
}

func (f features) has(name string) bool { return slices.Contains(f, name) }
