package udp

import (
	"errors"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
)

// Direct routing in a dual-stack network. The bed is directBed's with the
// IPv6 underlay of twoHosts (A hostA6, B's veth hostB6 and stranger6, all
// in 2001:db8:ffff::/64) and, in A, 2001:db8:fffe::/64 via hostB6: a peer
// there is behind a gateway.
var (
	offLinkPeer6 = netip.MustParseAddr("2001:db8:fffe::7")
	leaseD6      = netip.MustParsePrefix("2001:db8:1:4::/64")
	leaseE6      = netip.MustParsePrefix("2001:db8:1:5::/64")
	leaseB6moved = netip.MustParsePrefix("2001:db8:1:12::/64")
	// directFeatures6 are what a dual-stack Tulle host that takes direct
	// traffic of both families advertises.
	directFeatures6 = []string{FeaturePartialChecksum, FeatureDirect, FeatureDirectIPv6, FeatureIPv6}
)

func newDirectBed6(t *testing.T) *directBed {
	t.Helper()
	d := newDirectBed(t)
	d.addUnderlay6(t)
	r := &netlink.Route{Dst: ipNet(netip.MustParsePrefix("2001:db8:fffe::/64")), Gw: hostB6.AsSlice(), LinkIndex: d.underlay}
	if err := d.nl.RouteAdd(r); err != nil {
		t.Fatal(err)
	}
	return d
}

// dualStackDirect makes a backend's options dual-stack with PublicIPv6
// hostA6 (the IPv6 underlay switch stays off: direct routes do not need it).
func dualStackDirect(o *Options) {
	dualStack(o)
	o.PublicIPv6 = hostA6
}

func TestDirectIPv6RouteOnlyViaAnOnLinkPublicIPv6(t *testing.T) {
	d := newDirectBed6(t)
	own := dualLease(leaseA, leaseA6, hostA, hostA6, directFeatures6...)
	b, logs := d.newBackend(t, own, true, dualStackDirect)
	leaseF := netip.MustParsePrefix("198.18.6.0/24")
	hostD, hostE, hostF := netip.MustParseAddr("192.0.2.4"), netip.MustParseAddr("192.0.2.5"), netip.MustParseAddr("192.0.2.6")
	b.Apply([]subnet.Event{
		own,
		dualLease(leaseB, leaseB6, hostB, hostB6, directFeatures6...),                  // both families direct
		dualLease(leaseC, leaseC6, stranger, offLinkPeer6, directFeatures6...),         // its PublicIPv6 behind a gateway: IPv4 only
		dualLease(leaseD, leaseD6, hostD, stranger6, FeatureDirect, FeatureIPv6),       // does not offer IPv6 direct
		dualLease(leaseE, leaseE6, hostE, stranger6, FeatureDirect, FeatureDirectIPv6), // we carry no IPv6 to it
		dualLease(leaseF, leaseB6, hostF, stranger6, directFeatures6...),               // names B's IPv6 lease: not its own
	})
	d.want(t, "snapshot", d.route(leaseB, hostB), d.route(leaseB6, hostB6), d.route(leaseC, stranger),
		d.route(leaseD, hostD), d.route(leaseE, hostE), d.route(leaseF, hostF))
	if strings.Contains(logs.String(), "direct route not added") {
		t.Errorf("a direct route was tried and refused:\n%s", logs.String())
	}
	// The kernel picks it over <IPv6Network> dev tun for B's IPv6 lease only.
	d.wantKernelGateways(t, map[netip.Addr]netip.Addr{
		netip.MustParseAddr("2001:db8:1:2::9"): hostB6,
		netip.MustParseAddr("2001:db8:1:3::9"): {},
		netip.MustParseAddr("2001:db8:1:4::9"): {},
	})

	v4 := []string{d.route(leaseC, stranger), d.route(leaseD, hostD), d.route(leaseE, hostE), d.route(leaseF, hostF)}
	with := func(r ...string) []string { out := append(slices.Clone(v4), r...); slices.Sort(out); return out }
	b.Apply([]subnet.Event{gone(dualLease(leaseB, leaseB6, hostB, hostB6, directFeatures6...))})
	d.want(t, "B's lease removed: both its routes go", with()...)
	b.Apply([]subnet.Event{dualLease(leaseB, leaseB6moved, hostB, hostB6, directFeatures6...)})
	d.want(t, "B back with another IPv6 lease", with(d.route(leaseB, hostB), d.route(leaseB6moved, hostB6))...)
	b.Apply([]subnet.Event{dualLease(leaseB, leaseB6moved, hostB, hostB6, FeaturePartialChecksum, FeatureDirect, FeatureIPv6)})
	d.want(t, "B no longer offers IPv6 direct", with(d.route(leaseB, hostB))...)
	b.Apply([]subnet.Event{dualLease(leaseB, leaseB6moved, hostB, hostB6, directFeatures6...)})
	d.want(t, "B offers it again", with(d.route(leaseB, hostB), d.route(leaseB6moved, hostB6))...)

	// Symmetry per family: without our own lease offering IPv6 direct, no
	// IPv6 route; IPv4 routes stay.
	b.Apply([]subnet.Event{dualLease(leaseA, leaseA6, hostA, hostA6, FeaturePartialChecksum, FeatureDirect, FeatureIPv6)})
	d.want(t, "own lease without IPv6 direct", with(d.route(leaseB, hostB))...)
	b.Apply([]subnet.Event{own})
	d.want(t, "own lease with IPv6 direct again", with(d.route(leaseB, hostB), d.route(leaseB6moved, hostB6))...)

	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	d.want(t, "after Close")
}

// A killed tulled leaves routes of both families; the first lease batch
// keeps the wanted ones and removes the rest, IPv6 ones included; with
// DirectRouting off New removes them all.
func TestDirectIPv6RoutesReconciledWithTheFirstLeaseBatch(t *testing.T) {
	d := newDirectBed6(t)
	add := func(dst string, gw netip.Addr) { t.Helper(); d.addRoute(t, dst, gw, RouteProtocol) }
	stale6 := netip.MustParsePrefix("2001:db8:1:9::/64")
	add(leaseB.String(), hostB)
	add(leaseB6.String(), hostB6)     // wanted: kept
	add(stale6.String(), stranger6)   // its peer left while no tulled ran
	add(leaseC6.String(), stranger6)  // C offers no IPv6 direct
	add("2001:db8:2::/64", stranger6) // outside the networks: not ours
	outside := d.route(netip.MustParsePrefix("2001:db8:2::/64"), stranger6)

	own := dualLease(leaseA, leaseA6, hostA, hostA6, directFeatures6...)
	b, _ := d.newBackend(t, own, true, dualStackDirect)
	all := []string{d.route(leaseB, hostB), d.route(leaseB6, hostB6), d.route(stale6, stranger6), d.route(leaseC6, stranger6), outside}
	slices.Sort(all)
	d.want(t, "after New", all...)
	b.Apply([]subnet.Event{own,
		dualLease(leaseB, leaseB6, hostB, hostB6, directFeatures6...),
		dualLease(leaseC, leaseC6, stranger, stranger6, FeatureDirect, FeatureIPv6)})
	d.want(t, "after the snapshot", d.route(leaseB, hostB), d.route(leaseB6, hostB6), d.route(leaseC, stranger), outside)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	d.want(t, "after Close", outside)

	add(leaseB6.String(), hostB6)
	d.newBackend(t, own, false, dualStackDirect)
	d.want(t, "after New with DirectRouting off", outside)
}

// The IPv6 forwarding warning follows net.ipv6.conf.all.forwarding, the
// switch IPv6 forwards by (the interface's own flag does not), and is
// given only when direct IPv6 traffic can come (our lease offers it).
func TestDirectRoutingWarnsWhenIPv6IsNotForwarded(t *testing.T) {
	d := newDirectBed6(t)
	set := func(kv ...string) {
		t.Helper()
		err := nstest.In(d.a, func() error {
			for i := 0; i < len(kv); i += 2 {
				if err := os.WriteFile("/proc/sys/net/"+kv[i], []byte(kv[i+1]), 0o644); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	const warning = "set net.ipv6.conf.all.forwarding=1"
	own := dualLease(leaseA, leaseA6, hostA, hostA6, directFeatures6...)
	for _, tc := range []struct {
		what     string
		own      subnet.Event
		sysctls  []string
		wantWarn bool
	}{
		{"IPv6 forwarding off", own, []string{"ipv4/ip_forward", "1", "ipv6/conf/all/forwarding", "0"}, true},
		{"IPv6 forwarding on, the interface's flag off", own,
			[]string{"ipv6/conf/all/forwarding", "1", "ipv6/conf/" + d.vethA + "/forwarding", "0"}, false},
		{"IPv6 forwarding off, our lease takes no direct IPv6",
			dualLease(leaseA, leaseA6, hostA, hostA6, FeatureDirect, FeatureIPv6), []string{"ipv6/conf/all/forwarding", "0"}, false},
	} {
		set(tc.sysctls...)
		b, logs := d.newBackend(t, tc.own, true, dualStackDirect)
		if warned := strings.Contains(logs.String(), warning); warned != tc.wantWarn {
			t.Errorf("%s: warned %v, want %v; log:\n%s", tc.what, warned, tc.wantWarn, logs.String())
		}
		if strings.Contains(logs.String(), "set net.ipv4.ip_forward=1") {
			t.Errorf("%s: IPv4 forwarding is on, but warned about it:\n%s", tc.what, logs.String())
		}
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// Why a peer without an IPv6 underlay keeps the UDP path for IPv6: Linux
// has no IPv6 route through an IPv4 gateway (RFC 5549's direction only:
// IPv4 routes through IPv6 gateways). If this fails, the kernel learned it,
// and direct.go could route IPv6 leases over an IPv4-only underlay too.
func TestKernelHasNoIPv6RouteThroughAnIPv4Gateway(t *testing.T) {
	d := newDirectBed6(t)
	err := d.nl.RouteAdd(&netlink.Route{
		Dst:       ipNet(leaseB6),
		Via:       &netlink.Via{AddrFamily: netlink.FAMILY_V4, Addr: hostB.AsSlice()},
		LinkIndex: d.underlay,
		Protocol:  RouteProtocol,
	})
	if err == nil {
		t.Fatalf("the kernel took %v via inet %v: IPv6 routes through IPv4 gateways work here", leaseB6, hostB)
	}
	if !errors.Is(err, unix.EINVAL) {
		t.Errorf("refused with %v, want EINVAL (IPv6 does not support RTA_VIA)", err)
	}
	t.Logf("refused as expected: %v", err)
}
