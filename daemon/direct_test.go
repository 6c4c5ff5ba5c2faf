package daemon

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/daemon/config"
	"github.com/tulle-net/tulle/daemon/netif"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
)

// A host advertises direct routing only when the network config turns it
// on and it can take direct traffic (its public IP is on its underlay).
func TestLeaseAdvertisesDirectRoutingOnlyWhenConfiguredAndPossible(t *testing.T) {
	nstest.EnterNewNetns(t) // lo (127.0.0.1/8) plays the underlay
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		direct     bool
		public     string
		wantDirect bool
		wantWarn   bool
	}{
		{"config off", false, "127.0.0.1", false, false},
		{"config on, public IP on the underlay", true, "127.0.0.1", true, false},
		{"config on, public IP elsewhere (NAT)", true, "192.0.2.77", false, true},
	} {
		// No subtests: they would run on other threads, outside the namespace.
		var logs bytes.Buffer
		d := &daemon{
			cfg: &config.Config{PartialChecksums: true},
			log: slog.New(slog.NewTextHandler(&logs, nil)),
			sel: netif.Selection{Name: "lo", Index: lo.Attrs().Index, PublicIP: netip.MustParseAddr(tc.public)},
		}
		info, ok := udp.ParseHostInfo(d.leaseBackendData(&subnet.Config{DirectRouting: tc.direct}))
		if !ok {
			t.Fatalf("%s: BackendData without Tulle's mark", tc.name)
		}
		if got := strings.Join(info.Features, ","); got != map[bool]string{true: "partial-checksum,direct-routing", false: "partial-checksum"}[tc.wantDirect] {
			t.Errorf("%s: features %q, want direct-routing: %v", tc.name, got, tc.wantDirect)
		}
		if warned := strings.Contains(logs.String(), "cannot take direct traffic"); warned != tc.wantWarn {
			t.Errorf("%s: warned %v, want %v; log:\n%s", tc.name, warned, tc.wantWarn, logs.String())
		}
	}
}
