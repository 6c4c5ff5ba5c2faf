//go:build linux

// Package fdpoll blocks a data-plane thread in ppoll(2) until a file
// descriptor is ready, until a stop event is signalled, or until a deadline.
//
// The data plane does its I/O with non-blocking system calls, one goroutine
// per loop. When a call would block, the thread waits here in
// the kernel, so that the packet that ends the wait wakes exactly this thread:
// one wakeup per hop, as for a kernel path, instead of the Go netpoller's
// hand-over between threads (measured: over 150 us more round-trip time on a
// 2-vCPU virtual machine).
//
// A Stop is an eventfd that, once signalled, stays readable: every Wait on
// it, now and later, returns ErrStopped. Closing the descriptors waited on
// is the caller's business, after the waits have returned.
package fdpoll

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrStopped is returned by Wait once the Stop was signalled.
var ErrStopped = errors.New("stopped")

// Stop is a stop event shared by the waits of one object (a socket, a TUN
// queue). The zero value is not usable; use NewStop.
type Stop struct {
	fd        int
	signalled atomic.Bool
	closeOnce sync.Once
}

// NewStop makes a stop event (an eventfd).
func NewStop() (*Stop, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	return &Stop{fd: fd}, nil
}

// Signal wakes every Wait on s, now and later. Safe to call more than once
// and concurrently with Wait.
func (s *Stop) Signal() {
	if s.signalled.Swap(true) {
		return
	}
	var one [8]byte
	*(*uint64)(unsafe.Pointer(&one[0])) = 1
	_, _ = unix.Write(s.fd, one[:]) // cannot fail short of a closed fd
}

// Signalled reports whether Signal was called.
func (s *Stop) Signalled() bool { return s.signalled.Load() }

// Close releases the eventfd; call it after every Wait has returned.
func (s *Stop) Close() error {
	var err error
	s.closeOnce.Do(func() { err = unix.Close(s.fd) })
	return err
}

// Wait blocks the calling thread until fd has one of events (unix.POLLIN,
// unix.POLLOUT) or an error condition (POLLERR, POLLHUP: the next I/O call
// reports it), until s is signalled (ErrStopped), or until deadline passes
// (os.ErrDeadlineExceeded; the zero time means no deadline). It returns nil
// when the caller should retry its I/O.
func (s *Stop) Wait(fd int, events int16, deadline time.Time) error {
	fds := [3]unix.PollFd{{Fd: int32(fd), Events: events}, {Fd: -1}}
	return s.wait(&fds, deadline)
}

// WaitHot is Wait for a loop that has just had work and expects more
// soon: its thread blocks in ppoll for at most timeout (a positive
// duration) without handing its P back to the Go scheduler (a raw system
// call). It returns nil when fd is ready, on a signal and when timeout
// passes, ErrStopped once s is signalled.
//
// Why: Wait hands the P back. Blocked for more than 10 ms, the thread has
// the P taken away by sysmon; on waking it needs another, and when every P
// was idle it wakes sysmon too, which then polls every 20 us for about a
// millisecond. In a virtual machine each of those wakeups costs tens of
// microseconds on the data path's CPUs (docs/PERFORMANCE.md, "RTT: four wake-ups").
// A raw wait has nothing to hand back and nobody to wake.
//
// What it costs: the P stays with this thread (the data plane raises
// GOMAXPROCS for its loops); sysmon preempts a goroutine it sees running
// for 10 ms, with a signal that ends the ppoll (EINTR), and the garbage
// collector's stop-the-world reaches the thread the same way. Without
// those signals (GODEBUG=asyncpreemptoff=1) a stop-the-world waits for
// the timeout, which is why it is bounded; and the thread wakes at least
// every timeout, so that callers switch to Wait once they have been idle.
func (s *Stop) WaitHot(fd int, events int16, timeout time.Duration) error {
	if s.signalled.Load() {
		return ErrStopped
	}
	fds := [3]unix.PollFd{{Fd: int32(fd), Events: events}, {Fd: -1}, {Fd: int32(s.fd), Events: unix.POLLIN}}
	ts := unix.NsecToTimespec(int64(max(timeout, time.Microsecond)))
	_, _, e := syscall.RawSyscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&fds[0])), 3,
		uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
	switch {
	case e == unix.EINTR:
		return nil
	case e != 0:
		return fmt.Errorf("ppoll: %w", e)
	case fds[2].Revents != 0 || s.signalled.Load():
		return ErrStopped
	}
	return nil
}

// wait polls fds[0] (and fds[1], unless its Fd is -1) and the stop event.
func (s *Stop) wait(fds *[3]unix.PollFd, deadline time.Time) error {
	if s.signalled.Load() {
		return ErrStopped
	}
	fds[2] = unix.PollFd{Fd: int32(s.fd), Events: unix.POLLIN}
	var ts *unix.Timespec
	var tsv unix.Timespec
	if !deadline.IsZero() {
		d := time.Until(deadline)
		if d <= 0 {
			return os.ErrDeadlineExceeded
		}
		tsv = unix.NsecToTimespec(int64(d))
		ts = &tsv
	}
	// syscall.Syscall6, not RawSyscall: the runtime hands this thread's P to
	// other goroutines while it sleeps.
	n, _, e := syscall.Syscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&fds[0])), 3,
		uintptr(unsafe.Pointer(ts)), 0, 0, 0)
	switch {
	case e == unix.EINTR:
		return nil
	case e != 0:
		return fmt.Errorf("ppoll: %w", e)
	case fds[2].Revents != 0 || s.signalled.Load():
		return ErrStopped
	case n == 0:
		return os.ErrDeadlineExceeded
	}
	return nil
}
