package netif

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// addIPv6 puts cidr on link without duplicate address detection (usable at
// once); deprecated gives it a preferred lifetime of 0, as an address
// being phased out has.
func addIPv6(t *testing.T, h *netlink.Handle, link, cidr string, deprecated bool) {
	t.Helper()
	l, err := h.LinkByName(link)
	if err != nil {
		t.Fatal(err)
	}
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	addr.Flags = unix.IFA_F_NODAD
	if deprecated {
		addr.ValidLft, addr.PreferedLft = 3600, 0
	}
	if err := h.AddrAdd(l, addr); err != nil {
		t.Fatalf("addr %s on %s: %v", cidr, link, err)
	}
}

// The IPv6 underlay address is the interface's global one, never a
// link-local or deprecated address; the TUN MTU leaves room for an IPv6
// header only when the IPv6 underlay is switched on and there is one.
func TestIPv6UnderlayAddressIsTheInterfacesGlobalOne(t *testing.T) {
	h, a, _ := underlay(t)
	// The kernel lists the newest address of a scope first: the unfit ones
	// come last, so a pick of the first address would be wrong.
	addIPv6(t, h, a, "2001:db8:ffff::1/64", false)
	addIPv6(t, h, a, "fe80::1:1/64", false)
	addIPv6(t, h, a, "2001:db8:ffff::9/64", true)
	sel, err := Select(h, Spec{})
	if err != nil {
		t.Fatal(err)
	}
	want := netip.MustParseAddr("2001:db8:ffff::1")
	if sel.Name != a || sel.Addr != netip.MustParseAddr("192.0.2.1") || sel.Addr6 != want || sel.PublicIPv6 != want {
		t.Fatalf("got %+v, want %s with 192.0.2.1 and %s", sel, a, want)
	}
	if got := sel.TunMTUFor(true); got != 1400-48 {
		t.Errorf("TUN MTU on an IPv6 underlay: %d, want %d", got, 1400-48)
	}
	if got := sel.TunMTUFor(false); got != 1400-28 {
		t.Errorf("TUN MTU with the IPv6 underlay off: %d, want %d", got, 1400-28)
	}

	// --public-ipv6 wins over the interface's address, as --public-ip does.
	sel, err = Select(h, Spec{PublicIPv6: netip.MustParseAddr("2001:db8:fffe::77")})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Addr6 != want || sel.PublicIPv6 != netip.MustParseAddr("2001:db8:fffe::77") {
		t.Errorf("--public-ipv6: got %+v", sel)
	}
}

// --iface may name an IPv6 address: its interface is the underlay, the
// address its IPv6 underlay address, and the IPv4 address the interface's.
func TestIfaceByIPv6Address(t *testing.T) {
	h, _, b := underlay(t)
	addIPv6(t, h, b, "2001:db8:fffe::1/64", false)
	addIPv6(t, h, b, "2001:db8:fffe::2/64", false)
	sel, err := Select(h, Spec{Ifaces: []string{"2001:db8:fffe::2"}})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Name != b || sel.Addr != netip.MustParseAddr("198.51.100.1") || sel.Addr6 != netip.MustParseAddr("2001:db8:fffe::2") ||
		sel.PublicIPv6 != sel.Addr6 || sel.How != "--iface 2001:db8:fffe::2" {
		t.Errorf("got %+v", sel)
	}
	if _, err := Select(h, Spec{Ifaces: []string{"2001:db8:fffe::99"}}); err == nil || err.Error() != "no interface with address 2001:db8:fffe::99" {
		t.Errorf("missing IPv6 address: %v", err)
	}
}

// Without a global IPv6 address the host has no IPv6 underlay: the TUN MTU
// stays IPv4's whatever the switch says.
func TestInterfaceWithoutGlobalIPv6HasNoIPv6Underlay(t *testing.T) {
	h, a, _ := underlay(t)
	addIPv6(t, h, a, "fe80::1:1/64", false)
	sel, err := Select(h, Spec{})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Addr6.IsValid() || sel.PublicIPv6.IsValid() || sel.TunMTUFor(true) != 1372 {
		t.Errorf("got %+v, TUN MTU %d; want no IPv6 underlay address and 1372", sel, sel.TunMTUFor(true))
	}
}

// --iface-regex matches IPv6 addresses too (flannel matches the addresses
// of its IP stack): the matching address is the IPv6 underlay address;
// one unfit to be it (deprecated) is not matched.
func TestIfaceRegexMatchesAnIPv6Address(t *testing.T) {
	h, a, b := underlay(t)
	addIPv6(t, h, a, "2001:db8:fffd::1/64", true)
	addIPv6(t, h, b, "2001:db8:fffe::1/64", false)
	addIPv6(t, h, b, "2001:db8:fffe::2/64", false)
	sel, err := Select(h, Spec{Regexes: []*regexp.Regexp{regexp.MustCompile(`^2001:db8:fffe::2$`)}})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Name != b || sel.Addr != netip.MustParseAddr("198.51.100.1") || sel.Addr6 != netip.MustParseAddr("2001:db8:fffe::2") ||
		sel.PublicIPv6 != sel.Addr6 || sel.How != `--iface-regex ^2001:db8:fffe::2$` {
		t.Errorf("got %+v", sel)
	}
	if sel, err := Select(h, Spec{Regexes: []*regexp.Regexp{regexp.MustCompile(`^2001:db8:fffd:`)}}); err == nil {
		t.Errorf("a deprecated address matched: %+v", sel)
	} else if !strings.Contains(err.Error(), "no interface name, IPv4 or IPv6 address matches") {
		t.Errorf("no match: %v", err)
	}
}
