package tundev

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Open creates the TUN device described by opts and sets its MTU. It does
// not set addresses or routes and does not bring the link up: the caller
// does that with netlink. The device lives in the network namespace of the
// calling thread. On error nothing is left open.
func Open(opts Options) (*Device, error) {
	if err := checkOptions(&opts); err != nil {
		return nil, err
	}
	d := &Device{name: opts.Name, mtu: opts.MTU, driver: opts.Driver, logger: opts.Logger}
	var err error
	switch opts.Driver {
	case DriverOffload:
		err = d.openOffload(opts)
	case DriverWater:
		err = d.openWater(opts)
	}
	if err != nil {
		d.Close()
		return nil, err
	}
	if err := setMTU(d.name, opts.MTU); err != nil {
		d.Close()
		return nil, fmt.Errorf("tun %s: set MTU %d: %w", d.name, opts.MTU, err)
	}
	d.logger.Debug("tun device open", "device", d.name, "driver", d.driver, "queues", len(d.queues),
		"mtu", d.mtu, "offload", d.offload, "udp_offload", d.udpOffload)
	return d, nil
}

// createQueueFD opens /dev/net/tun and attaches it to the device name (made
// if missing) with flags. It returns the fd (blocking; the drivers make it
// non-blocking) and the name the kernel used.
func createQueueFD(name string, flags uint16) (int, string, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, "", fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, "", err
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		switch {
		case errors.Is(err, unix.EBUSY):
			return -1, "", fmt.Errorf("TUNSETIFF: %w (another process holds the device)", err)
		case errors.Is(err, unix.EINVAL):
			return -1, "", fmt.Errorf("TUNSETIFF: %w (a device of that name exists with other flags, e.g. not multi-queue, or is not a TUN device)", err)
		}
		return -1, "", fmt.Errorf("TUNSETIFF: %w", err)
	}
	return fd, ifr.Name(), nil
}

// setMTU sets the interface MTU with SIOCSIFMTU.
func setMTU(name string, mtu int) error {
	sock, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket for ioctl: %w", err)
	}
	defer unix.Close(sock)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	ifr.SetUint32(uint32(mtu))
	if err := unix.IoctlIfreq(sock, unix.SIOCSIFMTU, ifr); err != nil {
		return fmt.Errorf("SIOCSIFMTU: %w", err)
	}
	return nil
}

// errEmptyPacket is counted for a write of no packet (nothing, or only a
// virtio header).
var errEmptyPacket = errors.New("empty packet")
