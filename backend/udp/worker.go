package udp

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend/internal/fdpoll"
	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/backend/udpconn"
)

// worker owns one TUN queue and one UDP socket and runs two loops on them,
// TX (TUN -> UDP) and RX (UDP -> TUN), each on a goroutine locked to its
// own OS thread: when a loop finds nothing to do it blocks its thread in
// ppoll, so a packet wakes exactly the loop that handles it, and the two
// directions of a flow run in parallel. (Measured against one loop per
// worker serving both directions: that saves wakeups but serializes a TCP
// sender's data with its ACKs, 0.57x against 0.67x of kernel VXLAN on one
// stream.) Flows are spread over the workers by the multi-queue TUN on
// transmit and by steer.go on receive. All buffers are allocated here,
// once.
type worker struct {
	id    int
	b     *Backend
	queue tundev.Queue
	conn  *udpconn.Conn
	stop  *fdpoll.Stop // wakes the loop for shutdown
	tx    txLoop
	rx    rxLoop
}

func newWorker(b *Backend, id int, q tundev.Queue, conn *udpconn.Conn, udpGRO bool) (*worker, error) {
	stop, err := fdpoll.NewStop()
	if err != nil {
		return nil, fmt.Errorf("worker %d: %w", id, err)
	}
	w := &worker{id: id, b: b, queue: q, conn: conn, stop: stop}
	w.tx.init(w, q.VirtioHeader(), conn.MaxSegments())
	w.rx.init(w, q.VirtioHeader(), udpGRO)
	return w, nil
}

// conns are the worker's open sockets (none in pure tests).
func (w *worker) conns() []*udpconn.Conn {
	if w.conn == nil {
		return nil
	}
	return []*udpconn.Conn{w.conn}
}

// loopErr turns an I/O error into the loop's result: nil while the backend
// is shutting down (closing the device and sockets is how loops are
// stopped), else the error naming the worker.
func (w *worker) loopErr(op string, err error) error {
	if w.b.stopping.Load() {
		return nil
	}
	return fmt.Errorf("worker %d: %s: %w", w.id, op, err)
}

// runTX forwards from the TUN queue to the socket until the backend stops
// it or I/O fails, waiting for the queue when it is empty.
func (w *worker) runTX() error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	return w.loop(w.transmit, w.queue.Fd(), w.tx.stats)
}

// runRX delivers from the socket to the TUN queue likewise.
func (w *worker) runRX() error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	return w.loop(w.receive, w.conn.Fd(), w.rx.stats)
}

// loop runs step while it finds work, and waits for fd to be readable
// when it does not. Each step is bracketed in the loop's stats s, so that
// the control side knows when no step holds an older route table.
func (w *worker) loop(step func() (bool, error), fd int, s *loopStats) error {
	for !w.b.stopping.Load() {
		s.enterStep()
		did, err := step()
		s.leaveStep()
		if err != nil {
			return err
		}
		if did {
			continue
		}
		if err := w.stop.Wait(fd, unix.POLLIN, time.Time{}); err != nil {
			if errors.Is(err, fdpoll.ErrStopped) {
				return nil
			}
			return w.loopErr("wait", err)
		}
	}
	return nil
}

// transmit forwards what the TUN queue holds, up to txSlots packets (or
// superpackets) and txBatchBytes; false if it held nothing.
func (w *worker) transmit() (bool, error) {
	tx := &w.tx
	var t *table
	reads := 0
	for reads < len(tx.slots) && tx.bytes < txBatchBytes {
		slot := tx.slots[reads]
		n, err := w.queue.ReadPacket(slot, false)
		if err == tundev.ErrWouldBlock {
			break
		}
		if err != nil {
			return false, w.loopErr("tun read", err)
		}
		if t == nil {
			t = w.b.table.Load()
		}
		reads++
		if err := tx.handle(t, slot[:n]); err != nil {
			return false, w.loopErr("udp send", err)
		}
	}
	if reads == 0 {
		return false, nil
	}
	if err := tx.flush(); err != nil {
		return false, w.loopErr("udp send", err)
	}
	return true, nil
}

// receive delivers one batch from the socket; false if it held nothing.
func (w *worker) receive() (bool, error) {
	n, err := w.conn.TryReadBatch(w.rx.msgs)
	if err == udpconn.ErrWouldBlock {
		return false, nil
	}
	if err != nil {
		return false, w.loopErr("udp receive", err)
	}
	if err := w.rx.deliver(w.b.table.Load(), n); err != nil {
		return false, w.loopErr("tun write", err)
	}
	return true, nil
}
