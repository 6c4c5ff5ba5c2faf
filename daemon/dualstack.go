package daemon

import (
	"errors"
	"fmt"

	"net/netip"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/daemon/ipmasq"
	"github.com/tulle-net/tulle/daemon/netif"
	"github.com/tulle-net/tulle/subnet"
)

// Dual stack, the daemon's side: a network config with EnableIPv6 gives
// each host an IPv6 lease beside its IPv4 one (one etcd key, flannel's
// "<v4>-<len>&<v6>-<len>"), which the data plane carries in the same UDP
// port; subnet.env, docker-opts, the CNI plugin and ip-masq give
// containers both families. The underlay stays IPv4 unless the config's
// Backend.IPv6Underlay is on and this host has an IPv6 underlay address
// (--public-ipv6, an IPv6 address on --iface, or the interface's global
// one): then peers that both offer it talk over IPv6, and the TUN MTU
// leaves room for the IPv6 header.
//
// An IPv6-only network (EnableIPv4 false) is refused: flannel's etcd
// layout keys every lease by its IPv4 subnet (an IPv6-only key is
// "0.0.0.0-0&<v6>-<len>", which flannel's own udp backend never writes),
// and flannel hosts sharing the etcd could not take part.

// minIPv6MTU is IPv6's minimum link MTU (RFC 8200): a smaller TUN device
// can not carry IPv6 at all (the kernel turns IPv6 off on it).
const minIPv6MTU = 1280

// errIPv6Only is checkNetworkConfig's refusal of an IPv6-only network.
var errIPv6Only = errors.New("EnableIPv4 is false: an IPv6-only network is not supported, because flannel's etcd layout keys every lease by its IPv4 subnet; " +
	"enable both (EnableIPv4 and EnableIPv6: a dual-stack network)")

// tunMTU is the TUN device's MTU under the network config cfg: the
// underlay MTU less 28, or less 48 when the config's IPv6 underlay is on
// and this host has an IPv6 underlay address.
func tunMTU(sel netif.Selection, cfg *subnet.Config) int {
	return sel.TunMTUFor(cfg.EnableIPv6 && cfg.IPv6Underlay)
}

// checkDualStack refuses, before the data plane starts, a dual-stack
// lease or MTU that can not carry IPv6. Neither happens with a lease this
// tulled took in a dual-stack network over a usual underlay.
func checkDualStack(cfg *subnet.Config, lease subnet.Lease, mtu int) error {
	if !cfg.EnableIPv6 {
		return nil
	}
	if !lease.IPv6Subnet.IsValid() {
		return asConfigError(fmt.Errorf("lease %s has no IPv6 subnet though the network config enables IPv6 (IPv6Network %s): delete the key or give it an IPv6 subnet", lease.Subnet, cfg.IPv6Network))
	}
	if mtu < minIPv6MTU {
		return fmt.Errorf("the overlay MTU %d is below IPv6's minimum of %d, so the dual-stack network's IPv6 can not be carried: raise the underlay interface's MTU", mtu, minIPv6MTU)
	}
	return nil
}

// dualStackOptions fills the data plane's IPv6 options from the network
// config; an IPv4-only network leaves them zero.
func (d *daemon) dualStackOptions(o *udp.Options, cfg *subnet.Config) {
	if !cfg.EnableIPv6 {
		return
	}
	o.IPv6Network = cfg.IPv6Network
	o.IPv6SubnetLen = cfg.IPv6SubnetLen
	o.PublicIPv6 = d.sel.PublicIPv6
	o.IPv6Underlay = cfg.IPv6Underlay
}

// ipv6Underlay says whether this host takes datagrams on its IPv6
// underlay address, for the logs.
func (d *daemon) ipv6Underlay(cfg *subnet.Config) bool {
	return cfg.EnableIPv6 && cfg.IPv6Underlay && d.sel.PublicIPv6.IsValid()
}

// subnetsText is our lease's subnets for logs and the status line:
// "198.18.1.0/24" or "198.18.1.0/24 and 2001:db8:1:1::/64".
func subnetsText(l subnet.Lease) string {
	if l.IPv6Subnet.IsValid() {
		return l.Subnet.String() + " and " + l.IPv6Subnet.String()
	}
	return l.Subnet.String()
}

// newMasqRules prepares the ip-masq rules: IPv4, and IPv6 in a dual-stack
// network (flannel's rules for each family).
func (d *daemon) newMasqRules() ([]*ipmasq.Rules, error) {
	nets := [][2]netip.Prefix{{d.netCfg.Network, d.lease.Subnet}}
	if d.netCfg.EnableIPv6 {
		nets = append(nets, [2]netip.Prefix{d.netCfg.IPv6Network, d.lease.IPv6Subnet})
	}
	var rules []*ipmasq.Rules
	for _, n := range nets {
		m, err := ipmasq.New(n[0], n[1], d.log.With("component", "ip-masq"))
		if err != nil {
			return nil, err
		}
		rules = append(rules, m)
	}
	return rules, nil
}

// envIPv6Subnet is FLANNEL_IPV6_SUBNET as subnet.env holds it (the lease's
// first address, <lease>::1/64), for the log; "" in an IPv4-only network.
func envIPv6Subnet(e subnet.Env) string {
	if !e.IPv6Subnet.IsValid() {
		return ""
	}
	return subnet.FirstHost(e.IPv6Subnet).String()
}
