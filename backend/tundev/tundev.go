// Package tundev opens the TUN device of the data plane and moves packets
// through it.
//
// Two drivers sit behind one small interface:
//
//   - "offload" (the default): IFF_VNET_HDR with TSO4, TSO6 and, where the
//     kernel takes it (Linux >= 6.2), USO (IPv4 and IPv6): every packet
//     read or written carries a virtio-net header, so one read returns a
//     whole TSO/USO superpacket (up to 64 KiB) and one write hands the
//     kernel a whole coalesced one.
//     Split cuts a superpacket into segments without copying the payload;
//     Coalescer merges segments of a flow into one write (GRO) without
//     copying either.
//   - "water": github.com/songgao/water opens the device: no virtio header,
//     one packet per system call. The portable baseline for benchmarks and
//     the fallback where offloads misbehave.
//
// Both drivers support several queues (IFF_MULTI_QUEUE, one file descriptor
// per queue) so that each data-plane worker owns a queue.
//
// Every call blocks its OS thread in ppoll(2) (package fdpoll), not the Go
// netpoller: a packet then wakes exactly the thread that handles it.
// Device.Close and Device.Interrupt wake every waiting call.
//
// Open creates the device and sets its MTU only; addresses, routes and the
// link state belong to the caller (netlink).
package tundev

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
)

// Headroom is the room a caller leaves in front of a packet it builds for
// WritePacket as one piece: the offload driver wants the virtio-net header
// there (a zero one for a packet with complete checksums and no GSO).
const Headroom = VirtioHdrLen

// MaxQueues is the kernel's limit on queues of one multi-queue TUN device.
const MaxQueues = 256

// Driver names accepted in Options.Driver.
const (
	DriverOffload = "offload"
	DriverWater   = "water"
)

// Options configure Open.
type Options struct {
	// Name of the device, at most 15 bytes, e.g. "tulle0". Empty lets the
	// kernel choose ("tun%d"); Device.Name reports the result.
	Name string
	// MTU of the device, 68..65535.
	MTU int
	// Queues is the number of device queues (0 means 1). With more than one
	// the device is opened with IFF_MULTI_QUEUE, one file descriptor per
	// queue; the kernel spreads flows across queues by hash. Both drivers
	// support it. At most MaxQueues.
	Queues int
	// Driver is DriverOffload (default when empty) or DriverWater.
	Driver string
	// Logger receives the rare driver warnings (first refused write). Nil
	// means slog.Default().
	Logger *slog.Logger
}

// Queue is one queue of a TUN device. Its reads may run concurrently with
// its writes; ReadPacket must not run concurrently with itself (one
// reader). WritePacket is safe for concurrent use.
type Queue interface {
	// VirtioHeader reports whether ReadPacket and WritePacket carry the
	// virtio-net header (the offload driver).
	VirtioHeader() bool

	// ReadPacket reads one packet into buf and returns its length. With
	// VirtioHeader, buf[:VirtioHdrLen] is the packet's virtio-net header
	// (DecodeVirtioHdr) and a packet or TSO/USO superpacket follows; pass
	// ReadBufferSize bytes. Without, pass at least MTU bytes. If wait is
	// false and no packet is queued it returns ErrWouldBlock at once, else
	// it waits. It returns an error only when the device is closed or
	// interrupted (errors.Is(err, os.ErrClosed)) or was removed
	// (ErrDeviceGone). A packet larger than buf comes truncated to len(buf)
	// (the kernel's TUN does that silently); ReadBufferSize holds any
	// packet of a device with the default 64 KiB gso_max_size, and the IPv4
	// total length tells a truncated one.
	ReadPacket(buf []byte, wait bool) (int, error)

	// WritePacket writes one packet gathered from the pieces in iov (at
	// most MaxCoalesce+2; empty pieces are skipped) with one writev. With
	// VirtioHeader, the first VirtioHdrLen bytes are the virtio-net header. A
	// packet the kernel refuses is counted in Device.Stats and nil is
	// returned; the error is for a closed or removed device.
	WritePacket(iov [][]byte) error

	// Fd is the queue's file descriptor, for a caller that waits for it to
	// be readable itself (ppoll, with ReadPacket without wait); it must
	// stop using it before Device.Close.
	Fd() int
}

// ErrWouldBlock is returned by ReadPacket without wait when no packet is
// queued.
var ErrWouldBlock = errors.New("no packet queued")

// Stats are counters of a Device summed over its queues.
type Stats struct {
	// WriteErrors counts packets the kernel refused on write.
	WriteErrors uint64
}

// ErrDeviceGone is returned by ReadPacket and WritePacket when the kernel detached the
// queue without Close being called (the interface was deleted under us).
var ErrDeviceGone = errors.New("tun device was removed")

// Device is an open TUN device with one or more queues.
type Device struct {
	name       string
	mtu        int
	driver     string
	offload    bool
	udpOffload bool
	queues     []Queue
	closers    []func() error
	logger     *slog.Logger

	closed    atomic.Bool
	stopped   atomic.Bool // Interrupt or Close: every call returns os.ErrClosed
	closeOnce sync.Once
	closeErr  error

	writeErrors atomic.Uint64
	warnedWrite atomic.Bool
}

// Name returns the interface name the kernel gave the device.
func (d *Device) Name() string { return d.name }

// MTU returns the MTU set by Open.
func (d *Device) MTU() int { return d.mtu }

// Driver returns the driver in use (DriverOffload or DriverWater).
func (d *Device) Driver() string { return d.driver }

// Queues returns the device's queues; the slice must not be modified.
func (d *Device) Queues() []Queue { return d.queues }

// Offload reports whether TSO/GRO offloads (virtio-net header) are active.
func (d *Device) Offload() bool { return d.offload }

// UDPOffload reports whether the kernel accepted USO (UDP segmentation
// offload, Linux >= 6.2): ReadPacket then returns UDP superpackets too
// (for Split), and a Coalescer may merge UDP segments for WritePacket.
func (d *Device) UDPOffload() bool { return d.udpOffload }

// Stats returns the device's counters.
func (d *Device) Stats() Stats {
	return Stats{WriteErrors: d.writeErrors.Load()}
}

// Interrupt wakes every ReadPacket and WritePacket waiting on a queue and
// makes them, and every later call, return an error satisfying
// errors.Is(err, os.ErrClosed), without closing the queues: for an owner
// that stops its users, waits for them to return, and only then calls
// Close (which it still must). Idempotent; safe to call concurrently with
// any method.
func (d *Device) Interrupt() {
	d.stopped.Store(true)
	for _, q := range d.queues {
		if q, ok := q.(interruptible); ok {
			q.interrupt()
		}
	}
}

// interruptible is a queue that Interrupt can wake.
type interruptible interface{ interrupt() }

// Close closes every queue; the kernel removes the device when its last
// queue is closed (unless it was made persistent by someone else). Blocked
// ReadPacket and WritePacket calls return an error satisfying errors.Is(err,
// os.ErrClosed). Close is idempotent.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		d.closed.Store(true)
		d.stopped.Store(true)
		var errs []error
		for i, c := range d.closers {
			if err := c(); err != nil {
				errs = append(errs, fmt.Errorf("close tun %s queue %d: %w", d.name, i, err))
			}
		}
		d.closeErr = errors.Join(errs...)
	})
	return d.closeErr
}

// writeFailed counts n refused packets and logs the first failure.
func (d *Device) writeFailed(queue int, n int, err error) {
	d.writeErrors.Add(uint64(n))
	if !d.warnedWrite.Swap(true) {
		d.logger.Warn("tun write refused a packet (further failures are only counted)",
			"device", d.name, "queue", queue, "error", err)
	}
}

// checkOptions validates opts and fills in defaults.
func checkOptions(opts *Options) error {
	if len(opts.Name) > 15 {
		return fmt.Errorf("tun name %q: longer than 15 bytes", opts.Name)
	}
	if opts.MTU < 68 || opts.MTU > 65535 {
		return fmt.Errorf("tun %s: MTU %d: must be between 68 and 65535", opts.Name, opts.MTU)
	}
	if opts.Queues == 0 {
		opts.Queues = 1
	}
	if opts.Queues < 1 || opts.Queues > MaxQueues {
		return fmt.Errorf("tun %s: %d queues: must be between 1 and %d", opts.Name, opts.Queues, MaxQueues)
	}
	switch opts.Driver {
	case "":
		opts.Driver = DriverOffload
	case DriverOffload, DriverWater:
	default:
		return fmt.Errorf("tun %s: driver %q: must be %q or %q", opts.Name, opts.Driver, DriverOffload, DriverWater)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return nil
}
