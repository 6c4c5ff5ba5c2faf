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

// Features returns the features this data plane advertises, for the
// lease's BackendData under "tulle"."features".
func Features() []string { return []string{FeaturePartialChecksum} }

// hasFeature reports whether BackendData data ({"tulle":{"features":[...]}},
// other fields ignored) lists feature f. Anything else, a flannel lease
// without BackendData included, has no features.
func hasFeature(data json.RawMessage, f string) bool {
	if len(data) == 0 {
		return false
	}
	var v struct {
		Tulle *struct {
			Features []string `json:"features"`
		} `json:"tulle"`
	}
	if json.Unmarshal(data, &v) != nil || v.Tulle == nil {
		return false
	}
	return slices.Contains(v.Tulle.Features, f)
}
