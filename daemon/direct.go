package daemon

import (
	"encoding/json"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/subnet"
)

// leaseBackendData is our lease's BackendData for the network config cfg:
// it advertises udp.FeatureDirect only when cfg enables DirectRouting and
// this host can take direct traffic (udp.CheckDirect), so that peers route
// to us directly only then, and we to them (the backend routes directly
// only while our own lease advertises it). It runs on the lease manager's
// goroutine, before the lease is written; d.sel is set by then and not
// changed afterwards.
//
// In a dual-stack network it also advertises the IPv6 features
// (udp.IPv6Features: the IPv6 data plane, and the IPv6 underlay when the
// config turns it on and this host has an IPv6 underlay address), and,
// with DirectRouting, udp.FeatureDirectIPv6 when this host's PublicIPv6
// takes direct traffic (decided apart from IPv4's: either may hold alone).
func (d *daemon) leaseBackendData(cfg *subnet.Config) json.RawMessage {
	feats := udp.IPv6Features(cfg, d.sel.PublicIPv6)
	if !cfg.DirectRouting {
		return backendData(d.cfg.PartialChecksums, feats...)
	}
	var direct []string
	if err := udp.CheckDirect(d.sel.Index, d.sel.PublicIP); err != nil {
		d.log.Warn("DirectRouting is on in the network config, but this host cannot take direct traffic: every peer keeps the UDP path to and from it",
			"error", err)
	} else {
		direct = append(direct, udp.FeatureDirect)
	}
	if cfg.EnableIPv4 && cfg.EnableIPv6 {
		if !d.sel.PublicIPv6.IsValid() {
			d.log.Info("DirectRouting: this host has no IPv6 underlay address, so IPv6 keeps the UDP path to and from it (an IPv6 route needs an IPv6 gateway)")
		} else if err := udp.CheckDirect(d.sel.Index, d.sel.PublicIPv6); err != nil {
			d.log.Warn("DirectRouting is on in the network config, but this host cannot take direct IPv6 traffic: IPv6 keeps the UDP path to and from it",
				"error", err)
		} else {
			direct = append(direct, udp.FeatureDirectIPv6)
		}
	}
	return backendData(d.cfg.PartialChecksums, append(direct, feats...)...)
}
