package udp

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
)

// The direct-routing tests run in namespace A of twoHosts (192.0.2.1/24 on
// its veth) with one more route, 198.51.100.0/24 via 192.0.2.2: a peer in
// 198.51.100.0/24 is behind a gateway, not on-link.
var (
	offLinkPeer = netip.MustParseAddr("198.51.100.7")
	leaseC      = netip.MustParsePrefix("198.18.3.0/24")
	leaseD      = netip.MustParsePrefix("198.18.4.0/24")
	leaseE      = netip.MustParsePrefix("198.18.5.0/24")
)

// directBed is namespace A prepared for direct routing, with a netlink
// handle in it for the test's own look at the routes.
type directBed struct {
	*twoHosts
	nl       *netlink.Handle
	underlay int // index of A's veth
}

func newDirectBed(t *testing.T) *directBed {
	t.Helper()
	h := newTwoHosts(t)
	nl, err := netlink.NewHandleAt(h.a)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	link, err := nl.LinkByName(h.vethA)
	if err != nil {
		t.Fatal(err)
	}
	if err := nl.RouteAdd(&netlink.Route{Dst: ipNet(netip.MustParsePrefix("198.51.100.0/24")), Gw: hostB.AsSlice(), LinkIndex: link.Attrs().Index}); err != nil {
		t.Fatal(err)
	}
	return &directBed{twoHosts: h, nl: nl, underlay: link.Attrs().Index}
}

// directLease is the lease event of a Tulle host that offers direct
// routing (and partial checksums).
func directLease(s netip.Prefix, pub netip.Addr) subnet.Event {
	ev := lease(s, pub)
	ev.Lease.Attrs.BackendData = []byte(`{"tulle":{"version":"test","features":["` + FeaturePartialChecksum + `","` + FeatureDirect + `"]}}`)
	return ev
}

func gone(ev subnet.Event) subnet.Event {
	ev.Type = subnet.EventRemoved
	return ev
}

// newBackend makes (without running) a Backend in A whose own lease is
// own, with DirectRouting as given and mods applied to its options,
// closed in Cleanup; logs go to the
// returned buffer, printed if the test fails.
func (d *directBed) newBackend(t *testing.T, own subnet.Event, direct bool, mods ...func(*Options)) (*Backend, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	var b *Backend
	err := nstest.In(d.a, func() error {
		opts := Options{
			TunName:       d.prefix + "t",
			Workers:       1,
			PublicIP:      own.Lease.Attrs.PublicIP,
			MTU:           1500 - proto.EncapOverhead,
			Network:       network,
			SubnetLen:     24,
			Lease:         own.Lease,
			Logger:        slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
			DirectRouting: direct,
			Underlay:      d.underlay,
		}
		for _, m := range mods {
			m(&opts)
		}
		var err error
		b, err = New(opts)
		return err
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil { // idempotent: a test may have closed it
			t.Errorf("Close: %v", err)
		}
		if t.Failed() {
			t.Logf("backend log:\n%s", logs.String())
		}
	})
	return b, logs
}

// protoRoutes lists A's main-table routes of RouteProtocol as
// "<dst> via <gw> dev <index>", sorted.
func (d *directBed) protoRoutes(t *testing.T) []string {
	t.Helper()
	rs, err := d.nl.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range rs {
		s, gw := routeKey(r)
		out = append(out, fmt.Sprintf("%v via %v dev %d", s, gw, r.LinkIndex))
	}
	slices.Sort(out)
	return out
}

func (d *directBed) want(t *testing.T, what string, routes ...string) {
	t.Helper()
	routes = slices.Clone(routes)
	slices.Sort(routes)
	if got := d.protoRoutes(t); !slices.Equal(got, routes) {
		t.Errorf("%s: routes of protocol %d:\n got  %q\n want %q", what, RouteProtocol, got, routes)
	}
}

// wantKernelGateways checks the gateway by which A's kernel routes each
// destination (none: the zero address).
func (d *directBed) wantKernelGateways(t *testing.T, want map[netip.Addr]netip.Addr) {
	t.Helper()
	for dst, wantGw := range want {
		rs, err := d.nl.RouteGet(dst.AsSlice())
		if err != nil || len(rs) != 1 {
			t.Fatalf("route get %v: %v %v", dst, rs, err)
		}
		gw, _ := netip.AddrFromSlice(rs[0].Gw)
		if gw != wantGw {
			t.Errorf("the kernel routes %v via %v (link %d), want via %v", dst, gw, rs[0].LinkIndex, wantGw)
		}
	}
}

// addRoute adds a route to dst via gw on the underlay of protocol p, as
// a killed tulled (or another program) would have left it.
func (d *directBed) addRoute(t *testing.T, dst string, gw netip.Addr, p netlink.RouteProtocol) {
	t.Helper()
	r := &netlink.Route{Dst: ipNet(netip.MustParsePrefix(dst)), Gw: gw.AsSlice(), LinkIndex: d.underlay, Protocol: p}
	if err := d.nl.RouteAdd(r); err != nil {
		t.Fatalf("add %s via %v proto %d: %v", dst, gw, p, err)
	}
}

func (d *directBed) route(s netip.Prefix, gw netip.Addr) string {
	return fmt.Sprintf("%v via %v dev %d", s, gw, d.underlay)
}

func TestDirectRouteOnlyToOnLinkPeersThatOfferIt(t *testing.T) {
	d := newDirectBed(t)
	b, logs := d.newBackend(t, directLease(leaseA, hostA), true)
	flannel := netip.MustParseAddr("192.0.2.3")
	tulleNoDirect := netip.MustParseAddr("192.0.2.4")
	b.Apply([]subnet.Event{
		directLease(leaseA, hostA),                                 // our own
		directLease(leaseB, hostB),                                 // on-link, offers it: direct
		lease(leaseC, flannel),                                     // a flannel host: UDP
		tulleLease(leaseD, tulleNoDirect),                          // Tulle without the feature: UDP
		directLease(leaseE, offLinkPeer),                           // behind a gateway: UDP
		directLease(netip.MustParsePrefix("198.18.6.0/24"), hostA), // our own public IP: ignored
	})
	d.want(t, "snapshot", d.route(leaseB, hostB))
	// The peer behind a gateway is left out by our on-link check, not by
	// the kernel refusing its route.
	if strings.Contains(logs.String(), "direct route not added") {
		t.Errorf("a direct route was tried and refused:\n%s", logs.String())
	}

	// The kernel picks it over <Network> dev tun for B's subnet only.
	d.wantKernelGateways(t, map[netip.Addr]netip.Addr{
		netip.MustParseAddr("198.18.2.9"): hostB,
		netip.MustParseAddr("198.18.3.9"): {},
		netip.MustParseAddr("198.18.5.9"): {},
	})
	// Every peer stays in the UDP table, the direct one included.
	if n := b.table.Load().count; n != 4 {
		t.Errorf("route table holds %d peers, want 4", n)
	}

	b.Apply([]subnet.Event{gone(directLease(leaseB, hostB))})
	d.want(t, "B's lease removed")
	b.Apply([]subnet.Event{directLease(leaseB, hostB)})
	d.want(t, "B back", d.route(leaseB, hostB))
	b.Apply([]subnet.Event{tulleLease(leaseB, hostB)})
	d.want(t, "B's lease no longer offers it")
	b.Apply([]subnet.Event{directLease(leaseB, hostB), directLease(leaseC, flannel)})
	d.want(t, "B offers it again; the flannel host turned into a Tulle host", d.route(leaseB, hostB), d.route(leaseC, flannel))
	moved := netip.MustParseAddr("192.0.2.5")
	b.Apply([]subnet.Event{directLease(leaseB, moved)})
	d.want(t, "B's subnet moved to another host", d.route(leaseB, moved), d.route(leaseC, flannel))

	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	d.want(t, "after Close")
	b.Apply([]subnet.Event{directLease(leaseD, tulleNoDirect)})
	d.want(t, "Apply after Close")
}

func TestDirectRoutesOnlyWhileOurOwnLeaseOffersIt(t *testing.T) {
	d := newDirectBed(t)
	// A host that cannot take direct traffic (CheckDirect failed) writes
	// no feature: it must not route to others directly either, or their
	// replies would come back by UDP and fail a strict rp_filter there.
	b, logs := d.newBackend(t, tulleLease(leaseA, hostA), true)
	b.Apply([]subnet.Event{tulleLease(leaseA, hostA), directLease(leaseB, hostB), directLease(leaseC, stranger)})
	d.want(t, "own lease without the feature")
	if !strings.Contains(logs.String(), "our lease does not advertise it") {
		t.Errorf("no warning that our lease does not advertise direct routing")
	}
	b.Apply([]subnet.Event{directLease(leaseA, hostA)}) // e.g. a reservation rewritten with our BackendData
	d.want(t, "own lease now offers it", d.route(leaseB, hostB), d.route(leaseC, stranger))
	b.Apply([]subnet.Event{tulleLease(leaseA, hostA)})
	d.want(t, "own lease offers it no more")
}

func TestDirectRoutesReconciledWithTheFirstLeaseBatch(t *testing.T) {
	d := newDirectBed(t)
	// What a tulled killed with SIGKILL leaves, and what is not ours.
	add := func(dst string, gw netip.Addr, p netlink.RouteProtocol) { t.Helper(); d.addRoute(t, dst, gw, p) }
	add("198.18.9.0/24", netip.MustParseAddr("192.0.2.9"), RouteProtocol) // its peer left while no tulled ran
	add("198.18.2.0/24", stranger, RouteProtocol)                         // B's subnet, but another gateway
	add("198.18.3.0/24", stranger, RouteProtocol)                         // C: still wanted, kept
	add("198.19.5.0/24", hostB, RouteProtocol)                            // outside the network: not ours
	add("198.18.7.0/24", hostB, unix.RTPROT_STATIC)                       // an operator's route
	all := []string{
		d.route(leaseB, stranger), d.route(leaseC, stranger),
		d.route(netip.MustParsePrefix("198.18.9.0/24"), netip.MustParseAddr("192.0.2.9")),
		d.route(netip.MustParsePrefix("198.19.5.0/24"), hostB),
	}
	slices.Sort(all)

	b, _ := d.newBackend(t, directLease(leaseA, hostA), true)
	// Until the lease snapshot says otherwise the routes stay: traffic to
	// direct peers keeps flowing across a restart.
	d.want(t, "after New", all...)

	b.Apply([]subnet.Event{directLease(leaseA, hostA), directLease(leaseB, hostB), directLease(leaseC, stranger)})
	d.want(t, "after the snapshot", d.route(leaseB, hostB), d.route(leaseC, stranger), d.route(netip.MustParsePrefix("198.19.5.0/24"), hostB))
	rs, err := d.nl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: unix.RTPROT_STATIC}, netlink.RT_FILTER_PROTOCOL)
	if err != nil || len(rs) != 1 {
		t.Errorf("the operator's static route: %v %v, want it kept", rs, err)
	}

	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	d.want(t, "after Close", d.route(netip.MustParsePrefix("198.19.5.0/24"), hostB))
}

func TestDirectRoutingOffRemovesRoutesAnEarlierRunLeft(t *testing.T) {
	d := newDirectBed(t)
	if err := d.nl.RouteAdd(&netlink.Route{Dst: ipNet(leaseB), Gw: hostB.AsSlice(), LinkIndex: d.underlay, Protocol: RouteProtocol}); err != nil {
		t.Fatal(err)
	}
	b, _ := d.newBackend(t, directLease(leaseA, hostA), false)
	d.want(t, "after New with DirectRouting off")
	b.Apply([]subnet.Event{directLease(leaseA, hostA), directLease(leaseB, hostB)})
	d.want(t, "after the snapshot with DirectRouting off")
	if n := b.table.Load().count; n != 1 {
		t.Errorf("route table holds %d peers, want 1 (B, by UDP)", n)
	}
}

func TestCheckDirectWantsThePublicIPOnTheUnderlay(t *testing.T) {
	d := newDirectBed(t)
	check := func(pub netip.Addr) error {
		var err error
		if ierr := nstest.In(d.a, func() error { err = CheckDirect(d.underlay, pub); return nil }); ierr != nil {
			t.Fatal(ierr)
		}
		return err
	}
	if err := check(hostA); err != nil {
		t.Errorf("CheckDirect(%v) = %v, want nil: it is the underlay's address", hostA, err)
	}
	nat := netip.MustParseAddr("198.51.100.20")
	if err := check(nat); err == nil || !strings.Contains(err.Error(), "not an address of the underlay interface") {
		t.Errorf("CheckDirect(%v) = %v, want an error naming the cause", nat, err)
	}
}

func TestDirectRoutingWarnsWhenTheUnderlayDoesNotForward(t *testing.T) {
	d := newDirectBed(t)
	setForwarding := func(v string) {
		t.Helper()
		err := nstest.In(d.a, func() error {
			return os.WriteFile("/proc/sys/net/ipv4/conf/"+d.vethA+"/forwarding", []byte(v), 0o644)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	const warning = "forwarding is off on the underlay interface"
	setForwarding("0")
	b, logs := d.newBackend(t, directLease(leaseA, hostA), true)
	if !strings.Contains(logs.String(), warning) {
		t.Errorf("forwarding off: no warning %q in the log", warning)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	setForwarding("1")
	_, logs = d.newBackend(t, directLease(leaseA, hostA), true)
	if strings.Contains(logs.String(), warning) {
		t.Errorf("forwarding on: warning %q in the log", warning)
	}
}
