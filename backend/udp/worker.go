package udp

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend/internal/fdpoll"
	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/backend/udpconn"
)

// worker owns one TUN queue and one UDP socket (and with the IPv6
// underlay a second, IPv6 one) and runs two loops on them, TX (TUN -> UDP)
// and RX (UDP -> TUN; a second RX loop for the IPv6 socket), each on its
// own goroutine: when a loop finds nothing to do it blocks its thread in
// ppoll (package fdpoll, not the Go netpoller), so a packet wakes exactly
// the thread that handles it, and the two directions of a flow run in
// parallel. (Measured against one loop per worker serving both
// directions: that saves wakeups but serializes a TCP sender's data with
// its ACKs, 0.57x against 0.67x of kernel VXLAN on one stream.) Flows are
// spread over the workers by the multi-queue TUN on transmit and by
// steer.go on receive. All buffers are allocated here, once.
type worker struct {
	id    int
	b     *Backend
	queue tundev.Queue
	conn  *udpconn.Conn
	conn6 *udpconn.Conn // the IPv6 underlay's socket; nil without it
	stop  *fdpoll.Stop  // wakes the loops for shutdown
	tx    txLoop
	rx    rxLoop
	rx6   rxLoop // reads conn6 (when it is not nil)
}

func newWorker(b *Backend, id int, q tundev.Queue, conn, conn6 *udpconn.Conn, udpGRO bool) (*worker, error) {
	stop, err := fdpoll.NewStop()
	if err != nil {
		return nil, fmt.Errorf("worker %d: %w", id, err)
	}
	w := &worker{id: id, b: b, queue: q, conn: conn, conn6: conn6, stop: stop}
	w.tx.init(w, q.VirtioHeader(), conn.MaxSegments())
	w.rx.init(w, conn, q.VirtioHeader(), udpGRO)
	if conn6 != nil {
		w.rx6.init(w, conn6, q.VirtioHeader(), udpGRO)
	}
	return w, nil
}

// conns are the worker's open sockets (none in pure tests).
func (w *worker) conns() []*udpconn.Conn {
	var cs []*udpconn.Conn
	for _, c := range []*udpconn.Conn{w.conn, w.conn6} {
		if c != nil {
			cs = append(cs, c)
		}
	}
	return cs
}

// receivers are the worker's RX loops: one per socket.
func (w *worker) receivers() []*rxLoop {
	if w.conn6 == nil {
		return []*rxLoop{&w.rx}
	}
	return []*rxLoop{&w.rx, &w.rx6}
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
	return w.loop(w.transmit, w.queue.Fd(), w.tx.stats)
}

// runRX delivers from rx's socket to the TUN queue likewise.
func (w *worker) runRX(rx *rxLoop) error {
	return w.loop(func() (bool, error) { return w.receive(rx) }, rx.conn.Fd(), rx.stats)
}

// Waiting. A loop that found work within hotFor waits hot (fdpoll.WaitHot:
// its thread keeps its P, at most hotWait per wait), else cold (fdpoll.Wait:
// the P goes back to the scheduler). A thread that waits cold for more
// than 10 ms has its P taken by sysmon; to go on it needs another one and,
// when every P was idle, wakes sysmon, which then polls every 20 us for a
// millisecond: in the benchmark's virtual machine a ping crossing four such
// hops took 130-180 us longer (docs/PERFORMANCE.md, "RTT: four wake-ups"). Waiting hot
// for good cost 2 % of a core per idle tulled (sysmon preempts a goroutine
// it sees running for 10 ms, with a signal that ends the wait), so a loop
// idle for hotFor waits cold again (0.1 %, as before). The goroutines are
// not locked to their threads: a preempted loop then goes on on whichever
// thread has a P, where a locked one has to hand its P over and wake its
// own thread back (measured: 5-8 % less CPU per GB, 20 us less RTT).
// Loops wait hot only while GOMAXPROCS leaves a P for every loop and the
// CPUs' worth for the rest of the daemon (raiseGOMAXPROCS).
const (
	hotFor  = time.Second
	hotWait = 100 * time.Millisecond
)

// loop runs step while it finds work, and waits for fd to be readable
// when it does not. Each step is bracketed in the loop's stats s, so that
// the control side knows when no step holds an older route table.
func (w *worker) loop(step func() (bool, error), fd int, s *loopStats) error {
	var worked time.Time // when step last found work
	for !w.b.stopping.Load() {
		s.enterStep()
		did, err := step()
		s.leaveStep()
		if err != nil {
			return err
		}
		now := time.Now()
		if did {
			worked = now
			continue
		}
		if now.Sub(worked) < hotFor && w.b.hot.Load() {
			err = w.stop.WaitHot(fd, unix.POLLIN, hotWait)
		} else {
			err = w.stop.Wait(fd, unix.POLLIN, time.Time{})
		}
		if err != nil {
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

// receive delivers one batch from rx's socket; false if it held nothing.
func (w *worker) receive(rx *rxLoop) (bool, error) {
	n, err := rx.conn.TryReadBatch(rx.msgs)
	if err == udpconn.ErrWouldBlock {
		return false, nil
	}
	if err != nil {
		return false, w.loopErr("udp receive", err)
	}
	if err := rx.deliver(w.b.table.Load(), n); err != nil {
		return false, w.loopErr("tun write", err)
	}
	return true, nil
}
