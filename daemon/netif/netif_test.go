package netif

import (
	"net"
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/tulle-net/tulle/tests/nstest"
)

// underlay builds, in a fresh namespace, two veth ends: a (192.0.2.1/24,
// MTU 1400, default route via 192.0.2.254) and b (198.51.100.1/24, MTU 1500).
func underlay(t *testing.T) (h *netlink.Handle, a, b string) {
	t.Helper()
	ns := nstest.NewNetns(t)
	h = ns.Handle
	a, b = nstest.Name("a"), nstest.Name("b")
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a, MTU: 1400}, PeerName: b}
	if err := h.LinkAdd(veth); err != nil {
		t.Fatalf("add veth %s/%s: %v", a, b, err)
	}
	for name, cidr := range map[string]string{a: "192.0.2.1/24", b: "198.51.100.1/24"} {
		link, err := h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		addr, _ := netlink.ParseAddr(cidr)
		if err := h.AddrAdd(link, addr); err != nil {
			t.Fatalf("addr %s on %s: %v", cidr, name, err)
		}
		if err := h.LinkSetUp(link); err != nil {
			t.Fatal(err)
		}
		if name == b {
			if err := h.LinkSetMTU(link, 1500); err != nil {
				t.Fatal(err)
			}
		}
	}
	la, _ := h.LinkByName(a)
	if err := h.RouteAdd(&netlink.Route{LinkIndex: la.Attrs().Index, Gw: net.ParseIP("192.0.2.254")}); err != nil {
		t.Fatalf("default route: %v", err)
	}
	return h, a, b
}

func TestDefaultRouteInterfaceIsChosen(t *testing.T) {
	h, a, _ := underlay(t)
	sel, err := Select(h, Spec{})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Name != a || sel.Addr != netip.MustParseAddr("192.0.2.1") || sel.PublicIP != sel.Addr {
		t.Errorf("got %+v, want %s with 192.0.2.1", sel, a)
	}
	if sel.MTU != 1400 || sel.TunMTU() != 1372 {
		t.Errorf("MTU %d, TUN MTU %d; want 1400 and 1372", sel.MTU, sel.TunMTU())
	}
	if sel.How != "default route" || !sel.Up {
		t.Errorf("How %q Up %v", sel.How, sel.Up)
	}
}

func TestIfaceByNameAndByAddress(t *testing.T) {
	h, _, b := underlay(t)
	for _, spec := range []string{b, "198.51.100.1"} {
		sel, err := Select(h, Spec{Ifaces: []string{spec}})
		if err != nil {
			t.Fatalf("--iface %s: %v", spec, err)
		}
		if sel.Name != b || sel.Addr != netip.MustParseAddr("198.51.100.1") || sel.MTU != 1500 || sel.TunMTU() != 1472 {
			t.Errorf("--iface %s: got %+v", spec, sel)
		}
	}
}

func TestFirstExistingIfaceWins(t *testing.T) {
	h, _, b := underlay(t)
	sel, err := Select(h, Spec{Ifaces: []string{"tlnosuch0", "192.0.2.9", b}})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Name != b || sel.How != "--iface "+b {
		t.Errorf("got %+v", sel)
	}
}

func TestMissingIfaceErrorsNameIt(t *testing.T) {
	h, _, _ := underlay(t)
	_, err := Select(h, Spec{Ifaces: []string{"192.0.2.9"}})
	if err == nil || err.Error() != "no interface with address 192.0.2.9" {
		t.Errorf("by address: %v", err)
	}
	_, err = Select(h, Spec{Ifaces: []string{"tlnosuch0"}})
	if err == nil || err.Error() != "no interface named tlnosuch0" {
		t.Errorf("by name: %v", err)
	}
	_, err = Select(h, Spec{Ifaces: []string{"tlnosuch0", "192.0.2.9"}})
	if err == nil || !strings.Contains(err.Error(), "no interface named tlnosuch0") || !strings.Contains(err.Error(), "no interface with address 192.0.2.9") {
		t.Errorf("both: %v", err)
	}
}

func TestIfaceRegexMatchesNameOrAddress(t *testing.T) {
	h, _, b := underlay(t)
	for _, re := range []string{"^" + b + "$", `^198\.51\.100\.`} {
		sel, err := Select(h, Spec{Regexes: []*regexp.Regexp{regexp.MustCompile(re)}})
		if err != nil {
			t.Fatalf("%s: %v", re, err)
		}
		if sel.Name != b {
			t.Errorf("%s: got %s", re, sel.Name)
		}
	}
	_, err := Select(h, Spec{Regexes: []*regexp.Regexp{regexp.MustCompile("^nomatch$")}})
	if err == nil || !strings.Contains(err.Error(), "--iface-regex ^nomatch$") {
		t.Errorf("no match: %v", err)
	}
}

func TestPublicIPOverridesAdvertisedAddress(t *testing.T) {
	h, a, _ := underlay(t)
	sel, err := Select(h, Spec{PublicIP: netip.MustParseAddr("198.51.100.77")})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Name != a || sel.Addr != netip.MustParseAddr("192.0.2.1") || sel.PublicIP != netip.MustParseAddr("198.51.100.77") {
		t.Errorf("got %+v", sel)
	}
}

func TestNoDefaultRouteSaysGiveIface(t *testing.T) {
	ns := nstest.NewNetns(t)
	_, err := Select(ns.Handle, Spec{})
	if err == nil || !strings.Contains(err.Error(), "no IPv4 default route") || !strings.Contains(err.Error(), "--iface") {
		t.Errorf("got %v", err)
	}
}

func TestInterfaceWithoutIPv4IsRefused(t *testing.T) {
	ns := nstest.NewNetns(t)
	_, err := Select(ns.Handle, Spec{Ifaces: []string{"lo"}})
	if err != nil {
		t.Fatalf("lo has 127.0.0.1: %v", err)
	}
	a := nstest.Name("a")
	if err := ns.Handle.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a}, PeerName: nstest.Name("b")}); err != nil {
		t.Fatal(err)
	}
	_, err = Select(ns.Handle, Spec{Ifaces: []string{a}})
	if err == nil || err.Error() != "interface "+a+" has no IPv4 address" {
		t.Errorf("got %v", err)
	}
}
