package ipmasq

import (
	"context"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/tools"
)

var (
	network6 = netip.MustParsePrefix("2001:db8:1::/48")
	lease6   = netip.MustParsePrefix("2001:db8:1:4f::/64")
)

func ip6tablesS(t *testing.T, chain string) string {
	t.Helper()
	out, err := tools.Command(context.Background(), "ip6tables", "-w", "-t", "nat", "-S", chain).CombinedOutput()
	if err != nil {
		t.Fatalf("ip6tables -t nat -S %s: %v\n%s", chain, err, out)
	}
	return string(out)
}

// In a dual-stack network the IPv6 rules are flannel's, with the IPv6
// network and lease and IPv6 multicast, in ip6tables' nat table; the IPv4
// rules are untouched by them, and each set comes and goes on its own.
func TestIPv6RulesAreFlannelsInIP6Tables(t *testing.T) {
	if !inNetns(t) {
		return
	}
	r4, err := New(network, lease, nil)
	if err != nil {
		t.Fatal(err)
	}
	r6, err := New(network6, lease6, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r4.Family() != "IPv4" || r6.Family() != "IPv6" {
		t.Fatalf("families %s, %s", r4.Family(), r6.Family())
	}
	mustEnsure(t, r4, true)
	mustEnsure(t, r6, true)
	mustEnsure(t, r6, false) // idempotent
	wantRules(t, r4)

	masq := "-j MASQUERADE"
	if r6.ipt.HasRandomFully() {
		masq += " --random-fully"
	}
	c := `-m comment --comment "tulle masq"`
	want := []string{
		"-N " + Chain,
		"-A " + Chain + " -m mark --mark 0x4000/0x4000 " + c + " -j RETURN",
		"-A " + Chain + " -s 2001:db8:1::/48 -d 2001:db8:1::/48 " + c + " -j RETURN",
		"-A " + Chain + " -s 2001:db8:1::/48 ! -d ff00::/8 " + c + " " + masq,
		"-A " + Chain + " ! -s 2001:db8:1::/48 -d 2001:db8:1:4f::/64 " + c + " -j RETURN",
		"-A " + Chain + " ! -s 2001:db8:1::/48 -d 2001:db8:1::/48 " + c + " " + masq,
	}
	if got := strings.TrimSpace(ip6tablesS(t, Chain)); got != strings.Join(want, "\n") {
		t.Errorf("ip6tables chain %s:\n%s\nwant:\n%s", Chain, got, strings.Join(want, "\n"))
	}
	post := strings.Split(strings.TrimSpace(ip6tablesS(t, "POSTROUTING")), "\n")
	if len(post) < 2 || post[1] != "-A POSTROUTING "+c+" -j "+Chain {
		t.Errorf("ip6tables POSTROUTING does not jump to %s first:\n%s", Chain, strings.Join(post, "\n"))
	}

	// Damage to the IPv6 set is repaired by its own Ensure.
	if out, err := tools.Command(context.Background(), "ip6tables", "-w", "-t", "nat", "-F", Chain).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	mustEnsure(t, r4, false)
	mustEnsure(t, r6, true)

	if err := r6.Remove(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(ip6tablesS(t, "POSTROUTING"), Chain) {
		t.Error("ip6tables POSTROUTING still jumps to the chain after Remove")
	}
	wantRules(t, r4)
	if err := r4.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := New(network, lease6, nil); err == nil || !strings.Contains(err.Error(), "both IPv4 or both IPv6") {
		t.Errorf("mixed families: %v", err)
	}
}

// The IPv6 test network, as the IPv4 one:
//
//	[container] 2001:db8:1:4f::2 --- ::1 [host] 2001:db8:ffff::1 --- 2001:db8:ffff::2 [outside]
//	                                     [host] 2001:db8:1:50::1 --- 2001:db8:1:50::2 [peer]
const masq6NamespacesEnv = "TULLE_IPMASQ6_TEST_NETNS" // "host,container,outside,peer"

// addr6 puts an IPv6 address, usable at once (no duplicate address
// detection), on link in ns.
func addr6(t *testing.T, ns *nstest.Netns, link, cidr string) {
	t.Helper()
	l, err := ns.Handle.LinkByName(link)
	if err != nil {
		t.Fatal(err)
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	a.Flags = unix.IFA_F_NODAD
	if err := ns.Handle.AddrAdd(l, a); err != nil {
		t.Fatalf("address %s on %s: %v", cidr, link, err)
	}
}

func TestContainerIPv6TrafficIsMasqueradedOnlyWhenLeavingTheOverlay(t *testing.T) {
	if !nstest.InChild() {
		host := nstest.NewNetns(t)
		container, outside, peer := nstest.NewNetns(t), nstest.NewNetns(t), nstest.NewNetns(t)
		for _, p := range []struct {
			other      *nstest.Netns
			here, away string
		}{
			{container, "2001:db8:1:4f::1/64", "2001:db8:1:4f::2/64"},
			{outside, "2001:db8:ffff::1/64", "2001:db8:ffff::2/64"},
			{peer, "2001:db8:1:50::1/64", "2001:db8:1:50::2/64"},
		} {
			a, b := host.Veth(t, "", p.other, "")
			addr6(t, host, a, p.here)
			addr6(t, p.other, b, p.away)
		}
		container.DefaultRoute(t, "2001:db8:1:4f::1")
		peer.DefaultRoute(t, "2001:db8:1:50::1")
		t.Setenv(masq6NamespacesEnv, host.Name+","+container.Name+","+outside.Name+","+peer.Name)
		host.RunTestInNetns(t, t.Name())
		return
	}
	names := strings.Split(os.Getenv(masq6NamespacesEnv), ",")
	if len(names) != 4 {
		t.Fatalf("%s=%q", masq6NamespacesEnv, os.Getenv(masq6NamespacesEnv))
	}
	hostNS, containerNS, outsideNS, peerNS := names[0], names[1], names[2], names[3]
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/all/forwarding", []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := New(network6, lease6, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Ensure(); err != nil {
		t.Fatal(err)
	}

	// source sends one datagram from srcNS (bound to bind, if valid) to dst
	// in dstNS and returns the source address dstNS sees.
	source := func(srcNS string, bind netip.Addr, dstNS string, dst netip.AddrPort) netip.Addr {
		t.Helper()
		var rx *net.UDPConn
		if err := nstest.Do(dstNS, func() (err error) {
			rx, err = net.ListenUDP("udp6", net.UDPAddrFromAddrPort(dst))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer rx.Close()
		var tx *net.UDPConn
		if err := nstest.Do(srcNS, func() (err error) {
			var laddr *net.UDPAddr
			if bind.IsValid() {
				laddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(bind, 0))
			}
			tx, err = net.ListenUDP("udp6", laddr)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer tx.Close()
		if _, err := tx.WriteToUDPAddrPort([]byte("hello"), dst); err != nil {
			t.Fatal(err)
		}
		_ = rx.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 64)
		_, from, err := rx.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("%s -> %s: nothing arrived: %v", srcNS, dst, err)
		}
		return from.Addr()
	}

	if got := source(containerNS, netip.Addr{}, outsideNS, netip.MustParseAddrPort("[2001:db8:ffff::2]:5000")); got != netip.MustParseAddr("2001:db8:ffff::1") {
		t.Errorf("container -> outside arrived from %s, want the host's 2001:db8:ffff::1 (masqueraded)", got)
	}
	if got := source(containerNS, netip.Addr{}, peerNS, netip.MustParseAddrPort("[2001:db8:1:50::2]:5001")); got != netip.MustParseAddr("2001:db8:1:4f::2") {
		t.Errorf("container -> overlay peer arrived from %s, want the container's own 2001:db8:1:4f::2", got)
	}
	if got := source(hostNS, netip.MustParseAddr("2001:db8:ffff::1"), peerNS, netip.MustParseAddrPort("[2001:db8:1:50::2]:5002")); got != netip.MustParseAddr("2001:db8:1:50::1") {
		t.Errorf("host (2001:db8:ffff::1) -> overlay peer arrived from %s, want 2001:db8:1:50::1 (masqueraded)", got)
	}

	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	if got := source(containerNS, netip.Addr{}, outsideNS, netip.MustParseAddrPort("[2001:db8:ffff::2]:5003")); got != netip.MustParseAddr("2001:db8:1:4f::2") {
		t.Errorf("after Remove: container -> outside arrived from %s, want 2001:db8:1:4f::2 (no masquerade left)", got)
	}
}
