package main

import (
	"testing"
)

func TestDirectModeIsJudgedAgainstTheUnderlay(t *testing.T) {
	sum := []ModeSummary{
		{Mode: modeUnderlay, Path: pathHost, Streams: 4, TCP1Gbit: Stat{N: 3, Median: 20}, TCPNGbit: Stat{N: 3, Median: 40}, RTTMedianUs: Stat{N: 3, Median: 40}},
		{Mode: modeTulleDirect, Path: pathContainer, Streams: 4, TCP1Gbit: Stat{N: 3, Median: 19.5}, TCPNGbit: Stat{N: 3, Median: 36}, RTTMedianUs: Stat{N: 3, Median: 65}},
	}
	got := map[string]Target{}
	cfg := Config{Paths: []string{pathContainer, pathHost}}
	for _, tg := range directTargets(cfg, sum) {
		got[tg.Name] = tg
	}
	for name, want := range map[string]Target{
		"container: tulle-direct TCP 1 stream >= 0.95x underlay":    {Got: "0.97x", Met: true},
		"container: tulle-direct TCP 4 streams >= 0.95x underlay":   {Got: "0.90x", Met: false},
		"container: tulle-direct ping RTT within 20 us of underlay": {Got: "+25 us", Met: false},
	} {
		if g, ok := got[name]; !ok || g.Got != want.Got || g.Met != want.Met {
			t.Errorf("target %q = %+v (present %v), want %+v", name, g, ok, want)
		}
	}
	if len(got) != 3 {
		t.Errorf("%d targets, want 3: %+v", len(got), got)
	}
	if tg := directTargets(cfg, sum[1:]); tg != nil {
		t.Errorf("targets without an underlay measurement: %+v", tg)
	}
	if d, c := tulleMode(modeTulleDirect); d != "offload" || c != directNetworkConfig {
		t.Errorf("tulle-direct runs %s with %s", d, c)
	}
}
