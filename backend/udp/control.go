package udp

import (
	"encoding/json"
	"net/netip"
	"slices"
	"sync"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
)

// control is the state behind the route table: the current peers by lease
// subnet and the allocator of their counter indices. Only Apply touches it.
type control struct {
	mu    sync.Mutex
	peers map[netip.Prefix]*peer
	free  []int // released counter indices, reused oldest first
	next  int   // next never-used index
}

func (c *control) init() { c.peers = make(map[netip.Prefix]*peer) }

// Apply takes one batch of lease events in order and, if the set of peers
// changed, publishes a new route table. Leases that do not fit the network
// (wrong length, outside it, no IPv4 PublicIP) are logged and ignored; our
// own lease and leases whose PublicIP is ours are not peers. A renewal
// (same subnet, same PublicIP) keeps the peer, its counters and its learned
// path MTU. Apply never waits for the data path.
func (b *Backend) Apply(events []subnet.Event) {
	c := &b.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	var added, removed int
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
			if old != nil && old.addr.Addr() == public {
				// Renewal, or the same host restarted (e.g. flannel
				// replaced by Tulle): its features may have changed.
				if partial := hasFeature(l.Attrs.BackendData, FeaturePartialChecksum); old.partialCsum.Load() != partial {
					old.partialCsum.Store(partial)
					b.log.Info("peer features changed", "subnet", l.Subnet, "peer", public, "partial_checksum", partial)
				}
				continue
			}
			if old != nil {
				c.release(old)
				removed++
				b.log.Info("peer changed public IP", "subnet", l.Subnet, "old_peer", old.addr.Addr(), "peer", public)
			} else {
				b.log.Debug("peer added", "subnet", l.Subnet, "peer", public)
			}
			p := b.newPeer(l.Subnet, public)
			p.partialCsum.Store(hasFeature(l.Attrs.BackendData, FeaturePartialChecksum))
			c.peers[l.Subnet] = p
			added++
		case subnet.EventRemoved:
			if old == nil {
				continue
			}
			c.release(old)
			delete(c.peers, l.Subnet)
			removed++
			b.log.Debug("peer removed", "subnet", l.Subnet, "peer", old.addr.Addr())
		}
	}
	if added == 0 && removed == 0 {
		return
	}
	peers := make([]*peer, 0, len(c.peers))
	for _, p := range c.peers {
		peers = append(peers, p)
	}
	b.table.Store(newTable(b.opts.Network, b.opts.SubnetLen, b.opts.Lease.Subnet, peers))
	b.log.Info("route table updated", "peers", len(peers), "added", added, "removed", removed)
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

// newPeer makes the peer for lease subnet s held by public, with a counter
// index whose counters exist and are zero in every loop.
func (b *Backend) newPeer(s netip.Prefix, public netip.Addr) *peer {
	c := &b.ctl
	var index int
	if len(c.free) > 0 {
		index = c.free[0]
		c.free = slices.Delete(c.free, 0, 1)
	} else {
		index = c.next
		c.next++
	}
	for _, st := range b.stats {
		st.prepare(index)
	}
	pub32, _ := proto.AddrUint32(public)
	return &peer{
		addr:   netip.AddrPortFrom(public, uint16(b.opts.Port)),
		public: pub32,
		subnet: s,
		index:  index,
	}
}

// release returns p's counter index for reuse by a later peer.
func (c *control) release(p *peer) { c.free = append(c.free, p.index) }

// FeaturePartialChecksum is the data-plane feature a Tulle host advertises
// in its lease's BackendData as {"tulle":{"features":["partial-checksum"]}}:
// it takes marked packets with partial checksums (see markBit) from peers
// that advertise it, and sends such packets to them when its own lease
// advertises it too. Flannel hosts advertise nothing and get complete
// checksums.
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
	info, ok := ParseHostInfo(data)
	return ok && slices.Contains(info.Features, f)
}
