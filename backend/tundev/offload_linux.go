package tundev

import (
	"fmt"

	"golang.org/x/sys/unix"
)

const (
	// TCP offloads (Linux 2.6), both families: a read returns a TSO
	// superpacket of TCP over IPv4 or IPv6 (Split), a write takes one
	// (Coalescer).
	tunTCPOffloads = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6
	// UDP segmentation offload (Linux 6.2); optional, takes both families.
	tunUDPOffloads = unix.TUN_F_USO4 | unix.TUN_F_USO6
)

// openOffload opens opts.Queues queues with IFF_VNET_HDR and the offloads.
func (d *Device) openOffload(opts Options) error {
	flags := uint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if opts.Queues > 1 {
		flags |= unix.IFF_MULTI_QUEUE
	}
	name := opts.Name
	for i := 0; i < opts.Queues; i++ {
		fd, ifname, err := createQueueFD(name, flags)
		if err != nil {
			return fmt.Errorf("tun %s: open queue %d: %w", displayName(name), i, err)
		}
		name = ifname
		d.name = ifname
		if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, VirtioHdrLen); err != nil {
			unix.Close(fd)
			return fmt.Errorf("tun %s: queue %d: set virtio header size (TUNSETVNETHDRSZ): %w", name, i, err)
		}
		if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tunTCPOffloads); err != nil {
			unix.Close(fd)
			return fmt.Errorf("tun %s: queue %d: enable TSO offloads (TUNSETOFFLOAD): %w", name, i, err)
		}
		uso := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tunTCPOffloads|tunUDPOffloads) == nil
		if i == 0 {
			d.udpOffload = uso
		} else if uso != d.udpOffload {
			unix.Close(fd)
			return fmt.Errorf("tun %s: queue %d: USO offload differs from queue 0", name, i)
		}
		if err := unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			return fmt.Errorf("tun %s: queue %d: set non-blocking: %w", name, i, err)
		}
		q, err := newQueue(d, i, fd, true, func() error { return unix.Close(fd) })
		if err != nil {
			unix.Close(fd)
			return fmt.Errorf("tun %s: queue %d: %w", name, i, err)
		}
		d.queues = append(d.queues, q)
		d.closers = append(d.closers, q.close)
	}
	d.offload = true
	return nil
}

func displayName(name string) string {
	if name == "" {
		return "(kernel-named)"
	}
	return name
}
