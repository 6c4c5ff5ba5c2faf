package main

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/tests/testbed"
)

// modeTulleDirect is tulled (offload driver) with "DirectRouting": true in
// the network config: both hosts are on one segment, so container traffic
// takes the kernel's direct route (<peer lease> via <peer> dev <underlay>)
// and no packet passes through tulled. Its reference is the underlay.
const modeTulleDirect = "tulle-direct"

// directNetworkConfig is testbed.DefaultNetworkConfig with direct routing.
const directNetworkConfig = `{"Network":"198.18.0.0/16","SubnetLen":24,"Backend":{"Type":"udp","DirectRouting":true}}`

// tulleMode returns the TUN driver and the network config of a Tulle mode.
func tulleMode(mode string) (driver, config string) {
	switch mode {
	case modeTulleDirect:
		return "offload", directNetworkConfig
	case modeTulleWater:
		return "water", testbed.DefaultNetworkConfig
	}
	return "offload", testbed.DefaultNetworkConfig
}

// waitDirectRoutes waits until each host routes the other's lease directly
// (the second host's lease reaches the first by the etcd watch after both
// are ready): without that the mode would measure the UDP path.
func waitDirectRoutes(ctx context.Context, hosts ...*testbed.Host) error {
	deadline := time.Now().Add(10 * time.Second)
	for _, h := range hosts {
		var want []string
		for _, p := range hosts {
			if p == h {
				continue
			}
			env, err := p.SubnetEnv()
			if err != nil {
				return err
			}
			want = append(want, fmt.Sprintf("%v via %v dev %s", env.Lease(), p.Addr, h.Link))
		}
		slices.Sort(want)
		for {
			got, err := h.RoutesOfProtocol(int(udp.RouteProtocol))
			if err != nil {
				return err
			}
			if slices.Equal(got, want) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: direct routes %q, want %q", h.Name, got, want)
			}
			if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
				return err
			}
		}
	}
	return nil
}

// directTargets judges issue 11's goals for tulle-direct against the bare
// underlay (which has only the host path: it is the reference of both);
// nothing if either is missing.
func directTargets(cfg Config, sum []ModeSummary) []Target {
	u := summaryOf(sum, modeUnderlay, pathHost)
	if u == nil {
		return nil
	}
	var out []Target
	for _, path := range cfg.Paths {
		d := summaryOf(sum, modeTulleDirect, path)
		if d == nil {
			continue
		}
		for _, c := range []struct {
			what string
			d, u Stat
		}{
			{"TCP 1 stream", d.TCP1Gbit, u.TCP1Gbit},
			{fmt.Sprintf("TCP %d streams", d.Streams), d.TCPNGbit, u.TCPNGbit},
		} {
			if c.d.Valid() && c.u.Valid() && c.u.Median > 0 {
				r := c.d.Median / c.u.Median
				out = append(out, Target{path + ": tulle-direct " + c.what + " >= 0.95x underlay", fmt.Sprintf("%.2fx", r), r >= 0.95})
			}
		}
		if d.RTTMedianUs.Valid() && u.RTTMedianUs.Valid() {
			diff := d.RTTMedianUs.Median - u.RTTMedianUs.Median
			out = append(out, Target{path + ": tulle-direct ping RTT within 20 us of underlay", fmt.Sprintf("%+.0f us", diff), diff <= 20})
		}
	}
	return out
}
