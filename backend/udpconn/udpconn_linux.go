package udpconn

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend/internal/fdpoll"
)

// sockaddr is the room for one message's address: a sockaddr_in6, which
// also holds a sockaddr_in (an IPv4 Conn passes the shorter length).
type sockaddr = unix.RawSockaddrInet6

const (
	// rctrlLen is the control buffer per received message: room for the
	// UDP_GRO cmsg (an int) and a spare one.
	rctrlLen = 64
	// splitIovecs is the iovec pool of a split send (one datagram per
	// segment): enough for maxSegs segments of a few pieces each.
	splitIovecs = 2048
)

var (
	// cmsgDataOff is where a cmsg's data starts after its header.
	cmsgDataOff = unix.CmsgLen(0)
	// wctrlLen is the control buffer per sent message: one UDP_SEGMENT cmsg.
	wctrlLen = unix.CmsgSpace(2)
)

// readState is the receive side, guarded by Conn.rmu.
type readState struct {
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []sockaddr
	ctrl  []byte
}

// writeState is the send side, guarded by Conn.wmu.
type writeState struct {
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec // pool: each message takes one per piece
	names []sockaddr
	ctrl  []byte

	// split sends: one datagram per segment of one message
	shdrs []unix.Mmsghdr
	siovs []unix.Iovec
	sname sockaddr

	msgs      []Message     // the chunk being sent
	next      int           // next message to send
	seg       int           // next byte of msgs[next] in a split send
	splitting bool          // a split send of msgs[next] has begun
	split     int           // index of a GSO message refused with EINVAL, -1 if none
	errno     syscall.Errno // fatal errno
}

// Listen opens a UDP socket bound to laddr: an IPv4 one for an IPv4
// address (an invalid or unspecified address binds 0.0.0.0), an IPv6-only
// one (IPV6_V6ONLY: IPv4 goes to an IPv4 socket of its own) for an IPv6
// address such as [::]. The path MTU discovery mode is left at the Linux
// default (IP_PMTUDISC_WANT unless the host sets net.ipv4.ip_no_pmtu_disc;
// IPV6_PMTUDISC_WANT): datagrams that fit the path MTU carry DF, as
// flannel's do (IPv6 has no DF: routers never fragment), and larger ones
// are fragmented by the kernel.
func Listen(laddr netip.AddrPort, opts Options) (*Conn, error) {
	if opts.BatchSize <= 0 {
		opts.BatchSize = DefaultBatchSize
	}
	if opts.RecvBuffer <= 0 {
		opts.RecvBuffer = DefaultBufferSize
	}
	if opts.SendBuffer <= 0 {
		opts.SendBuffer = DefaultBufferSize
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	addr := laddr.Addr()
	if !addr.IsValid() {
		addr = netip.IPv4Unspecified()
	}
	v6 := addr.Is6() && !addr.Is4In6()
	addr = addr.Unmap()
	bind := netip.AddrPortFrom(addr, laddr.Port())
	family := unix.AF_INET
	if v6 {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("udp listen %s: socket: %w", bind, err)
	}
	fail := func(format string, args ...any) (*Conn, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("udp listen %s: "+format, append([]any{bind}, args...)...)
	}
	if v6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
			return fail("set IPV6_V6ONLY: %w", err)
		}
	}
	if opts.ReusePort {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return fail("set SO_REUSEPORT: %w", err)
		}
	}
	if err := setBuffer(fd, unix.SO_RCVBUFFORCE, unix.SO_RCVBUF, opts.RecvBuffer); err != nil {
		return fail("set receive buffer %d: %w", opts.RecvBuffer, err)
	}
	if err := setBuffer(fd, unix.SO_SNDBUFFORCE, unix.SO_SNDBUF, opts.SendBuffer); err != nil {
		return fail("set send buffer %d: %w", opts.SendBuffer, err)
	}
	var sa unix.Sockaddr
	if v6 {
		sa = &unix.SockaddrInet6{Port: int(bind.Port()), Addr: addr.As16()}
	} else if addr.Is4() {
		sa = &unix.SockaddrInet4{Port: int(bind.Port()), Addr: addr.As4()}
	} else {
		return fail("not an IPv4 or IPv6 address")
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail("bind: %w", err)
	}
	sa, err = unix.Getsockname(fd)
	if err != nil {
		return fail("getsockname: %w", err)
	}
	var local netip.AddrPort
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		local = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		local = netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	default:
		return fail("getsockname returned %T", sa)
	}
	stop, err := fdpoll.NewStop()
	if err != nil {
		return fail("%w", err)
	}
	c := &Conn{
		fd:      fd,
		stop:    stop,
		laddr:   local,
		v6:      v6,
		nameLen: unix.SizeofSockaddrInet4,
		batch:   opts.BatchSize,
		maxSegs: maxSegmentsForKernel(),
		logger:  opts.Logger,
	}
	if v6 {
		c.nameLen = unix.SizeofSockaddrInet6
	}
	var gso, gro bool
	// UDP_SEGMENT as a socket option exists where the cmsg does (4.18).
	if !opts.DisableGSO {
		_, err := unix.GetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_SEGMENT)
		gso = err == nil
	}
	if !opts.DisableGRO {
		gro = unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
	}
	c.gso.Store(gso)
	c.gro = gro
	c.initBuffers()
	c.logger.Debug("udp socket open", "addr", c.laddr, "gso", gso, "gro", gro,
		"max_segments", c.maxSegs, "batch", c.batch)
	return c, nil
}

// Close closes the socket. Blocked ReadBatch and WriteBatch calls return an
// error satisfying errors.Is(err, net.ErrClosed). Close is idempotent.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		c.stop.Signal()
		c.closeMu.Lock()
		defer c.closeMu.Unlock()
		c.closeErr = unix.Close(c.fd)
		c.fdClosed = true
		c.stop.Close()
	})
	return c.closeErr
}

// Drops returns how many datagrams for this socket the kernel dropped
// before they were read: its receive buffer was full (the reader fell
// behind), or a datagram failed its UDP checksum (sk_drops, read with
// SO_MEMINFO; a 32-bit counter in the kernel). It is for scrapes, not for
// the data path, and fails once the socket is closed.
func (c *Conn) Drops() (uint64, error) {
	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	if c.fdClosed {
		return 0, c.errClosed("read drop count")
	}
	var info [unix.SK_MEMINFO_VARS]uint32
	size := uint32(unsafe.Sizeof(info))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(c.fd), unix.SOL_SOCKET, unix.SO_MEMINFO,
		uintptr(unsafe.Pointer(&info)), uintptr(unsafe.Pointer(&size)), 0)
	if e != 0 {
		return 0, fmt.Errorf("udp socket %s: getsockopt SO_MEMINFO: %w", c.laddr, e)
	}
	if size <= unix.SK_MEMINFO_DROPS*4 {
		return 0, fmt.Errorf("udp socket %s: SO_MEMINFO returned %d bytes, no drop count", c.laddr, size)
	}
	return uint64(info[unix.SK_MEMINFO_DROPS]), nil
}

// Interrupt wakes every ReadBatch and WriteBatch waiting on the socket
// (for data, or for room in a full send buffer) and makes them, and every
// later call, return an error satisfying errors.Is(err, net.ErrClosed),
// without closing the socket: for an owner that stops its users, waits
// for them to return, and only then calls Close (which it still must).
// Idempotent; safe to call concurrently with any method.
func (c *Conn) Interrupt() {
	c.closed.Store(true)
	c.stop.Signal()
}

// AttachReusePortFilter attaches a classic BPF program to the SO_REUSEPORT
// group of c (SO_ATTACH_REUSEPORT_CBPF): for each datagram it returns the
// index of the group's socket to deliver to (sockets are numbered in the
// order they were bound; an index beyond the group falls back to the
// kernel's hash). The program sees the datagram from its UDP payload on.
func (c *Conn) AttachReusePortFilter(prog []unix.SockFilter) error {
	if len(prog) == 0 {
		return errors.New("empty BPF program")
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	_, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(c.fd), unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF,
		uintptr(unsafe.Pointer(&fprog)), unsafe.Sizeof(fprog), 0)
	if e != 0 {
		return fmt.Errorf("udp socket %s: attach reuseport BPF program: %w", c.laddr, e)
	}
	return nil
}

// setBuffer sets a socket buffer size with the FORCE option, falling back
// to the plain one (capped by the sysctl maximum) without CAP_NET_ADMIN.
func setBuffer(fd, force, plain, size int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, force, size); err == nil {
		return nil
	}
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, plain, size)
}

// maxSegmentsForKernel returns UDP_MAX_SEGMENTS of the running kernel:
// 128 from Linux 6.9, 64 before. The kernel offers no way to ask, and a
// probe would have to send.
func maxSegmentsForKernel() int {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return 64
	}
	major, minor, ok := parseRelease(unix.ByteSliceToString(u.Release[:]))
	if ok && (major > 6 || major == 6 && minor >= 9) {
		return 128
	}
	return 64
}

// parseRelease reads "major.minor" from a kernel release such as
// "6.18.44-fc-v669".
func parseRelease(s string) (major, minor int, ok bool) {
	a, rest, found := strings.Cut(s, ".")
	if !found {
		return 0, 0, false
	}
	end := 0
	for end < len(rest) && rest[end] >= '0' && rest[end] <= '9' {
		end++
	}
	maj, err1 := strconv.Atoi(a)
	mnr, err2 := strconv.Atoi(rest[:end])
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return maj, mnr, true
}

// initBuffers preallocates every header, iovec, address and control
// buffer, and links the headers to them once.
func (c *Conn) initBuffers() {
	n := c.batch
	r := &c.r
	r.hdrs = make([]unix.Mmsghdr, n)
	r.iovs = make([]unix.Iovec, n)
	r.names = make([]sockaddr, n)
	r.ctrl = make([]byte, n*rctrlLen)
	for i := range r.hdrs {
		h := &r.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&r.names[i]))
		h.Iov = &r.iovs[i]
		h.SetIovlen(1)
		h.Control = &r.ctrl[i*rctrlLen]
	}

	w := &c.w
	w.hdrs = make([]unix.Mmsghdr, n)
	w.iovs = make([]unix.Iovec, max(2*n, 2*MaxIovecs))
	w.names = make([]sockaddr, n)
	w.ctrl = make([]byte, n*wctrlLen)
	for i := range w.hdrs {
		h := &w.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&w.names[i]))
		h.Namelen = c.nameLen
		cm := (*unix.Cmsghdr)(unsafe.Pointer(&w.ctrl[i*wctrlLen]))
		cm.Level = unix.IPPROTO_UDP
		cm.Type = unix.UDP_SEGMENT
		cm.SetLen(unix.CmsgLen(2))
	}
	w.shdrs = make([]unix.Mmsghdr, c.maxSegs)
	w.siovs = make([]unix.Iovec, splitIovecs)
	for i := range w.shdrs {
		h := &w.shdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&w.sname))
		h.Namelen = c.nameLen
	}
}

// errClosed is what calls on a closed Conn return.
func (c *Conn) errClosed(op string) error {
	return fmt.Errorf("udp %s on %s: %w", op, c.laddr, net.ErrClosed)
}

// wait blocks until the socket has events, Close was called (net.ErrClosed)
// or, for reads, the deadline passed.
func (c *Conn) wait(op string, events int16, deadline bool) error {
	var dl time.Time
	if deadline {
		if ns := c.readDeadline.Load(); ns != 0 {
			dl = time.Unix(0, ns)
		}
	}
	err := c.stop.Wait(c.fd, events, dl)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fdpoll.ErrStopped):
		return c.errClosed(op)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("udp %s on %s: %w", op, c.laddr, err)
	}
	return fmt.Errorf("udp %s on %s: %w", op, c.laddr, err)
}

// ReadBatch receives up to min(len(msgs), BatchSize()) messages, blocking
// until at least one is there, and returns how many it filled. For each:
// Buf[:N] holds the data, Addr the sender, SegSize the GRO segment size (0
// for a single datagram) and Truncated whether the datagram did not fit in
// Buf (then drop it). Give GRO conns buffers of GROBufferSize bytes.
//
// ReadBatch returns an error only when the conn is closed (errors.Is(err,
// net.ErrClosed)), the read deadline passed (os.ErrDeadlineExceeded) or the
// socket failed; errors the kernel queues on the socket from ICMP
// (ECONNREFUSED, EHOSTUNREACH, ...) are consumed and the read goes on. It
// allocates nothing.
func (c *Conn) ReadBatch(msgs []Message) (int, error) {
	return c.readBatch(msgs, true)
}

// TryReadBatch is ReadBatch without the wait: when no datagram is queued it
// returns ErrWouldBlock at once.
func (c *Conn) TryReadBatch(msgs []Message) (int, error) {
	return c.readBatch(msgs, false)
}

// Fd is the socket's file descriptor, for a caller that waits for it to be
// readable itself (ppoll, with TryReadBatch); it must stop using it before
// Close.
func (c *Conn) Fd() int { return c.fd }

func (c *Conn) readBatch(msgs []Message, wait bool) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	r := &c.r
	n := min(len(msgs), c.batch)
	if n == 0 {
		return 0, nil
	}
	ctrlLen := 0
	if c.gro {
		ctrlLen = rctrlLen
	}
	for i := 0; i < n; i++ {
		r.iovs[i].Base = unsafe.SliceData(msgs[i].Buf)
		r.iovs[i].SetLen(len(msgs[i].Buf))
	}
	var got int
	for {
		if c.closed.Load() {
			return 0, c.errClosed("receive batch")
		}
		for i := 0; i < n; i++ {
			h := &r.hdrs[i].Hdr
			h.Namelen = c.nameLen
			h.SetControllen(ctrlLen)
			h.Flags = 0
			r.hdrs[i].Len = 0
		}
		m, _, e := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(c.fd), uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(n), 0, 0, 0)
		if e == 0 {
			got = int(m)
			break
		}
		switch e {
		case unix.EAGAIN:
			if !wait {
				return 0, ErrWouldBlock
			}
			if err := c.wait("receive batch", unix.POLLIN, true); err != nil {
				return 0, err
			}
		case unix.EINTR:
		case unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EHOSTDOWN,
			unix.ENETDOWN, unix.EPROTO, unix.EMSGSIZE, unix.ENOPROTOOPT, unix.ETIMEDOUT:
			// An ICMP error from an earlier send, reported once: not ours to stop on.
		case unix.EBADF:
			return 0, c.errClosed("receive batch")
		default:
			return 0, fmt.Errorf("udp receive batch on %s: recvmmsg: %w", c.laddr, e)
		}
	}
	for i := 0; i < got; i++ {
		m := &msgs[i]
		h := &r.hdrs[i]
		m.N = int(h.Len)
		m.Truncated = h.Hdr.Flags&unix.MSG_TRUNC != 0
		if m.N > len(m.Buf) { // only if MSG_TRUNC were passed as a flag; keep Buf[:N] valid
			m.N = len(m.Buf)
		}
		m.Addr = addrPort(&r.names[i])
		m.SegSize = 0
		if ctrlLen > 0 && h.Hdr.Controllen > 0 {
			m.SegSize = groSegmentSize(r.ctrl[i*rctrlLen : i*rctrlLen+int(h.Hdr.Controllen)])
		}
		m.Err = 0
	}
	return got, nil
}

// addrPort reads a sockaddr_in or sockaddr_in6.
func addrPort(sa *sockaddr) netip.AddrPort {
	if sa.Family == unix.AF_INET6 {
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
	}
	sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
	p := (*[2]byte)(unsafe.Pointer(&sa4.Port))
	return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), uint16(p[0])<<8|uint16(p[1]))
}

// putAddrPort writes ap into sa as the Conn's family takes it; false if
// ap is not of that family (an IPv4-mapped address is IPv4).
func (c *Conn) putAddrPort(sa *sockaddr, ap netip.AddrPort) bool {
	a := ap.Addr()
	if c.v6 {
		if !a.Is6() || a.Is4In6() {
			return false
		}
		sa.Family = unix.AF_INET6
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		p[0], p[1] = byte(ap.Port()>>8), byte(ap.Port())
		sa.Flowinfo, sa.Scope_id = 0, 0
		sa.Addr = a.As16()
		return true
	}
	a = a.Unmap()
	if !a.Is4() {
		return false
	}
	sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
	sa4.Family = unix.AF_INET
	p := (*[2]byte)(unsafe.Pointer(&sa4.Port))
	p[0], p[1] = byte(ap.Port()>>8), byte(ap.Port())
	sa4.Addr = a.As4()
	return true
}

// groSegmentSize finds the UDP_GRO cmsg in a control buffer; 0 if absent.
func groSegmentSize(b []byte) int {
	for len(b) >= cmsgDataOff {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
		l := int(h.Len)
		if l < cmsgDataOff || l > len(b) {
			return 0
		}
		if h.Level == unix.IPPROTO_UDP && h.Type == unix.UDP_GRO && l >= cmsgDataOff+4 {
			return int(binary.NativeEndian.Uint32(b[cmsgDataOff:]))
		}
		next := unix.CmsgSpace(l - cmsgDataOff)
		if next > len(b) {
			return 0
		}
		b = b[next:]
	}
	return 0
}

// WriteBatch sends every message of msgs (in chunks of at most
// BatchSize()) and returns how many it processed: len(msgs) unless the
// error is fatal. A message with SegSize > 0 and more than SegSize bytes
// goes out as one GSO send (UDP_SEGMENT) where GSO is on, else one datagram
// per segment; keep it within MaxSegments() segments and MaxMessageBytes.
// Each message's outcome is in msgs[i].Err; a failing message does not
// stop the batch. If the kernel refuses a GSO send with EIO (no GSO on the
// route), GSO is turned off for this conn (logged once) and the message is
// resent one datagram per segment; with EINVAL or EMSGSIZE (a segment above
// the path MTU, too many segments, too many bytes) only that message is
// resent so. Stats().SplitSends counts such resends.
//
// WriteBatch returns an error only when the conn is closed (errors.Is(err,
// net.ErrClosed)) or the socket failed. It allocates nothing.
func (c *Conn) WriteBatch(msgs []Message) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	done := 0
	for done < len(msgs) {
		if c.closed.Load() {
			return done, c.errClosed("send batch")
		}
		n, err := c.writeChunk(msgs[done:])
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// msgLen is the payload length of a message to write.
func msgLen(m *Message) int {
	if m.Iov == nil {
		return len(m.Buf)
	}
	n := 0
	for _, b := range m.Iov {
		n += len(b)
	}
	return n
}

// writeChunk sends the first messages of msgs, as many as one chunk holds
// (BatchSize messages, the iovec pool); c.wmu and c.closeMu are held.
func (c *Conn) writeChunk(msgs []Message) (int, error) {
	w := &c.w
	gso := c.gso.Load()
	used := 0 // iovecs of the pool taken
	k := 0
	for ; k < len(msgs) && k < c.batch; k++ {
		m := &msgs[k]
		m.Err = 0
		pieces := 1
		if m.Iov != nil {
			pieces = len(m.Iov)
		}
		if pieces > MaxIovecs || pieces == 0 {
			m.Err = unix.EMSGSIZE
			continue
		}
		if used+pieces > len(w.iovs) {
			break // next chunk
		}
		if !c.putAddrPort(&w.names[k], m.Addr) {
			m.Err = unix.EAFNOSUPPORT
			continue
		}
		if m.SegSize < 0 || m.SegSize > 0xffff {
			m.Err = unix.EINVAL
			continue
		}
		h := &w.hdrs[k].Hdr
		if m.Iov == nil {
			w.iovs[used].Base = unsafe.SliceData(m.Buf)
			w.iovs[used].SetLen(len(m.Buf))
		} else {
			for j, b := range m.Iov {
				w.iovs[used+j].Base = unsafe.SliceData(b)
				w.iovs[used+j].SetLen(len(b))
			}
		}
		h.Iov = &w.iovs[used]
		h.SetIovlen(pieces)
		used += pieces
		if gso && segmented(m) {
			ctrl := w.ctrl[k*wctrlLen : (k+1)*wctrlLen]
			binary.NativeEndian.PutUint16(ctrl[cmsgDataOff:], uint16(m.SegSize))
			h.Control = &ctrl[0]
			h.SetControllen(wctrlLen)
		} else {
			h.Control = nil
			h.SetControllen(0)
		}
	}
	w.msgs, w.next, w.seg, w.splitting, w.split, w.errno = msgs[:k], 0, 0, false, -1, 0
	err := c.send()
	done := w.next
	w.msgs = nil
	if err != nil {
		return done, err
	}
	if w.errno != 0 {
		return done, fmt.Errorf("udp send batch on %s: sendmmsg: %w", c.laddr, w.errno)
	}
	return k, nil
}

// send runs doWrite, waiting for writability when the socket buffer is
// full (Close or Interrupt ends the wait).
func (c *Conn) send() error {
	for !c.doWrite(uintptr(c.fd)) {
		c.sendWaits.Add(1)
		if err := c.wait("send batch", unix.POLLOUT, false); err != nil {
			return err
		}
	}
	return nil
}

// segmented reports whether m is more than one GSO segment.
func segmented(m *Message) bool { return m.SegSize > 0 && msgLen(m) > m.SegSize }

// mustSplit reports whether message i goes out one datagram per segment.
func (c *Conn) mustSplit(i int) bool {
	m := &c.w.msgs[i]
	return segmented(m) && (!c.gso.Load() || c.w.split == i)
}

// fatalSendErrno: the socket itself is unusable (or our buffers are bad).
func fatalSendErrno(e syscall.Errno) bool {
	return e == unix.EBADF || e == unix.ENOTSOCK || e == unix.EFAULT
}

// sendmmsg sends n messages starting at hdrs. A variable so that tests can
// inject the EIO this kernel no longer produces (it segments GSO in
// software where older kernels refused a route without checksum offload).
var sendmmsg = func(fd uintptr, hdrs *unix.Mmsghdr, n int) (int, syscall.Errno) {
	sent, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(hdrs)), uintptr(n), 0, 0, 0)
	return int(sent), e
}

// doWrite sends w.msgs from w.next (and w.seg) on. It returns false when
// the socket buffer is full: wait until writable and call it again.
func (c *Conn) doWrite(fd uintptr) bool {
	w := &c.w
	for w.next < len(w.msgs) {
		i := w.next
		m := &w.msgs[i]
		if m.Err != 0 { // refused before sending (bad address)
			w.next++
			continue
		}
		if c.mustSplit(i) {
			if !c.sendSplit(fd, m) {
				return false
			}
			if w.errno != 0 {
				return true
			}
			w.next++
			w.seg, w.splitting = 0, false
			continue
		}
		end := i + 1
		for end < len(w.msgs) && w.msgs[end].Err == 0 && !c.mustSplit(end) {
			end++
		}
		sent, e := sendmmsg(fd, &w.hdrs[i], end-i)
		switch {
		case e == 0:
			w.next += sent
		case e == unix.EAGAIN:
			return false
		case e == unix.EINTR:
		case fatalSendErrno(e):
			w.errno = e
			return true
		case e == unix.EIO && w.hdrs[i].Hdr.Controllen != 0:
			if c.gso.CompareAndSwap(true, false) {
				c.logger.Warn("UDP GSO refused by the kernel (EIO); sending one datagram per segment from now on",
					"addr", c.laddr, "peer", m.Addr)
			}
		case (e == unix.EINVAL || e == unix.EMSGSIZE) && w.hdrs[i].Hdr.Controllen != 0 && w.split != i:
			w.split = i
		default:
			m.Err = e
			w.next++
		}
	}
	return true
}

// pieceCursor walks the payload of a message piece by piece.
type pieceCursor struct {
	m   *Message
	idx int // current piece
	off int // offset in it
}

func (p *pieceCursor) piece(i int) []byte {
	if p.m.Iov == nil {
		return p.m.Buf
	}
	return p.m.Iov[i]
}

func (p *pieceCursor) pieces() int {
	if p.m.Iov == nil {
		return 1
	}
	return len(p.m.Iov)
}

// seek positions the cursor at byte off of the payload.
func (p *pieceCursor) seek(off int) {
	p.idx, p.off = 0, 0
	for p.idx < p.pieces() && off >= len(p.piece(p.idx)) {
		off -= len(p.piece(p.idx))
		p.idx++
	}
	p.off = off
}

// take fills iovs with the next n bytes (fewer at the end of the payload)
// and returns how many iovecs it used, 0 if they do not fit in iovs.
func (p *pieceCursor) take(n int, iovs []unix.Iovec) int {
	k := 0
	for n > 0 && p.idx < p.pieces() {
		b := p.piece(p.idx)[p.off:]
		if len(b) == 0 {
			p.idx, p.off = p.idx+1, 0
			continue
		}
		if k == len(iovs) {
			return 0
		}
		l := min(n, len(b))
		iovs[k].Base = &b[0]
		iovs[k].SetLen(l)
		k++
		n -= l
		p.off += l
		if p.off == len(p.piece(p.idx)) {
			p.idx, p.off = p.idx+1, 0
		}
	}
	return k
}

// sendSplit sends m one datagram per segment, from byte w.seg on. It
// returns false to wait for writability (w.seg keeps the progress). The
// first per-datagram error is kept in m.Err and the rest still go out.
func (c *Conn) sendSplit(fd uintptr, m *Message) bool {
	w := &c.w
	if !w.splitting {
		w.splitting = true
		c.splitSends.Add(1)
		c.putAddrPort(&w.sname, m.Addr)
	}
	seg := m.SegSize
	total := msgLen(m)
	cur := pieceCursor{m: m}
	for w.seg < total {
		cur.seek(w.seg)
		k, used := 0, 0
		for off := w.seg; off < total && k < len(w.shdrs); off += seg {
			n := cur.take(min(seg, total-off), w.siovs[used:])
			if n == 0 {
				break
			}
			h := &w.shdrs[k].Hdr
			h.Iov = &w.siovs[used]
			h.SetIovlen(n)
			used += n
			k++
		}
		if k == 0 { // one segment of more pieces than the pool: refuse it
			if m.Err == 0 {
				m.Err = unix.EMSGSIZE
			}
			w.seg += seg
			continue
		}
		sent, e := sendmmsg(fd, &w.shdrs[0], k)
		switch {
		case e == 0:
			w.seg += sent * seg
		case e == unix.EAGAIN:
			return false
		case e == unix.EINTR:
		case fatalSendErrno(e):
			w.errno = e
			return true
		default:
			if m.Err == 0 {
				m.Err = e
			}
			w.seg += seg
		}
	}
	return true
}
