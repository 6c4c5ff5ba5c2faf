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
func (d *daemon) leaseBackendData(cfg *subnet.Config) json.RawMessage {
	if !cfg.DirectRouting {
		return backendData(d.cfg.PartialChecksums)
	}
	if err := udp.CheckDirect(d.sel.Index, d.sel.PublicIP); err != nil {
		d.log.Warn("DirectRouting is on in the network config, but this host cannot take direct traffic: every peer keeps the UDP path to and from it",
			"error", err)
		return backendData(d.cfg.PartialChecksums)
	}
	return backendData(d.cfg.PartialChecksums, udp.FeatureDirect)
}
