//go:build linux

package tundev_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend/internal/fdpoll"
	"github.com/tulle-net/tulle/backend/tundev"
)

// writeSysctl writes /proc/sys/<key> in the calling thread's namespace.
func writeSysctl(t testing.TB, key, value string) {
	t.Helper()
	if err := os.WriteFile("/proc/sys/"+key, []byte(value), 0o644); err != nil {
		t.Fatalf("sysctl %s=%s: %v", key, value, err)
	}
}

var (
	tunAddr  = netip.MustParseAddr("198.18.0.1") // on the TUN
	peerAddr = netip.MustParseAddr("198.18.0.2") // "behind" the TUN
	farAddr  = netip.MustParseAddr("198.18.0.3") // also behind it (forwarding tests)

	tunAddr6  = netip.MustParseAddr("2001:db8:7::1") // on the TUN (addIPv6)
	peerAddr6 = netip.MustParseAddr("2001:db8:7::2") // "behind" the TUN
)

// addIPv6 turns IPv6 on for the device (nstest turns it off on new
// links), without a link-local address, and gives it 2001:db8:7::1/64 (no
// duplicate address detection, usable at once).
func addIPv6(t testing.TB, dev *tundev.Device) {
	t.Helper()
	link, err := netlink.LinkByName(dev.Name())
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetIP6AddrGenMode(link, 1); err != nil { // IN6_ADDR_GEN_MODE_NONE
		t.Fatal(err)
	}
	writeSysctl(t, "net/ipv6/conf/"+dev.Name()+"/disable_ipv6", "0")
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: tunAddr6.AsSlice(), Mask: net.CIDRMask(64, 128)}, Flags: unix.IFA_F_NODAD}
	if err := netlink.AddrAdd(link, addr); err != nil {
		t.Fatalf("add %v to %s: %v", tunAddr6, dev.Name(), err)
	}
	// The kernel adds the address's local route from a work queue, after
	// AddrAdd returns: until then packets to it are not delivered.
	deadline := time.Now().Add(5 * time.Second)
	for {
		routes, err := netlink.RouteGet(tunAddr6.AsSlice())
		if err == nil && len(routes) > 0 && routes[0].Type == unix.RTN_LOCAL {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v on %s is not a local address after 5 s: %v %v", tunAddr6, dev.Name(), routes, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// openTUN opens a device in the test's namespace with address
// 198.18.0.1/24 and link up; it is closed in Cleanup.
func openTUN(t testing.TB, opts tundev.Options) *tundev.Device {
	t.Helper()
	if opts.Name == "" {
		opts.Name = fmt.Sprintf("tl%dt", os.Getpid()%100000)
	}
	if opts.MTU == 0 {
		opts.MTU = 1400
	}
	dev, err := tundev.Open(opts)
	if err != nil {
		t.Fatalf("Open(%+v): %v", opts, err)
	}
	t.Cleanup(func() { dev.Close() })
	link, err := netlink.LinkByName(dev.Name())
	if err != nil {
		t.Fatal(err)
	}
	if link.Attrs().MTU != opts.MTU {
		t.Fatalf("device MTU %d, want %d", link.Attrs().MTU, opts.MTU)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: tunAddr.AsSlice(), Mask: net.CIDRMask(24, 32)}}
	if err := netlink.AddrAdd(link, addr); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	return dev
}

// rxPackets returns the device's receive counter (packets written to it
// by us, as the kernel counts them: one per skb).
func rxPackets(t *testing.T, dev *tundev.Device) uint64 {
	t.Helper()
	link, err := netlink.LinkByName(dev.Name())
	if err != nil {
		t.Fatal(err)
	}
	return link.Attrs().Statistics.RxPackets
}

// packet is a copy of one packet read from a queue.
type packet struct {
	queue     int
	batch     int // packets cut from the read that returned this one
	data      []byte
	readError error
}

// reader reads a queue as the data plane's TX loop does: one ReadPacket
// into one buffer, a superpacket cut by Split. Here each segment is
// assembled into a buffer of the caller's with a complete checksum, as
// the peer receives it (the TX loop gathers the same headers and payload
// slices into a GSO send instead).
type reader struct {
	q     tundev.Queue
	buf   []byte
	split tundev.Split
}

func newReader(q tundev.Queue) *reader {
	return &reader{q: q, buf: make([]byte, tundev.ReadBufferSize)}
}

var errTooFewBuffers = errors.New("superpacket has more segments than buffers given")

// read waits for one read and puts the packets it holds into out[i][:sizes[i]],
// every out[i] at least MTU bytes. It allocates nothing.
func (r *reader) read(out [][]byte, sizes []int) (int, error) {
	n, err := r.q.ReadPacket(r.buf, true)
	if err != nil {
		return 0, err
	}
	if !r.q.VirtioHeader() {
		sizes[0] = copy(out[0], r.buf[:n])
		return 1, nil
	}
	h := tundev.DecodeVirtioHdr(r.buf)
	pkt := r.buf[tundev.VirtioHdrLen:n]
	if h.GSOType == tundev.GSONone {
		if h.Flags&tundev.VirtioNeedsCsum != 0 {
			if err := tundev.CompleteChecksum(pkt, int(h.CsumStart), int(h.CsumOffset)); err != nil {
				return 0, err
			}
		}
		sizes[0] = copy(out[0], pkt)
		return 1, nil
	}
	s := &r.split
	if err := s.Init(h, pkt); err != nil {
		return 0, err
	}
	if s.Segments() > len(out) {
		return 0, errTooFewBuffers
	}
	for i := range s.Segments() {
		payload := s.Segment(i, out[i], false)
		sizes[i] = s.HeaderLen() + copy(out[i][s.HeaderLen():], payload)
	}
	return s.Segments(), nil
}

// writer writes packets to a queue as the data plane's RX loop does: with
// a virtio header through a Coalescer, which merges the segments of a
// flow into one WritePacket, else one WritePacket per packet. It allocates
// nothing.
type writer struct {
	q   tundev.Queue
	co  *tundev.Coalescer
	one [1][]byte
}

func newWriter(dev *tundev.Device, q tundev.Queue) *writer {
	return &writer{q: q, co: tundev.NewCoalescer(dev.UDPOffload())}
}

// write writes pkts (bare IPv4 packets with complete checksums, the
// caller's buffers: a coalesced group's first packet gets its headers
// patched in place).
func (w *writer) write(pkts ...[]byte) error {
	for _, p := range pkts {
		if !w.q.VirtioHeader() {
			w.one[0] = p
			err := w.q.WritePacket(w.one[:])
			w.one[0] = nil
			if err != nil {
				return err
			}
			continue
		}
		if w.co.Add(p, false) {
			continue
		}
		if err := w.flush(); err != nil {
			return err
		}
		w.co.Add(p, false)
	}
	return w.flush()
}

func (w *writer) flush() error {
	if !w.co.Pending() {
		return nil
	}
	err := w.q.WritePacket(w.co.Group())
	w.co.Reset()
	return err
}

// startReaders reads every queue of dev in its own goroutine and delivers
// copies of the packets; the goroutines end when dev is closed and
// Cleanup waits for them.
func startReaders(t *testing.T, dev *tundev.Device) <-chan packet {
	t.Helper()
	out := make(chan packet, 4096)
	var wg sync.WaitGroup
	for qi, q := range dev.Queues() {
		wg.Go(func() {
			r := newReader(q)
			bufs, sizes := makeBufs(128, dev.MTU())
			for {
				n, err := r.read(bufs, sizes)
				if err != nil {
					if !errors.Is(err, os.ErrClosed) {
						out <- packet{queue: qi, readError: err}
					}
					return
				}
				for i := range n {
					out <- packet{queue: qi, batch: n, data: append([]byte(nil), bufs[i][:sizes[i]]...)}
				}
			}
		})
	}
	t.Cleanup(func() {
		dev.Close()
		wg.Wait()
	})
	return out
}

// readersBlocked starts one ReadPacket per queue of dev on its own thread
// and returns, once every one of them is blocked waiting for a packet, the
// channel their errors arrive on.
func readersBlocked(t *testing.T, dev *tundev.Device) <-chan error {
	t.Helper()
	before, err := fdpoll.Waiting()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, len(dev.Queues()))
	for _, q := range dev.Queues() {
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			buf := make([]byte, tundev.ReadBufferSize)
			for {
				if _, err := q.ReadPacket(buf, true); err != nil {
					done <- err
					return
				}
			}
		}()
	}
	if err := fdpoll.AwaitWaiting(before+len(dev.Queues()), 5*time.Second); err != nil {
		t.Fatalf("readers of %s not blocked: %v", dev.Name(), err)
	}
	return done
}

func makeBufs(n, size int) ([][]byte, []int) {
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = make([]byte, size)
	}
	return bufs, make([]int, n)
}

// ---- packet building and checking (IPv4 and IPv6, the family of the
// addresses given) ----

func checksum(b []byte, sum uint32) uint16 {
	for len(b) >= 2 {
		sum += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// pseudoSum is the IPv4 or IPv6 pseudo-header sum (the family of src).
func pseudoSum(src, dst netip.Addr, proto byte, length int) uint32 {
	var sum uint32
	for _, a := range []netip.Addr{src, dst} {
		b := a.AsSlice()
		for i := 0; i < len(b); i += 2 {
			sum += uint32(b[i])<<8 | uint32(b[i+1])
		}
	}
	return sum + uint32(proto) + uint32(length)
}

// ipHeaderLen is the header length of packets from src: 20 or 40.
func ipHeaderLen(src netip.Addr) int {
	if src.Is6() {
		return 40
	}
	return 20
}

// putIP writes a 20-byte IPv4 header (DF set) or a 40-byte IPv6 header
// (no extension headers, flow label 0x12345) for a packet of total bytes.
func putIP(b []byte, src, dst netip.Addr, proto byte, total int, id uint16, ttl byte) {
	if src.Is6() {
		binary.BigEndian.PutUint32(b[0:], 6<<28|0x12345)
		binary.BigEndian.PutUint16(b[4:], uint16(total-40))
		b[6], b[7] = proto, ttl
		s, d := src.As16(), dst.As16()
		copy(b[8:24], s[:])
		copy(b[24:40], d[:])
		return
	}
	b[0], b[1] = 0x45, 0
	binary.BigEndian.PutUint16(b[2:], uint16(total))
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], 0x4000)
	b[8], b[9] = ttl, proto
	b[10], b[11] = 0, 0
	s, d := src.As4(), dst.As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	binary.BigEndian.PutUint16(b[10:], checksum(b[:20], 0))
}

// buildUDP writes an IPv4/UDP or IPv6/UDP packet into buf[offset:] and
// returns buf[:offset+len(packet)] (capacity kept).
func buildUDP(buf []byte, offset int, src, dst netip.AddrPort, payload []byte, id uint16) []byte {
	ihl := ipHeaderLen(src.Addr())
	total := ihl + 8 + len(payload)
	p := buf[offset : offset+total]
	putIP(p, src.Addr(), dst.Addr(), 17, total, id, 64)
	u := p[ihl:]
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	u[6], u[7] = 0, 0
	copy(u[8:], payload)
	c := checksum(u, pseudoSum(src.Addr(), dst.Addr(), 17, len(u)))
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], c)
	return buf[:offset+total]
}

const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpPSH = 0x08
	tcpACK = 0x10
)

// buildTCP writes an IPv4/TCP or IPv6/TCP packet (20-byte TCP header plus
// options) into buf[offset:] and returns buf[:offset+len(packet)].
func buildTCP(buf []byte, offset int, src, dst netip.AddrPort, seq, ack uint32, flags byte, opts, payload []byte) []byte {
	ihl := ipHeaderLen(src.Addr())
	thl := 20 + len(opts)
	total := ihl + thl + len(payload)
	p := buf[offset : offset+total]
	putIP(p, src.Addr(), dst.Addr(), 6, total, 0, 64)
	h := p[ihl:]
	binary.BigEndian.PutUint16(h[0:], src.Port())
	binary.BigEndian.PutUint16(h[2:], dst.Port())
	binary.BigEndian.PutUint32(h[4:], seq)
	binary.BigEndian.PutUint32(h[8:], ack)
	h[12] = byte(thl/4) << 4
	h[13] = flags
	binary.BigEndian.PutUint16(h[14:], 65535)
	h[16], h[17], h[18], h[19] = 0, 0, 0, 0
	copy(h[20:], opts)
	copy(h[thl:], payload)
	binary.BigEndian.PutUint16(h[16:], checksum(h, pseudoSum(src.Addr(), dst.Addr(), 6, len(h))))
	return buf[:offset+total]
}

// ipPacket is a parsed, checked IPv4 or IPv6 packet with a TCP or UDP
// payload.
type ipPacket struct {
	src, dst       netip.AddrPort
	proto          byte
	ttl            byte   // or hop limit
	seq, ack       uint32 // TCP
	flags          byte   // TCP
	payload        []byte // transport payload
	transportBytes []byte
}

// parseIP parses p, an IPv4 packet or an IPv6 one without extension
// headers, and verifies its header and transport checksums.
func parseIP(p []byte) (ipPacket, error) {
	var r ipPacket
	var src, dst netip.Addr
	var t []byte
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		ihl := int(p[0]&0xf) * 4
		if total := int(binary.BigEndian.Uint16(p[2:])); total != len(p) {
			return r, fmt.Errorf("IPv4 total length %d, packet %d bytes", total, len(p))
		}
		if checksum(p[:ihl], 0) != 0 {
			return r, errors.New("bad IPv4 header checksum")
		}
		src = netip.AddrFrom4([4]byte(p[12:16]))
		dst = netip.AddrFrom4([4]byte(p[16:20]))
		r.proto, r.ttl = p[9], p[8]
		t = p[ihl:]
	case len(p) >= 40 && p[0]>>4 == 6:
		if total := 40 + int(binary.BigEndian.Uint16(p[4:])); total != len(p) {
			return r, fmt.Errorf("IPv6 length %d, packet %d bytes", total, len(p))
		}
		src = netip.AddrFrom16([16]byte(p[8:24]))
		dst = netip.AddrFrom16([16]byte(p[24:40]))
		r.proto, r.ttl = p[6], p[7]
		t = p[40:]
	default:
		return r, fmt.Errorf("neither IPv4 nor IPv6 (%d bytes)", len(p))
	}
	r.transportBytes = t
	if checksum(t, pseudoSum(src, dst, r.proto, len(t))) != 0 {
		return r, fmt.Errorf("bad transport checksum (protocol %d)", r.proto)
	}
	switch r.proto {
	case 17:
		if len(t) < 8 || int(binary.BigEndian.Uint16(t[4:])) != len(t) {
			return r, errors.New("bad UDP length")
		}
		if t[6] == 0 && t[7] == 0 && src.Is6() {
			return r, errors.New("IPv6 UDP without checksum")
		}
		r.payload = t[8:]
	case 6:
		if len(t) < 20 {
			return r, errors.New("short TCP header")
		}
		r.seq = binary.BigEndian.Uint32(t[4:])
		r.ack = binary.BigEndian.Uint32(t[8:])
		r.flags = t[13]
		r.payload = t[int(t[12]>>4)*4:]
	default:
		return r, fmt.Errorf("protocol %d", r.proto)
	}
	r.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(t[0:]))
	r.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(t[2:]))
	return r, nil
}
