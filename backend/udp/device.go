package udp

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"

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
// (scope link). The device itself stays open in the caller.
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
	if err := disableIPv6(name); err != nil {
		// Harmless but noisy (a few dropped solicitations): carry on.
		opts.Logger.Warn("could not disable IPv6 on the TUN device; its link-local traffic will be counted as dropped", "error", err)
	}
	if err := nl.LinkSetUp(link); err != nil {
		return h, fmt.Errorf("tun %s: set link up: %w", name, err)
	}
	route := &netlink.Route{LinkIndex: h.index, Dst: ipNet(opts.Network), Scope: netlink.SCOPE_LINK}
	if err := nl.RouteReplace(route); err != nil {
		return h, fmt.Errorf("tun %s: add route %v dev %s: %w", name, opts.Network, name, err)
	}
	return h, nil
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
	path := "/proc/sys/net/ipv6/conf/" + name + "/disable_ipv6"
	err := os.WriteFile(path, []byte("1"), 0)
	if err == nil || errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return fmt.Errorf("tun %s: disable IPv6 (%s): %w", name, path, err)
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// checkPortFree fails with a clear error if another socket holds UDP port
// port. Our own sockets use SO_REUSEPORT, which would otherwise silently
// share the port with a stale tulled (same user) and lose half the traffic.
func checkPortFree(port int) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("udp port %d: socket: %w", port, err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port}); err != nil {
		if errors.Is(err, unix.EADDRINUSE) {
			return fmt.Errorf("udp port %d is already in use (is flanneld or another tulled running?): %w", port, err)
		}
		return fmt.Errorf("udp port %d: bind: %w", port, err)
	}
	return nil
}
