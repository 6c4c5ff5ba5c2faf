package udp

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// linkHandle remembers the TUN link so Close can make sure it is gone. The
// netlink handle is bound to the network namespace New ran in, so Close may
// run on any thread.
type linkHandle struct {
	nl    *netlink.Handle
	index int
	name  string
}

// setupDevice gives the TUN device named name flannel's configuration with
// netlink: address <lease .0>/32, MTU, link up, route <Network> dev name
// (scope link); with an IPv6 network also <IPv6 lease>::/128 and route
// <IPv6Network> dev name (see setupIPv6). The device itself stays open in
// the caller.
func setupDevice(name string, opts Options) (linkHandle, error) {
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return linkHandle{}, fmt.Errorf("tun %s: open netlink: %w", name, err)
	}
	h := linkHandle{nl: nl, name: name}
	link, err := nl.LinkByName(name)
	if err != nil {
		return h, fmt.Errorf("tun %s: find link: %w", name, err)
	}
	h.index = link.Attrs().Index
	addr := netip.PrefixFrom(opts.Lease.Subnet.Addr(), 32)
	if err := nl.AddrReplace(link, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
		return h, fmt.Errorf("tun %s: add address %v: %w", name, addr, err)
	}
	if err := nl.LinkSetMTU(link, opts.MTU); err != nil {
		return h, fmt.Errorf("tun %s: set MTU %d: %w", name, opts.MTU, err)
	}
	if opts.IPv6Network.IsValid() {
		if err := setupIPv6(nl, link, opts); err != nil {
			return h, err
		}
	} else if err := disableIPv6(name); err != nil {
		// Harmless but noisy (a few dropped solicitations): carry on.
		opts.Logger.Warn("could not disable IPv6 on the TUN device; its link-local traffic will be counted as dropped", "error", err)
	}
	if err := nl.LinkSetUp(link); err != nil {
		return h, fmt.Errorf("tun %s: set link up: %w", name, err)
	}
	for _, nw := range []netip.Prefix{opts.Network, opts.IPv6Network} {
		if !nw.IsValid() {
			continue
		}
		route := &netlink.Route{LinkIndex: h.index, Dst: ipNet(nw), Scope: netlink.SCOPE_LINK}
		if err := nl.RouteReplace(route); err != nil {
			return h, fmt.Errorf("tun %s: add route %v dev %s: %w", name, nw, name, err)
		}
	}
	return h, nil
}

// setupIPv6 turns IPv6 on for the TUN device without a link-local address
// (addr_gen_mode none, set before IPv6 is enabled): with no link-local
// address the kernel sends no router or neighbour solicitations into the
// device, which the data plane could only count and drop. The device gets
// the first address of our IPv6 lease as a /128 (like <lease .0>/32),
// without duplicate address detection (nothing else is on the link), so it
// is usable at once.
func setupIPv6(nl *netlink.Handle, link netlink.Link, opts Options) error {
	name := link.Attrs().Name
	if err := nl.LinkSetIP6AddrGenMode(link, addrGenModeNone); err != nil {
		return fmt.Errorf("tun %s: IPv6 address generation mode none: %w", name, err)
	}
	if err := leaveMulticast(nl, link); err != nil {
		return err
	}
	if err := setIPv6Conf(name, "disable_ipv6", "0"); err != nil {
		return err
	}
	addr := netip.PrefixFrom(opts.Lease.IPv6Subnet.Addr(), 128)
	if err := nl.AddrReplace(link, &netlink.Addr{IPNet: ipNet(addr), Flags: unix.IFA_F_NODAD}); err != nil {
		return fmt.Errorf("tun %s: add address %v: %w", name, addr, err)
	}
	return nil
}

// addrGenModeNone is IN6_ADDR_GEN_MODE_NONE: no link-local address.
const addrGenModeNone = 1

// leaveMulticast turns multicast off on the TUN device, so that the kernel
// sends no MLD reports into it (the overlay carries no multicast, and the
// data plane could only count and drop them). The device joined the
// all-nodes groups when it was created, which are never reported, and on a
// forwarding host the all-routers groups, which would be reported when the
// link comes up. So, before the link is first up: the device's own
// forwarding switch is turned off (which leaves those groups) while MLDv1
// is forced (in v1 a host that never reported a group leaves it silently;
// MLDv2 would queue a leave report), multicast is turned off, and both
// switches are set back (forwarding then joins nothing without multicast,
// also when an operator turns it on later). Forwarding through the device
// follows net.ipv6.conf.all, not this switch. A device created with its
// forwarding off (the host does not forward IPv6) joined no all-routers
// group, and only multicast is turned off: no sysctl is written.
func leaveMulticast(nl *netlink.Handle, link netlink.Link) error {
	name := link.Attrs().Name
	fwd, err := readIPv6Conf(name, "forwarding")
	if err != nil {
		return err
	}
	if fwd == "0" {
		if err := nl.LinkSetMulticastOff(link); err != nil {
			return fmt.Errorf("tun %s: multicast off: %w", name, err)
		}
		return nil
	}
	mld, err := readIPv6Conf(name, "force_mld_version")
	if err != nil {
		return err
	}
	for _, kv := range [][2]string{{"force_mld_version", "1"}, {"forwarding", "0"}} {
		if err := setIPv6Conf(name, kv[0], kv[1]); err != nil {
			return err
		}
	}
	if err := nl.LinkSetMulticastOff(link); err != nil {
		return fmt.Errorf("tun %s: multicast off: %w", name, err)
	}
	for _, kv := range [][2]string{{"forwarding", fwd}, {"force_mld_version", mld}} {
		if err := setIPv6Conf(name, kv[0], kv[1]); err != nil {
			return err
		}
	}
	return nil
}

// removeDevice deletes the TUN link if closing its queues did not already
// remove it (it was made persistent, or a queue is still open elsewhere).
// The address and route go with the link.
func (b *Backend) removeDevice() error {
	h := b.link
	if h.nl == nil {
		return nil
	}
	defer h.nl.Close()
	b.link = linkHandle{}
	link, err := h.nl.LinkByIndex(h.index)
	if err != nil {
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) || errors.Is(err, unix.ENODEV) {
			return nil
		}
		return fmt.Errorf("tun %s: look up link: %w", h.name, err)
	}
	if link.Attrs().Name != h.name {
		return nil // the index now belongs to another link
	}
	if err := h.nl.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("tun %s: delete link: %w", h.name, err)
	}
	return nil
}

// disableIPv6 turns IPv6 off on the TUN device before it comes up: the
// overlay is IPv4 only (as flannel's), and an IPv6 link-local address would
// make the kernel send router and neighbour solicitations into the device,
// where the data plane can only count and drop them. A kernel without IPv6
// has no such file, which is fine.
func disableIPv6(name string) error {
	err := setIPv6Conf(name, "disable_ipv6", "1")
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// readIPv6Conf reads the sysctl net.ipv6.conf.<name>.<key>.
func readIPv6Conf(name, key string) (string, error) {
	path := "/proc/sys/net/ipv6/conf/" + name + "/" + key
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("tun %s: read IPv6 %s (%s): %w", name, key, path, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// setIPv6Conf sets the sysctl net.ipv6.conf.<name>.<key> to value,
// writing it only when it has another value: under a read-only /proc/sys
// (a container, a sandbox) a setting that is right already is no failure.
func setIPv6Conf(name, key, value string) error {
	if v, err := readIPv6Conf(name, key); err == nil && v == value {
		return nil
	}
	path := "/proc/sys/net/ipv6/conf/" + name + "/" + key
	if err := os.WriteFile(path, []byte(value), 0); err != nil {
		return fmt.Errorf("tun %s: IPv6 %s=%s (%s): %w", name, key, value, path, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// checkPortFree fails with a clear error if another socket holds UDP port
// port (of IPv6-only sockets if v6). Our own sockets use SO_REUSEPORT,
// which would otherwise silently share the port with a stale tulled (same
// user) and lose half the traffic.
func checkPortFree(port int, v6 bool) error {
	family, sa, name := unix.AF_INET, unix.Sockaddr(&unix.SockaddrInet4{Port: port}), fmt.Sprintf("udp port %d", port)
	if v6 {
		family, sa, name = unix.AF_INET6, &unix.SockaddrInet6{Port: port}, fmt.Sprintf("udp port [::]:%d", port)
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s: socket: %w", name, err)
	}
	defer unix.Close(fd)
	if v6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
			return fmt.Errorf("%s: IPV6_V6ONLY: %w", name, err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		if errors.Is(err, unix.EADDRINUSE) {
			return fmt.Errorf("%s is already in use (is flanneld or another tulled running?): %w", name, err)
		}
		return fmt.Errorf("%s: bind: %w", name, err)
	}
	return nil
}
