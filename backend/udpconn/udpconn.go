// Package udpconn is the UDP socket layer of the data plane: an IPv4 or
// IPv6 UDP socket that moves many datagrams per syscall (recvmmsg,
// sendmmsg), with UDP GSO on send (UDP_SEGMENT) and UDP GRO on receive
// (UDP_GRO), for either family.
//
// Every message header, iovec, address and control buffer is allocated once
// in Listen; ReadBatch and WriteBatch allocate nothing. The socket is
// non-blocking; when a call has to wait it blocks its OS thread in ppoll(2)
// (package fdpoll) rather than the Go netpoller, so that a datagram wakes
// exactly the thread that handles it. Close and Interrupt wake every
// waiting call.
package udpconn

import (
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/backend/internal/fdpoll"
)

// Defaults for Options.
const (
	DefaultBatchSize  = 128
	DefaultBufferSize = 8 << 20 // bytes, for each of the receive and send buffers
)

// MaxMessageBytes is the most payload one message may carry, GSO or not:
// an IPv4 packet's 65535 bytes less the IPv4 and UDP headers (over IPv6 the
// limit is 65527, the payload length less the UDP header: this one fits
// both).
const MaxMessageBytes = 65535 - 20 - 8

// GROBufferSize is the Buf size that always holds a GRO batch (at most
// 64 KiB of UDP payload); smaller buffers may see batches reported Truncated.
const GROBufferSize = 1 << 16

// Message is one datagram (or, with GSO/GRO, a train of equal-sized
// datagrams to or from one peer) in a batch.
type Message struct {
	// Buf is, for a write, the payload: with SegSize > 0 a train of
	// SegSize-byte datagrams, the last one possibly shorter. For a read it
	// is the buffer to fill (len(Buf) is the capacity used).
	Buf []byte
	// Iov, if not nil, is for a write the payload gathered from pieces
	// (Buf is then ignored): the datagram, or with SegSize the train, is
	// the concatenation of the pieces, which need not align with segment
	// boundaries. At most MaxIovecs pieces.
	Iov [][]byte
	// N is, for a read, the number of bytes received into Buf.
	N int
	// Addr is, for a write, the destination: IPv4 (or IPv4-mapped IPv6)
	// for an IPv4 Conn, IPv6 for an IPv6 one; for a read, the source
	// (IPv4 unmapped, or IPv6).
	Addr netip.AddrPort
	// SegSize is, for a write, the GSO segment size (0 = Buf is one
	// datagram). For a read, the GRO segment size: Buf[:N] holds datagrams
	// of SegSize bytes, the last one possibly shorter (0 = one datagram).
	SegSize int
	// Truncated is set by a read when the datagram (or GRO batch) did not
	// fit in Buf (MSG_TRUNC): Buf[:N] holds only its start; drop and count it.
	Truncated bool
	// Err is set by a write to the error of this message (e.g. EMSGSIZE,
	// EAFNOSUPPORT for an Addr of the other family), 0 if it was sent.
	Err syscall.Errno
}

// Options configure Listen.
type Options struct {
	// ReusePort sets SO_REUSEPORT so that several Conns (one per worker)
	// can bind the same address; the kernel spreads flows among them.
	ReusePort bool
	// RecvBuffer and SendBuffer are socket buffer sizes in bytes (0 =
	// DefaultBufferSize). SO_RCVBUFFORCE / SO_SNDBUFFORCE are tried first
	// (need CAP_NET_ADMIN), then SO_RCVBUF / SO_SNDBUF (capped by
	// net.core.rmem_max / wmem_max).
	RecvBuffer, SendBuffer int
	// BatchSize is the most messages one ReadBatch returns and one
	// sendmmsg carries (0 = DefaultBatchSize); it sizes the preallocated
	// headers.
	BatchSize int
	// DisableGSO and DisableGRO turn the offloads off even where the kernel
	// has them. Without GSO, WriteBatch still accepts SegSize and sends the
	// segments as separate datagrams.
	DisableGSO, DisableGRO bool
	// Logger receives the rare warnings (GSO turned off after EIO). Nil
	// means slog.Default().
	Logger *slog.Logger
}

// Stats are counters of a Conn.
type Stats struct {
	// SplitSends counts GSO messages the kernel refused as a whole (EINVAL
	// or EMSGSIZE: a segment above the path MTU, too many segments, more
	// than MaxMessageBytes; EIO: no GSO on the route) that were then sent
	// one datagram per segment.
	SplitSends uint64
	// SendWaits counts the times a WriteBatch found the socket's send
	// buffer full and waited for room (the underlay or its queue does not
	// take the datagrams as fast as they are sent).
	SendWaits uint64
}

// ErrWouldBlock is returned by TryReadBatch when no datagram is queued.
var ErrWouldBlock = errors.New("no datagram queued")

// MaxIovecs is the most pieces one message's Iov may have (the kernel's
// UIO_MAXIOV).
const MaxIovecs = 1024

// Conn is an IPv4 or IPv6 UDP socket with batched I/O. ReadBatch may run
// concurrently with WriteBatch; each is serialized with itself.
type Conn struct {
	fd      int
	stop    *fdpoll.Stop
	laddr   netip.AddrPort
	v6      bool   // an IPv6 socket (IPV6_V6ONLY)
	nameLen uint32 // the length of its socket addresses
	batch   int
	gro     bool
	maxSegs int
	logger  *slog.Logger

	gso          atomic.Bool
	splitSends   atomic.Uint64
	sendWaits    atomic.Uint64
	readDeadline atomic.Int64 // UnixNano, 0 = none
	closed       atomic.Bool
	// closeMu: ReadBatch, WriteBatch and Drops hold it shared while they
	// use fd; Close takes it exclusively after waking them, so fd is never
	// used after it is closed.
	closeMu   sync.RWMutex
	fdClosed  bool // under closeMu
	closeOnce sync.Once
	closeErr  error

	rmu sync.Mutex
	r   readState

	wmu sync.Mutex
	w   writeState
}

// GSO reports whether UDP segmentation offload is in use (kernel >= 4.18,
// not disabled, not turned off after an EIO).
func (c *Conn) GSO() bool { return c.gso.Load() }

// GRO reports whether UDP receive coalescing is on (kernel >= 5.0).
func (c *Conn) GRO() bool { return c.gro }

// MaxSegments is the most GSO segments one message may carry: 64, or 128
// on Linux >= 6.9 (UDP_MAX_SEGMENTS). A message with more is still
// delivered, one datagram per segment.
func (c *Conn) MaxSegments() int { return c.maxSegs }

// BatchSize is the most messages one ReadBatch returns (and one sendmmsg
// carries).
func (c *Conn) BatchSize() int { return c.batch }

// LocalAddr returns the bound address (IPv4 unmapped, or IPv6), with the
// port the kernel chose if Listen was given port 0.
func (c *Conn) LocalAddr() netip.AddrPort { return c.laddr }

// Stats returns the Conn's counters.
func (c *Conn) Stats() Stats {
	return Stats{SplitSends: c.splitSends.Load(), SendWaits: c.sendWaits.Load()}
}

// SetReadDeadline makes a ReadBatch waiting past t return an error
// satisfying errors.Is(err, os.ErrDeadlineExceeded); the zero time clears
// it. Workers do not need it (Close unblocks them); tests do.
func (c *Conn) SetReadDeadline(t time.Time) error {
	var ns int64
	if !t.IsZero() {
		ns = t.UnixNano()
	}
	c.readDeadline.Store(ns)
	return nil
}
