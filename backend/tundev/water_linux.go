package tundev

import (
	"fmt"
	"os"

	"github.com/songgao/water"
	"golang.org/x/sys/unix"
)

// openWater opens opts.Queues queues with github.com/songgao/water
// (IFF_TUN|IFF_NO_PI, plus IFF_MULTI_QUEUE for more than one queue). The
// queue does its I/O on water's file descriptor with the same non-blocking
// calls and ppoll waits as the offload driver, one packet per call.
func (d *Device) openWater(opts Options) error {
	name := opts.Name
	for i := 0; i < opts.Queues; i++ {
		ifce, err := water.New(water.Config{
			DeviceType: water.TUN,
			PlatformSpecificParams: water.PlatformSpecificParams{
				Name:       name,
				MultiQueue: opts.Queues > 1,
			},
		})
		if err != nil {
			return fmt.Errorf("tun %s: open queue %d (water): %w", displayName(name), i, err)
		}
		f, ok := ifce.ReadWriteCloser.(*os.File)
		if !ok {
			ifce.Close()
			return fmt.Errorf("tun %s: queue %d: water returned %T, want *os.File", displayName(name), i, ifce.ReadWriteCloser)
		}
		name = ifce.Name()
		d.name = name
		fd, err := rawFd(f)
		if err != nil {
			f.Close()
			return fmt.Errorf("tun %s: queue %d: %w", name, i, err)
		}
		q, err := newQueue(d, i, fd, false, f.Close)
		if err != nil {
			f.Close()
			return fmt.Errorf("tun %s: queue %d: %w", name, i, err)
		}
		d.queues = append(d.queues, q)
		d.closers = append(d.closers, q.close)
	}
	return nil
}

// rawFd returns f's descriptor, non-blocking and close-on-exec (water
// opens without O_CLOEXEC; a child process such as iptables must not
// inherit and keep the device alive). f keeps owning it.
func rawFd(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var ferr error
	if err := rc.Control(func(raw uintptr) {
		fd = int(raw)
		if _, ferr = unix.FcntlInt(raw, unix.F_SETFD, unix.FD_CLOEXEC); ferr != nil {
			return
		}
		ferr = unix.SetNonblock(fd, true)
	}); err != nil {
		return -1, err
	}
	if ferr != nil {
		return -1, fmt.Errorf("set close-on-exec, non-blocking: %w", ferr)
	}
	return fd, nil
}
