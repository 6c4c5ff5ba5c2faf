package tundev

import (
	"fmt"
	"os"

	"github.com/songgao/water"
	"golang.org/x/sys/unix"
)

// openWater opens opts.Queues queues with github.com/songgao/water
// (IFF_TUN|IFF_NO_PI, plus IFF_MULTI_QUEUE for more than one queue).
// water opens the fd non-blocking, so reads park in the Go netpoller and
// Close unblocks them.
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
		d.closers = append(d.closers, f.Close)
		// water opens without O_CLOEXEC; a child process (iptables, ...)
		// must not inherit and keep the device alive.
		if err := setCloseOnExec(f); err != nil {
			return fmt.Errorf("tun %s: queue %d: set close-on-exec: %w", name, i, err)
		}
		d.queues = append(d.queues, &waterQueue{d: d, index: i, f: f, mtu: opts.MTU})
	}
	return nil
}

func setCloseOnExec(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) {
		_, ferr = unix.FcntlInt(fd, unix.F_SETFD, unix.FD_CLOEXEC)
	}); err != nil {
		return err
	}
	return ferr
}

// waterQueue moves one packet per syscall.
type waterQueue struct {
	d     *Device
	index int
	f     *os.File
	mtu   int
}

func (q *waterQueue) BatchSize() int { return 1 }

func (q *waterQueue) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if err := checkReadArgs(bufs, sizes, offset, q.mtu); err != nil {
		return 0, err
	}
	for {
		n, err := q.f.Read(bufs[0][offset:])
		if err != nil {
			if fatal := q.d.fatalErr("read", q.index, err, false); fatal != nil {
				return 0, fatal
			}
			q.d.dropRead(q.index, err)
			continue
		}
		sizes[0] = n
		return 1, nil
	}
}

func (q *waterQueue) Write(bufs [][]byte, offset int) (int, error) {
	if offset < Headroom {
		return 0, errBadOffset
	}
	for i, b := range bufs {
		if len(b) <= offset {
			q.d.writeFailed(q.index, 1, errEmptyPacket)
			continue
		}
		if _, err := q.f.Write(b[offset:]); err != nil {
			if fatal := q.d.fatalErr("write", q.index, err, true); fatal != nil {
				return i, fatal
			}
			q.d.writeFailed(q.index, 1, err)
		}
	}
	return len(bufs), nil
}
