package testbed

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Dual stack in the bed: the overlay's IPv6 network and the hosts' optional
// IPv6 underlay, all in the documentation range 2001:db8::/32. Addresses
// go on without duplicate address detection (nodad), so they are usable at
// once.
var (
	// IPv6Network is the IPv6 overlay of DualStackNetworkConfig: /64
	// leases, 2001:db8:1:<n>::/64.
	IPv6Network = netip.MustParsePrefix("2001:db8:1::/48")
	// IPv6UnderlayPrefix is the hosts' IPv6 underlay: host i is
	// 2001:db8:ffff::<i> (AddIPv6Underlay).
	IPv6UnderlayPrefix = netip.MustParsePrefix("2001:db8:ffff::/64")
)

// DualStackNetworkConfig is DefaultNetworkConfig with IPv6: flannel's
// EnableIPv6, IPv6Network and IPv6SubnetLen. The underlay stays IPv4.
const DualStackNetworkConfig = `{"Network":"198.18.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"2001:db8:1::/48","IPv6SubnetLen":64,"Backend":{"Type":"udp"}}`

// DualStackIPv6UnderlayConfig is DualStackNetworkConfig with the IPv6
// underlay switched on (Backend.IPv6Underlay): hosts that both have an IPv6
// underlay address talk over it.
const DualStackIPv6UnderlayConfig = `{"Network":"198.18.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"2001:db8:1::/48","IPv6SubnetLen":64,"Backend":{"Type":"udp","IPv6Underlay":true}}`

// IPv6UnderlayAddr is host i's IPv6 underlay address, 2001:db8:ffff::<i>.
func IPv6UnderlayAddr(i int) netip.Addr {
	a := IPv6UnderlayPrefix.Addr().As16()
	a[14], a[15] = byte(i>>8), byte(i)
	return netip.AddrFrom16(a)
}

// AddIPv6Underlay gives the host its IPv6 underlay address,
// 2001:db8:ffff::<index>/64, on its underlay link (the switch carries both
// families), and sets h.Addr6. Call it before tulled starts: tulled takes
// the interface's global IPv6 address as its PublicIPv6.
func (h *Host) AddIPv6Underlay(ctx context.Context) (netip.Addr, error) {
	a := IPv6UnderlayAddr(h.Index)
	if err := ipCmd(ctx, "-n", h.NS, "addr", "add", netip.PrefixFrom(a, IPv6UnderlayPrefix.Bits()).String(), "dev", h.Link, "nodad"); err != nil {
		return netip.Addr{}, fmt.Errorf("testbed: host %s: IPv6 underlay address: %w", h.Name, err)
	}
	h.mu.Lock()
	h.Addr6 = a
	h.mu.Unlock()
	return a, nil
}

// AddContainerIPv6 gives container c on h the IPv6 side Docker gives a
// container with --ipv6 --fixed-cidr-v6=<IPv6 lease>: the bridge gets
// gateway6 (FLANNEL_IPV6_SUBNET, <lease>::1/64), the container the next
// address and a default route via the bridge. IPv6 forwarding goes on in
// the host.
func (h *Host) AddContainerIPv6(ctx context.Context, c *Container, gateway6 netip.Prefix) error {
	if !gateway6.Addr().Is6() || gateway6.Addr().Is4In6() {
		return fmt.Errorf("host %s: container %s: IPv6 gateway %s: not an IPv6 prefix", h.Name, c.Name, gateway6)
	}
	if err := setSysctl(ctx, h.NS, "net/ipv6/conf/all/forwarding", "1"); err != nil {
		return fmt.Errorf("host %s: %w", h.Name, err)
	}
	addr6 := gateway6.Addr().Next()
	steps := [][]string{
		{"-n", h.NS, "addr", "add", gateway6.String(), "dev", c.Bridge, "nodad"},
		{"-n", c.NS, "addr", "add", netip.PrefixFrom(addr6, gateway6.Bits()).String(), "dev", c.Link, "nodad"},
		{"-n", c.NS, "-6", "route", "add", "default", "via", gateway6.Addr().String(), "dev", c.Link},
	}
	for _, s := range steps {
		if err := ipCmd(ctx, s...); err != nil {
			return fmt.Errorf("host %s: container %s: IPv6: %w", h.Name, c.Name, err)
		}
	}
	c.Gateway6, c.Addr6 = gateway6, addr6
	return nil
}

// FlannelDualStackLeaseKey is flannel's etcd key of a dual-stack lease:
// /coreos.com/network/subnets/198.18.7.0-24&2001:db8:1:7::-64.
func FlannelDualStackLeaseKey(subnet, subnet6 netip.Prefix) string {
	subnet6 = subnet6.Masked()
	return fmt.Sprintf("%s&%s-%d", FlannelLeaseKey(subnet), subnet6.Addr(), subnet6.Bits())
}

// PutFlannelDualStackLease writes a dual-stack lease as a flanneld udp host
// in a dual-stack network does: key FlannelDualStackLeaseKey, value
// {"PublicIP":"<publicIP>","PublicIPv6":"<publicIPv6>"} (null when
// publicIPv6 is zero), no BackendData (so no IPv6 data plane), attached to
// an etcd lease of ttl (0: a reservation).
func (b *Bed) PutFlannelDualStackLease(ctx context.Context, subnet, subnet6 netip.Prefix, publicIP, publicIPv6 netip.Addr, ttl time.Duration) (clientv3.LeaseID, error) {
	v := struct {
		PublicIP   string
		PublicIPv6 *string
	}{PublicIP: publicIP.String()}
	if publicIPv6.IsValid() {
		s := publicIPv6.String()
		v.PublicIPv6 = &s
	}
	value, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	return b.putLeaseKey(ctx, FlannelDualStackLeaseKey(subnet, subnet6), string(value), ttl)
}
