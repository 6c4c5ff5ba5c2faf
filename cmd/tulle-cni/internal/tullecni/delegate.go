package tullecni

import (
	"fmt"
	"maps"
	"net/netip"

	"github.com/tulle-net/tulle/subnet"
)

// BuildDelegate returns the main plugin's config for network n on a host
// whose lease is env, as flannel's CNI plugin derives it:
//
//	type       "bridge" unless delegate.type says otherwise
//	ipMasq     !FLANNEL_IPMASQ (masquerade here only if tulled does not)
//	mtu        FLANNEL_MTU
//	isGateway  true (bridge only)
//	ipam       n.IPAM with type "host-local" unless given,
//	           ranges [[{subnet: <lease>}]] (+ the IPv6 lease),
//	           routes n.IPAM.routes + [{dst: FLANNEL_NETWORK, gw: <lease .1>}]
//	           (+ the IPv6 network via <lease ::1>)
//
// The route's gw is the gateway host-local gives the container anyway
// (the range's first address), so the route installed is flannel's; it is
// spelt out because the bridge plugin's CHECK before plugins v1.2 (Debian
// 12 ships v1.1.1) looks a route up by gateway too and misses one without.
//
// Keys the user set in n.Delegate win over the derived ones; name and
// cniVersion are always n's. n is not modified.
func BuildDelegate(n *NetConf, env subnet.Env) (map[string]any, error) {
	if !env.Subnet.IsValid() && !env.IPv6Subnet.IsValid() {
		return nil, fmt.Errorf("%s: holds neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET", n.SubnetFile)
	}
	d := maps.Clone(n.Delegate)
	if d == nil {
		d = map[string]any{}
	}
	d["name"] = n.Name
	if n.CNIVersion != "" {
		d["cniVersion"] = n.CNIVersion
	}
	d["type"] = n.DelegateType()
	setDefault(d, "ipMasq", !env.IPMasq)
	if env.MTU > 0 {
		setDefault(d, "mtu", env.MTU)
	}
	if d["type"] == "bridge" {
		setDefault(d, "isGateway", true)
	}
	if n.RuntimeConfig != nil {
		d["runtimeConfig"] = n.RuntimeConfig
	}

	ipam := maps.Clone(n.IPAM)
	if ipam == nil {
		ipam = map[string]any{}
	}
	setDefault(ipam, "type", DefaultIPAMType)
	var ranges []any
	var networks []map[string]any
	for _, p := range []struct{ lease, network netip.Prefix }{
		{env.Subnet, env.Network},
		{env.IPv6Subnet, env.IPv6Network},
	} {
		if !p.lease.IsValid() {
			continue
		}
		lease := p.lease.Masked()
		ranges = append(ranges, []any{map[string]any{"subnet": lease.String()}})
		if p.network.IsValid() {
			networks = append(networks, map[string]any{"dst": p.network.Masked().String(), "gw": subnet.FirstHost(lease).Addr().String()})
		}
	}
	ipam["ranges"] = ranges

	routes, err := userRoutes(n)
	if err != nil {
		return nil, err
	}
	for _, r := range networks {
		if !hasRoute(routes, r["dst"].(string)) {
			routes = append(routes, r)
		}
	}
	ipam["routes"] = routes
	d["ipam"] = ipam
	return d, nil
}

func setDefault(m map[string]any, key string, v any) {
	if _, ok := m[key]; !ok {
		m[key] = v
	}
}

// userRoutes copies ipam.routes from the config, checking its shape.
func userRoutes(n *NetConf) ([]any, error) {
	raw, ok := n.IPAM["routes"]
	if !ok || raw == nil {
		return []any{}, nil
	}
	list, ok := raw.([]any)
	if !ok {
		return nil, fmt.Errorf("network config %q: ipam.routes: must be a list of {\"dst\": ...}", n.Name)
	}
	out := make([]any, 0, len(list)+2)
	for i, r := range list {
		m, ok := r.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("network config %q: ipam.routes[%d]: must be an object with \"dst\"", n.Name, i)
		}
		if _, ok := m["dst"].(string); !ok {
			return nil, fmt.Errorf("network config %q: ipam.routes[%d]: \"dst\" is missing", n.Name, i)
		}
		out = append(out, maps.Clone(m))
	}
	return out, nil
}

func hasRoute(routes []any, dst string) bool {
	for _, r := range routes {
		if m, ok := r.(map[string]any); ok && m["dst"] == dst {
			return true
		}
	}
	return false
}
