package udp

import (
	"net/netip"

	"github.com/tulle-net/tulle/subnet"
)

// Dual stack. Inner IPv6 packets travel in the same datagrams to the same
// port as inner IPv4 ones, told apart by the version nibble (flannel's
// wire format for IPv4 is unchanged). Which peers get them, and over which
// underlay, is decided here, from the leases, once per lease change:
//
//   - Inner IPv6 goes only to a peer whose lease has an IPv6 subnet of the
//     network and advertises FeatureIPv6, and is accepted only from such a
//     peer, with its source in that subnet. A flannel host advertises
//     nothing and is never sent IPv6: to the TX loop its IPv6 subnet is no
//     route.
//   - The IPv6 underlay is used to a peer when we run with IPv6Underlay and
//     have a PublicIPv6 (and so IPv6 sockets), and the peer's lease has a
//     PublicIPv6 and advertises FeatureIPv6Underlay. Every other peer is
//     reached over IPv4, as flannel's hosts are. A datagram is accepted
//     from either address of a peer's lease.

// FeatureIPv6 is the feature a Tulle host lists in its lease's BackendData
// when its data plane carries inner IPv6 packets: only peers that
// advertise it are ever sent IPv6.
const FeatureIPv6 = "ipv6"

// FeatureIPv6Underlay is the feature a Tulle host lists when it takes
// datagrams on its PublicIPv6 (its network config enables
// Backend.IPv6Underlay and it has a PublicIPv6).
const FeatureIPv6Underlay = "ipv6-underlay"

// IPv6Features returns the dual-stack features a host offers for its
// lease's HostInfo.Features under the network config cfg with public IPv6
// address publicIPv6 (zero if none): FeatureIPv6 when the config enables
// IPv6 (and IPv4, which this backend needs), FeatureIPv6Underlay when it
// enables Backend.IPv6Underlay and publicIPv6 is an IPv6 address. The
// daemon appends them to the features it writes; Options must then carry
// the same decisions (IPv6Network, PublicIPv6, IPv6Underlay).
func IPv6Features(cfg *subnet.Config, publicIPv6 netip.Addr) []string {
	var f []string
	if cfg.EnableIPv4 && cfg.EnableIPv6 {
		f = append(f, FeatureIPv6)
	}
	if cfg.IPv6Underlay && isPublicIPv6(publicIPv6) {
		f = append(f, FeatureIPv6Underlay)
	}
	return f
}

// isPublicIPv6 reports whether a is usable as an IPv6 underlay address.
func isPublicIPv6(a netip.Addr) bool {
	return a.Is6() && !a.Is4In6() && !a.IsUnspecified() && !a.IsMulticast()
}

// The underlays: a worker's IPv4 socket and its IPv6 one.
const (
	underlay4 = 0
	underlay6 = 1
)

// reach is how we reach a peer and know its datagrams, as its lease says:
// a peer whose reach changes is a new peer (Apply).
type reach struct {
	// addr is where its datagrams go: PublicIP:Port, or [PublicIPv6]:Port
	// when both of us talk over the IPv6 underlay (underlay says which).
	addr     netip.AddrPort
	underlay uint8      // underlay4 or underlay6: the socket its datagrams leave by
	public   netip.Addr // PublicIP (IPv4): a datagram from it is the peer's
	public6  netip.Addr // PublicIPv6, zero if none: a datagram from it is the peer's too
	// want6 is the IPv6 lease we would carry IPv6 to (the lease has one
	// that fits, and advertises FeatureIPv6), zero if none.
	want6 netip.Prefix
}

// reachFor is the reach of the peer holding lease l with features feats.
func (b *Backend) reachFor(l subnet.Lease, feats features) reach {
	r := reach{public: l.Attrs.PublicIP.Unmap()}
	r.addr = netip.AddrPortFrom(r.public, uint16(b.opts.Port))
	if pub6 := l.Attrs.PublicIPv6; isPublicIPv6(pub6) && pub6 != b.opts.PublicIPv6 {
		r.public6 = pub6
		if b.underlay6() && feats.has(FeatureIPv6Underlay) {
			r.addr = netip.AddrPortFrom(pub6, uint16(b.opts.Port))
			r.underlay = underlay6
		}
	}
	if s := l.IPv6Subnet; b.ipv6() && feats.has(FeatureIPv6) && s.IsValid() && s.Addr().Is6() &&
		s.Bits() == b.opts.IPv6SubnetLen && s == s.Masked() && b.opts.IPv6Network.Contains(s.Addr()) {
		r.want6 = s
	}
	return r
}

// grantIPv6 gives the new peer p its IPv6 lease in the table e builds,
// unless our own lease or another peer's holds it already (an IPv6 subnet
// is not the key of a lease, so two leases may name one): then p is
// carried IPv4 only, and the conflict logged.
func (b *Backend) grantIPv6(e *tableEdit, p *peer) {
	s := p.want6
	if !s.IsValid() {
		return
	}
	if s == b.opts.Lease.IPv6Subnet {
		b.log.Warn("peer's lease names our own IPv6 subnet; carrying IPv4 only to it", "subnet", p.subnet,
			"peer", p.addr.Addr(), "ipv6_subnet", s)
		return
	}
	if h := e.holder6(s); h != nil {
		b.log.Warn("peer's lease names an IPv6 subnet another peer holds; carrying IPv4 only to it", "subnet", p.subnet,
			"peer", p.addr.Addr(), "ipv6_subnet", s, "holder", h.subnet)
		return
	}
	p.subnet6 = s
}

// ipv6 reports whether we carry inner IPv6 (Options.IPv6Network is set).
func (b *Backend) ipv6() bool { return b.opts.IPv6Network.IsValid() }

// underlay6 reports whether we talk over the IPv6 underlay to peers that
// offer it: IPv6Underlay is on and we have a PublicIPv6.
func (b *Backend) underlay6() bool { return b.opts.IPv6Underlay && b.opts.PublicIPv6.IsValid() }
