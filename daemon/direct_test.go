package daemon

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

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

// In a dual-stack network a host advertises direct IPv6 routing when the
// config turns direct routing on and its PublicIPv6 is on its underlay,
// decided apart from IPv4; without a PublicIPv6 it does not, and says why.
func TestLeaseAdvertisesDirectIPv6RoutingOnlyWhenItsPublicIPv6IsOnTheUnderlay(t *testing.T) {
	nstest.EnterNewNetns(t) // lo (127.0.0.1/8, 2001:db8:ffff::1) plays the underlay
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := netlink.ParseAddr("2001:db8:ffff::1/128")
	addr.Flags = unix.IFA_F_NODAD
	if err := netlink.AddrAdd(lo, addr); err != nil {
		t.Fatal(err)
	}
	cfg := &subnet.Config{DirectRouting: true, EnableIPv4: true, EnableIPv6: true}
	for _, tc := range []struct {
		name, public, public6 string
		want, wantLog         string
	}{
		{"both on the underlay", "127.0.0.1", "2001:db8:ffff::1", "partial-checksum,direct-routing,direct-routing-ipv6,ipv6", ""},
		{"PublicIPv6 elsewhere", "127.0.0.1", "2001:db8:ffff::99", "partial-checksum,direct-routing,ipv6", "cannot take direct IPv6 traffic"},
		{"no PublicIPv6", "127.0.0.1", "", "partial-checksum,direct-routing,ipv6", "has no IPv6 underlay address"},
		{"PublicIP elsewhere (NAT), PublicIPv6 on the underlay", "192.0.2.77", "2001:db8:ffff::1", "partial-checksum,direct-routing-ipv6,ipv6", "cannot take direct traffic"},
	} {
		var logs bytes.Buffer
		sel := netif.Selection{Name: "lo", Index: lo.Attrs().Index, PublicIP: netip.MustParseAddr(tc.public)}
		if tc.public6 != "" {
			sel.PublicIPv6 = netip.MustParseAddr(tc.public6)
		}
		d := &daemon{cfg: &config.Config{PartialChecksums: true}, log: slog.New(slog.NewTextHandler(&logs, nil)), sel: sel}
		info, ok := udp.ParseHostInfo(d.leaseBackendData(cfg))
		if !ok {
			t.Fatalf("%s: BackendData without Tulle's mark", tc.name)
		}
		if got := strings.Join(info.Features, ","); got != tc.want {
			t.Errorf("%s: features %q, want %q", tc.name, got, tc.want)
		}
		if tc.wantLog != "" && !strings.Contains(logs.String(), tc.wantLog) {
			t.Errorf("%s: log lacks %q:\n%s", tc.name, tc.wantLog, logs.String())
		}
	}
}
