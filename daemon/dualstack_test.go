package daemon

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/tools"
)

const (
	dualStackJSON    = `{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:1::/48","Backend":{"Type":"udp"}}`
	ipv6UnderlayJSON = `{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:1::/48","Backend":{"Type":"udp","IPv6Underlay":true}}`
	publicIPv6       = "2001:db8:ffff::1"
)

// addUnderlayIPv6 puts publicIPv6 on the namespace's underlay (the link
// holding publicIP), as a host with a global IPv6 address has it.
func addUnderlayIPv6(t *testing.T) {
	t.Helper()
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if a.IP.String() != publicIP {
			continue
		}
		link, err := netlink.LinkByIndex(a.LinkIndex)
		if err != nil {
			t.Fatal(err)
		}
		ad, _ := netlink.ParseAddr(publicIPv6 + "/64")
		ad.Flags = unix.IFA_F_NODAD
		if err := netlink.AddrAdd(link, ad); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("no link with %s", publicIP)
}

// features is the Tulle feature list in a lease value.
func features(t *testing.T, value string) string {
	t.Helper()
	var a subnet.LeaseAttrs
	if err := a.UnmarshalJSON([]byte(value)); err != nil {
		t.Fatalf("lease value %s: %v", value, err)
	}
	info, ok := udp.ParseHostInfo(a.BackendData)
	if !ok {
		t.Fatalf("lease value %s: no Tulle mark", value)
	}
	return strings.Join(info.Features, ",")
}

// In a dual-stack network the daemon takes both subnets in one key
// (flannel's form, with PublicIPv6), writes both to subnet.env, advertises
// the IPv6 data plane, masquerades both families with --ip-masq, and keeps
// both subnets over a restart. The underlay stays IPv4 (MTU - 28) while
// the config's IPv6Underlay is off.
func TestDaemonDualStackTakesBothSubnetsAndGivesThemOut(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	addUnderlayIPv6(t)
	ep, cli := loopbackEtcd(t)
	putConfig(t, cli, dualStackJSON)
	envFile := filepath.Join(t.TempDir(), "subnet.env")
	r := startDaemon(t, ep, envFile, "--ip-masq")
	ready := r.waitNote(t, "READY=1", 30*time.Second)

	env := readEnv(t, envFile)
	l6 := env.IPv6Subnet
	if env.IPv6Network != netip.MustParsePrefix("2001:db8:1::/48") || l6.Bits() != 64 || !env.IPv6Network.Contains(l6.Addr()) || env.MTU != 1472 {
		t.Fatalf("subnet.env %+v: want the IPv6 network, a /64 of it and MTU 1472", env)
	}
	if want := fmt.Sprintf("STATUS=running: subnet %s and %s, ", env.Subnet, l6); !strings.Contains(ready, want) {
		t.Errorf("READY status %q, want it to name both subnets (%q)", ready, want)
	}
	key := fmt.Sprintf("%s-24&%s-64", env.Subnet.Addr(), l6.Addr())
	value, ok := leaseKeys(t, cli)[key]
	if !ok {
		t.Fatalf("no lease key %s: %v", key, leaseKeys(t, cli))
	}
	if !strings.HasPrefix(value, `{"PublicIP":"192.0.2.1","PublicIPv6":"`+publicIPv6+`",`) {
		t.Errorf("lease value %s: want PublicIPv6 %s (the underlay's global address)", value, publicIPv6)
	}
	if got := features(t, value); got != "partial-checksum,ipv6" {
		t.Errorf("features %q, want partial-checksum,ipv6 (no ipv6-underlay: the config's switch is off)", got)
	}
	for line, want := range map[string]string{
		`msg="network config"`:      "ipv6_subnet=" + l6.String(),
		`msg="subnet file written"`: "ipv6_subnet=" + subnet.FirstHost(l6).String(), // as FLANNEL_IPV6_SUBNET
		`msg=ready`:                 "ipv6_subnet=" + l6.String(),
	} {
		if got := logLine(r.logs.String(), line); !strings.Contains(got, want) {
			t.Errorf("log line %s lacks %s:\n%s", line, want, got)
		}
	}
	out, err := tools.Command(context.Background(), "ip6tables", "-w", "-t", "nat", "-S", "TULLE-POSTRTG").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "! -s 2001:db8:1::/48 -d "+l6.String()+" -m comment --comment \"tulle masq\" -j RETURN") {
		t.Errorf("IPv6 masquerade rules after READY: %v\n%s", err, out)
	}

	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	if err := tools.Command(context.Background(), "ip6tables", "-w", "-t", "nat", "-S", "TULLE-POSTRTG").Run(); err == nil {
		t.Errorf("ip6tables chain TULLE-POSTRTG still there after the stop")
	}
	r2 := startDaemon(t, ep, envFile)
	r2.waitNote(t, "READY=1", 30*time.Second)
	if got := readEnv(t, envFile); got.Subnet != env.Subnet || got.IPv6Subnet != l6 {
		t.Errorf("restart took %s and %s, want %s and %s", got.Subnet, got.IPv6Subnet, env.Subnet, l6)
	}
	if err := r2.stop(t); err != nil {
		t.Fatal(err)
	}
}

// logLine is the first line of logs containing s.
func logLine(logs, s string) string {
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, s) {
			return l
		}
	}
	return ""
}

// With Backend.IPv6Underlay on and an IPv6 underlay address, the host
// offers the IPv6 underlay and its overlay MTU leaves room for an IPv6
// header (MTU - 48).
func TestDaemonIPv6UnderlaySwitchOffersItAndLowersTheMTU(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	addUnderlayIPv6(t)
	ep, cli := loopbackEtcd(t)
	putConfig(t, cli, ipv6UnderlayJSON)
	envFile := filepath.Join(t.TempDir(), "subnet.env")
	r := startDaemon(t, ep, envFile)
	r.waitNote(t, "READY=1", 30*time.Second)
	env := readEnv(t, envFile)
	if env.MTU != 1500-48 {
		t.Errorf("FLANNEL_MTU=%d, want %d on an IPv6 underlay", env.MTU, 1500-48)
	}
	link, err := netlink.LinkByName(r.cfg.TunName)
	if err != nil || link.Attrs().MTU != 1500-48 {
		t.Errorf("TUN device: %v, MTU %v; want %d", err, link, 1500-48)
	}
	for _, v := range leaseKeys(t, cli) {
		if got := features(t, v); got != "partial-checksum,ipv6,ipv6-underlay" {
			t.Errorf("features %q, want partial-checksum,ipv6,ipv6-underlay", got)
		}
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
}

// An IPv6-only network is refused before any lease is taken: flannel's
// layout keys every lease by its IPv4 subnet.
func TestDaemonRefusesAnIPv6OnlyNetworkWithExit2(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	ep, cli := loopbackEtcd(t)
	putConfig(t, cli, `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8:1::/48","Backend":{"Type":"udp"}}`)
	r := startDaemon(t, ep, filepath.Join(t.TempDir(), "subnet.env"))
	err := r.wait(t, 20*time.Second)
	if ExitCode(err) != ExitUsage || !strings.Contains(fmt.Sprint(err), "an IPv6-only network is not supported, because flannel's etcd layout keys every lease by its IPv4 subnet") {
		t.Fatalf("Run gave %v (exit %d), want exit 2 saying why", err, ExitCode(err))
	}
	if keys := leaseKeys(t, cli); len(keys) != 0 {
		t.Errorf("%d lease keys written for a network tulled refuses; want none", len(keys))
	}
}

// An overlay MTU below IPv6's 1280 can not carry the network's IPv6: the
// daemon says so and exits 1 instead of serving IPv4 only silently.
func TestDaemonRefusesADualStackNetworkItsMTUCannotCarry(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	link, err := netlink.LinkByName(underlayName(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetMTU(link, 1300); err != nil { // 1272 left for the overlay
		t.Fatal(err)
	}
	ep, cli := loopbackEtcd(t)
	putConfig(t, cli, dualStackJSON)
	r := startDaemon(t, ep, filepath.Join(t.TempDir(), "subnet.env"))
	err = r.wait(t, 20*time.Second)
	if ExitCode(err) != ExitFailure || !strings.Contains(fmt.Sprint(err), "the overlay MTU 1272 is below IPv6's minimum of 1280") {
		t.Fatalf("Run gave %v (exit %d), want exit 1 naming the MTU", err, ExitCode(err))
	}
}

// underlayName is the namespace's underlay link (the one holding publicIP).
func underlayName(t *testing.T) string {
	t.Helper()
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if a.IP.String() == publicIP {
			l, err := netlink.LinkByIndex(a.LinkIndex)
			if err != nil {
				t.Fatal(err)
			}
			return l.Attrs().Name
		}
	}
	t.Fatalf("no link with %s", publicIP)
	return ""
}
