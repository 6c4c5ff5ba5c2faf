package tundev

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun"
)

const (
	// TCP offloads (Linux 2.6): wireguard/tun requires them with IFF_VNET_HDR.
	tunTCPOffloads = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6
	// UDP segmentation offload (Linux 6.2); optional.
	tunUDPOffloads = unix.TUN_F_USO4 | unix.TUN_F_USO6

	// offloadBatch is the most packets one wireguard Read returns and one
	// wireguard Write may be given: its GRO tables are sized for it (more
	// would allocate or, with more flows than that, panic).
	offloadBatch = conn.IdealBatchSize
)

// openOffload opens opts.Queues queues with IFF_VNET_HDR and wraps each in a
// wireguard tun.Device. It uses tun.CreateUnmonitoredTUNFromFD: unlike
// CreateTUNFromFile it starts no netlink listener and no once-a-second
// status-probe goroutine per queue, and does not set the MTU (Open does that
// once for the device).
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
		// Enable offloads before wireguard owns the fd, so that its own
		// TUNSETOFFLOAD (same flags) cannot fail after it wrapped the fd in
		// an *os.File we could not close safely.
		if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tunTCPOffloads); err != nil {
			unix.Close(fd)
			return fmt.Errorf("tun %s: queue %d: enable TSO offloads (TUNSETOFFLOAD): %w", name, i, err)
		}
		uso := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tunTCPOffloads|tunUDPOffloads) == nil
		if i == 0 {
			d.udpOffload = uso
		}
		dev, _, err := tun.CreateUnmonitoredTUNFromFD(fd)
		if err != nil {
			// The fd now belongs to an *os.File inside wireguard that
			// closes it when collected; closing it here could close a
			// reused descriptor.
			return fmt.Errorf("tun %s: queue %d: wrap in wireguard tun: %w", name, i, err)
		}
		if dev.BatchSize() != offloadBatch {
			dev.Close()
			return fmt.Errorf("tun %s: queue %d: wireguard tun reports batch size %d, want %d (virtio header not active)", name, i, dev.BatchSize(), offloadBatch)
		}
		d.queues = append(d.queues, &offloadQueue{
			d:       d,
			index:   i,
			dev:     dev,
			mtu:     opts.MTU,
			scratch: make([][]byte, 0, offloadBatch),
		})
		d.closers = append(d.closers, dev.Close)
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

// offloadQueue is one queue driven by wireguard's tun.Device (TSO/USO split
// on Read, GRO coalesce on Write).
type offloadQueue struct {
	d     *Device
	index int
	dev   tun.Device
	mtu   int
	// scratch holds the slice headers handed to wireguard's Write, which
	// swaps and extends them; the caller's bufs stay untouched.
	scratch [][]byte
}

func (q *offloadQueue) BatchSize() int { return offloadBatch }

func (q *offloadQueue) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if err := checkReadArgs(bufs, sizes, offset, q.mtu); err != nil {
		return 0, err
	}
	for {
		n, err := q.dev.Read(bufs, sizes, offset)
		if err != nil {
			if fatal := q.d.fatalErr("read", q.index, err, false); fatal != nil {
				return 0, fatal
			}
			// Malformed virtio header, oversize packet, or (with n > 0)
			// more segments than bufs: drop what did not fit.
			q.d.dropRead(q.index, err)
			if n <= 0 {
				continue
			}
		}
		if !sizesFit(bufs, sizes[:n], offset) {
			q.d.dropRead(q.index, errSegmentOverflow)
			continue
		}
		return n, nil
	}
}

// errSegmentOverflow: a split segment was larger than its buffer (the MTU
// was raised after Open); wireguard copied it short.
var errSegmentOverflow = errors.New("segment larger than its buffer (MTU raised after Open?)")

func sizesFit(bufs [][]byte, sizes []int, offset int) bool {
	for i, s := range sizes {
		if s > len(bufs[i])-offset {
			return false
		}
	}
	return true
}

func (q *offloadQueue) Write(bufs [][]byte, offset int) (int, error) {
	if offset < Headroom {
		return 0, errBadOffset
	}
	next := 0
	for next < len(bufs) {
		chunkStart := next
		s := q.scratch[:0]
		for ; next < len(bufs) && len(s) < offloadBatch; next++ {
			if len(bufs[next]) <= offset {
				q.d.writeFailed(q.index, 1, errEmptyPacket)
				continue
			}
			s = append(s, bufs[next])
		}
		if len(s) == 0 {
			continue
		}
		_, err := q.dev.Write(s, offset)
		clear(s) // do not keep the caller's buffers reachable
		if err != nil {
			if fatal := q.d.fatalErr("write", q.index, err, true); fatal != nil {
				return chunkStart, fatal
			}
			q.d.writeFailed(q.index, joinedCount(err), err)
		}
	}
	return len(bufs), nil
}
