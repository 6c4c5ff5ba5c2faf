package tundev

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend/internal/fdpoll"
)

// maxIovecs is the most pieces WritePacket gathers: the virtio header, a
// first packet and MaxCoalesce payloads.
const maxIovecs = MaxCoalesce + 2

// queue is one queue of the device: a non-blocking file descriptor on
// which every call waits in fdpoll (ppoll on the calling thread), never in
// the Go netpoller.
type queue struct {
	d     *Device
	index int
	fd    int
	vnet  bool
	stop  *fdpoll.Stop
	// closeMu: every I/O call holds it shared while it uses fd; close takes
	// it exclusively (after stop wakes the waiters), so fd is never used
	// after it is closed or reused.
	closeMu sync.RWMutex
	closeFd func() error
}

func newQueue(d *Device, index, fd int, vnet bool, closeFd func() error) (*queue, error) {
	stop, err := fdpoll.NewStop()
	if err != nil {
		return nil, err
	}
	return &queue{d: d, index: index, fd: fd, vnet: vnet, stop: stop, closeFd: closeFd}, nil
}

// close stops every call in progress and closes the descriptor.
func (q *queue) close() error {
	q.stop.Signal()
	q.closeMu.Lock()
	defer q.closeMu.Unlock()
	err := q.closeFd()
	q.stop.Close()
	return err
}

// interrupt wakes the calls waiting on the queue (Device.Interrupt).
func (q *queue) interrupt() { q.stop.Signal() }

func (q *queue) VirtioHeader() bool { return q.vnet }
func (q *queue) Fd() int            { return q.fd }
func (q *queue) errClosed(op string) error {
	return fmt.Errorf("%s tun %s queue %d: %w", op, q.d.name, q.index, os.ErrClosed)
}

// ioErr maps a system call error of op to the error the caller sees.
func (q *queue) ioErr(op string, e error) error {
	if errors.Is(e, unix.EBADFD) || errors.Is(e, unix.EBADF) {
		if q.d.stopped.Load() {
			return q.errClosed(op)
		}
		return fmt.Errorf("%s tun %s queue %d: %w", op, q.d.name, q.index, ErrDeviceGone)
	}
	return fmt.Errorf("%s tun %s queue %d: %w", op, q.d.name, q.index, e)
}

func (q *queue) ReadPacket(buf []byte, wait bool) (int, error) {
	q.closeMu.RLock()
	defer q.closeMu.RUnlock()
	for {
		if q.d.stopped.Load() {
			return 0, q.errClosed("read")
		}
		n, err := unix.Read(q.fd, buf)
		switch {
		case err == nil && n > 0:
			return n, nil
		case err == nil: // 0 bytes: the queue was detached
			return 0, q.ioErr("read", unix.EBADFD)
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			if !wait {
				return 0, ErrWouldBlock
			}
			if err := q.stop.Wait(q.fd, unix.POLLIN, time.Time{}); err != nil {
				if errors.Is(err, fdpoll.ErrStopped) {
					return 0, q.errClosed("read")
				}
				return 0, q.ioErr("read", err)
			}
		default:
			return 0, q.ioErr("read", err)
		}
	}
}

func (q *queue) WritePacket(iov [][]byte) error {
	if len(iov) > maxIovecs {
		return fmt.Errorf("write tun %s queue %d: %d pieces, at most %d", q.d.name, q.index, len(iov), maxIovecs)
	}
	var vecs [maxIovecs]unix.Iovec
	n, total := 0, 0
	for _, b := range iov {
		if len(b) == 0 {
			continue
		}
		vecs[n].Base = &b[0]
		vecs[n].SetLen(len(b))
		n++
		total += len(b)
	}
	if total == 0 || (q.vnet && total <= VirtioHdrLen) {
		q.d.writeFailed(q.index, 1, errEmptyPacket)
		return nil
	}
	q.closeMu.RLock()
	defer q.closeMu.RUnlock()
	for {
		if q.d.stopped.Load() {
			return q.errClosed("write")
		}
		_, _, e := unix.Syscall(unix.SYS_WRITEV, uintptr(q.fd), uintptr(unsafe.Pointer(&vecs[0])), uintptr(n))
		switch e {
		case 0:
			return nil
		case unix.EINTR:
		case unix.EAGAIN:
			if err := q.stop.Wait(q.fd, unix.POLLOUT, time.Time{}); err != nil {
				if errors.Is(err, fdpoll.ErrStopped) {
					return q.errClosed("write")
				}
				return q.ioErr("write", err)
			}
		case unix.EBADFD, unix.EBADF:
			return q.ioErr("write", e)
		default: // EIO (link down), EINVAL (not an IP packet), ...: this packet only
			q.d.writeFailed(q.index, 1, e)
			return nil
		}
	}
}
