//go:build linux

package udpconn_test

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend/internal/fdpoll"
	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/tests/nstest"
)

var loopback = netip.MustParseAddrPort("127.0.0.1:0")

var loopback6 = netip.MustParseAddrPort("[::1]:0")

func listen(t testing.TB, opts udpconn.Options) *udpconn.Conn {
	t.Helper()
	return listenOn(t, loopback, opts)
}

func listenOn(t testing.TB, addr netip.AddrPort, opts udpconn.Options) *udpconn.Conn {
	t.Helper()
	c, err := udpconn.Listen(addr, opts)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// datagram is one received datagram (GRO batches split at SegSize).
type datagram struct {
	from netip.AddrPort
	data []byte
}

// readDatagrams reads until want datagrams arrived (GRO batches count as
// their segments) or 5 s passed.
func readDatagrams(t *testing.T, c *udpconn.Conn, want, bufSize int) []datagram {
	t.Helper()
	msgs := make([]udpconn.Message, 16)
	for i := range msgs {
		msgs[i].Buf = make([]byte, bufSize)
	}
	if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	defer c.SetReadDeadline(time.Time{})
	var got []datagram
	for len(got) < want {
		n, err := c.ReadBatch(msgs)
		if err != nil {
			t.Fatalf("ReadBatch after %d of %d datagrams: %v", len(got), want, err)
		}
		for _, m := range msgs[:n] {
			if m.Truncated {
				t.Fatalf("unexpected truncated message of %d bytes", m.N)
			}
			data := m.Buf[:m.N]
			seg := m.SegSize
			if seg == 0 {
				seg = len(data)
			}
			for len(data) > 0 {
				k := min(seg, len(data))
				got = append(got, datagram{from: m.Addr, data: bytes.Clone(data[:k])})
				data = data[k:]
			}
		}
	}
	return got
}

// payload returns n bytes that identify (id, position).
func payload(id byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = id + byte(i*7)
	}
	return b
}

func TestBatchRoundTripOnLoopback(t *testing.T) {
	a := listen(t, udpconn.Options{})
	b := listen(t, udpconn.Options{DisableGRO: true})
	msgs := make([]udpconn.Message, 32)
	for i := range msgs {
		msgs[i] = udpconn.Message{Buf: payload(byte(i), 100+i), Addr: b.LocalAddr()}
	}
	n, err := a.WriteBatch(msgs)
	if err != nil || n != len(msgs) {
		t.Fatalf("WriteBatch = %d, %v; want %d, nil", n, err, len(msgs))
	}
	for i, m := range msgs {
		if m.Err != 0 {
			t.Errorf("message %d: Err %v", i, m.Err)
		}
	}
	got := readDatagrams(t, b, len(msgs), 2048)
	for i, d := range got {
		if d.from != a.LocalAddr() {
			t.Errorf("datagram %d from %v, want %v", i, d.from, a.LocalAddr())
		}
		if !bytes.Equal(d.data, msgs[i].Buf) {
			t.Errorf("datagram %d: %d bytes, differs from the %d sent", i, len(d.data), len(msgs[i].Buf))
		}
	}
}

// gsoPayload is 10 segments of 1000 bytes and a last one of 500.
const gsoSeg, gsoLen = 1000, 10*1000 + 500

func TestGSOSendArrivesAsDatagramsAtPlainSocket(t *testing.T) {
	a := listen(t, udpconn.Options{})
	if !a.GSO() {
		nstest.SkipMissing(t, "kernel has no UDP GSO")
	}
	plain, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(loopback))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	data := payload(1, gsoLen)
	msgs := []udpconn.Message{{Buf: data, SegSize: gsoSeg, Addr: plain.LocalAddr().(*net.UDPAddr).AddrPort()}}
	if n, err := a.WriteBatch(msgs); n != 1 || err != nil || msgs[0].Err != 0 {
		t.Fatalf("WriteBatch = %d, %v, Err %v", n, err, msgs[0].Err)
	}
	plain.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65536)
	for off := 0; off < len(data); off += gsoSeg {
		n, from, err := plain.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("read datagram at offset %d: %v", off, err)
		}
		want := data[off:min(off+gsoSeg, len(data))]
		if !bytes.Equal(buf[:n], want) {
			t.Fatalf("datagram at offset %d: %d bytes, want %d", off, n, len(want))
		}
		if from != a.LocalAddr() {
			t.Fatalf("from %v, want %v", from, a.LocalAddr())
		}
	}
	if a.Stats().SplitSends != 0 {
		t.Errorf("SplitSends = %d, want 0 (sent as one GSO message)", a.Stats().SplitSends)
	}
}

func TestGSOSendArrivesAsOneGROMessage(t *testing.T) {
	a := listen(t, udpconn.Options{})
	b := listen(t, udpconn.Options{})
	if !a.GSO() || !b.GRO() {
		nstest.SkipMissing(t, fmt.Sprintf("kernel lacks UDP GSO (%v) or GRO (%v)", a.GSO(), b.GRO()))
	}
	data := payload(2, gsoLen)
	msgs := []udpconn.Message{{Buf: data, SegSize: gsoSeg, Addr: b.LocalAddr()}}
	if n, err := a.WriteBatch(msgs); n != 1 || err != nil || msgs[0].Err != 0 {
		t.Fatalf("WriteBatch = %d, %v, Err %v", n, err, msgs[0].Err)
	}
	in := []udpconn.Message{{Buf: make([]byte, udpconn.GROBufferSize)}}
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := b.ReadBatch(in)
	if err != nil || n != 1 {
		t.Fatalf("ReadBatch = %d, %v", n, err)
	}
	m := in[0]
	if m.N != len(data) || m.SegSize != gsoSeg || m.Truncated || m.Addr != a.LocalAddr() {
		t.Fatalf("got N=%d SegSize=%d Truncated=%v from %v; want N=%d SegSize=%d from %v",
			m.N, m.SegSize, m.Truncated, m.Addr, len(data), gsoSeg, a.LocalAddr())
	}
	if !bytes.Equal(m.Buf[:m.N], data) {
		t.Fatal("GRO payload differs from what was sent")
	}
}

func TestOversizeDatagramIsReportedTruncated(t *testing.T) {
	b := listen(t, udpconn.Options{DisableGRO: true})
	plain, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(loopback))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	to := net.UDPAddrFromAddrPort(b.LocalAddr())
	if _, err := plain.WriteToUDP(payload(3, 2000), to); err != nil {
		t.Fatal(err)
	}
	if _, err := plain.WriteToUDP(payload(4, 100), to); err != nil {
		t.Fatal(err)
	}
	msgs := []udpconn.Message{{Buf: make([]byte, 1000)}, {Buf: make([]byte, 1000)}}
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := 0
	for got < 2 {
		n, err := b.ReadBatch(msgs[got:])
		if err != nil {
			t.Fatal(err)
		}
		got += n
	}
	if !msgs[0].Truncated || msgs[0].N != 1000 {
		t.Errorf("2000-byte datagram into 1000 bytes: Truncated=%v N=%d; want true, 1000", msgs[0].Truncated, msgs[0].N)
	}
	if msgs[1].Truncated || msgs[1].N != 100 {
		t.Errorf("100-byte datagram: Truncated=%v N=%d; want false, 100", msgs[1].Truncated, msgs[1].N)
	}
}

func TestPerMessageErrorDoesNotStopBatch(t *testing.T) {
	a := listen(t, udpconn.Options{})
	b := listen(t, udpconn.Options{DisableGRO: true})
	msgs := []udpconn.Message{
		{Buf: payload(5, 100), Addr: b.LocalAddr()},
		{Buf: make([]byte, 70000), Addr: b.LocalAddr()}, // larger than any UDP datagram
		{Buf: payload(6, 100), Addr: netip.MustParseAddrPort("[2001:db8::1]:8285")},
		{Buf: payload(7, 200), Addr: b.LocalAddr()},
	}
	n, err := a.WriteBatch(msgs)
	if err != nil || n != len(msgs) {
		t.Fatalf("WriteBatch = %d, %v; want %d, nil", n, err, len(msgs))
	}
	want := []syscall.Errno{0, syscall.EMSGSIZE, syscall.EAFNOSUPPORT, 0}
	for i, m := range msgs {
		if m.Err != want[i] {
			t.Errorf("message %d: Err = %v (%d), want %v", i, m.Err, m.Err, want[i])
		}
	}
	got := readDatagrams(t, b, 2, 2048)
	if !bytes.Equal(got[0].data, msgs[0].Buf) || !bytes.Equal(got[1].data, msgs[3].Buf) {
		t.Errorf("received %d and %d bytes, want the first and last message", len(got[0].data), len(got[1].data))
	}
}

func TestGSOMessageAboveMaxSegmentsIsSentSegmentBySegment(t *testing.T) {
	a := listen(t, udpconn.Options{})
	b := listen(t, udpconn.Options{DisableGRO: true})
	if !a.GSO() {
		nstest.SkipMissing(t, "kernel has no UDP GSO")
	}
	const seg = 100
	// Exactly MaxSegments goes out as one GSO send: this proves the limit
	// claimed for this kernel.
	full := payload(8, a.MaxSegments()*seg)
	msgs := []udpconn.Message{{Buf: full, SegSize: seg, Addr: b.LocalAddr()}}
	if _, err := a.WriteBatch(msgs); err != nil || msgs[0].Err != 0 {
		t.Fatalf("WriteBatch of %d segments: %v, Err %v", a.MaxSegments(), err, msgs[0].Err)
	}
	if s := a.Stats().SplitSends; s != 0 {
		t.Fatalf("%d segments (MaxSegments) were split (SplitSends=%d): the kernel limit is lower than claimed", a.MaxSegments(), s)
	}
	readDatagrams(t, b, a.MaxSegments(), 2048)

	over := payload(9, (a.MaxSegments()+1)*seg)
	msgs = []udpconn.Message{{Buf: over, SegSize: seg, Addr: b.LocalAddr()}}
	if _, err := a.WriteBatch(msgs); err != nil || msgs[0].Err != 0 {
		t.Fatalf("WriteBatch of %d segments: %v, Err %v", a.MaxSegments()+1, err, msgs[0].Err)
	}
	if s := a.Stats().SplitSends; s != 1 {
		t.Errorf("SplitSends = %d, want 1", s)
	}
	if !a.GSO() {
		t.Error("GSO turned off by an EINVAL; it must stay on")
	}
	got := readDatagrams(t, b, a.MaxSegments()+1, 2048)
	for i, d := range got {
		if !bytes.Equal(d.data, over[i*seg:(i+1)*seg]) {
			t.Fatalf("datagram %d differs from segment %d", i, i)
		}
	}
	t.Logf("MaxSegments() = %d on this kernel, verified by a GSO send", a.MaxSegments())
}

func TestSegmentsAreSentWithGSODisabled(t *testing.T) {
	a := listen(t, udpconn.Options{DisableGSO: true})
	b := listen(t, udpconn.Options{})
	if a.GSO() {
		t.Fatal("GSO() = true with DisableGSO")
	}
	data := payload(10, gsoLen)
	msgs := []udpconn.Message{
		{Buf: payload(11, 50), Addr: b.LocalAddr()},
		{Buf: data, SegSize: gsoSeg, Addr: b.LocalAddr()},
		{Buf: payload(12, 60), Addr: b.LocalAddr()},
	}
	if n, err := a.WriteBatch(msgs); n != 3 || err != nil {
		t.Fatalf("WriteBatch = %d, %v", n, err)
	}
	got := readDatagrams(t, b, 13, udpconn.GROBufferSize)
	var joined []byte
	for _, d := range got[1:12] {
		joined = append(joined, d.data...)
	}
	if len(got[0].data) != 50 || !bytes.Equal(joined, data) || len(got[12].data) != 60 {
		t.Fatalf("got %d datagrams in the wrong shape", len(got))
	}
}

func TestReadBatchAndWriteBatchAllocateNothing(t *testing.T) {
	t.Run("ipv4", func(t *testing.T) { testBatchesAllocateNothing(t, loopback) })
	t.Run("ipv6", func(t *testing.T) { testBatchesAllocateNothing(t, loopback6) })
}

func testBatchesAllocateNothing(t *testing.T, addr netip.AddrPort) {
	a := listenOn(t, addr, udpconn.Options{})
	b := listenOn(t, addr, udpconn.Options{})
	out := make([]udpconn.Message, 17)
	for i := range 16 {
		out[i] = udpconn.Message{Buf: payload(byte(i), 1400), Addr: b.LocalAddr()}
	}
	out[16] = udpconn.Message{Buf: payload(99, 8*1400), SegSize: 1400, Addr: b.LocalAddr()}
	const datagrams = 16 + 8
	in := make([]udpconn.Message, 32)
	for i := range in {
		in[i].Buf = make([]byte, udpconn.GROBufferSize)
	}
	var failed error
	roundTrip := func() {
		if _, err := a.WriteBatch(out); err != nil {
			failed = err
			return
		}
		for got := 0; got < datagrams; {
			n, err := b.ReadBatch(in)
			if err != nil {
				failed = err
				return
			}
			for _, m := range in[:n] {
				if m.SegSize > 0 {
					got += (m.N + m.SegSize - 1) / m.SegSize
				} else {
					got++
				}
			}
		}
	}
	roundTrip() // warm up
	allocs := testing.AllocsPerRun(200, roundTrip)
	if failed != nil {
		t.Fatal(failed)
	}
	if allocs != 0 {
		t.Fatalf("WriteBatch+ReadBatch of %d datagrams allocate %.1f times per round, want 0", datagrams, allocs)
	}
}

func TestCloseUnblocksReadBatch(t *testing.T) {
	c, err := udpconn.Listen(loopback, udpconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	before, err := fdpoll.Waiting()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		msgs := []udpconn.Message{{Buf: make([]byte, 2048)}}
		_, err := c.ReadBatch(msgs)
		done <- err
	}()
	if err := fdpoll.AwaitWaiting(before+1, 5*time.Second); err != nil {
		t.Fatalf("ReadBatch does not wait: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("ReadBatch after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadBatch still blocked 5 s after Close")
	}
	if _, err := c.WriteBatch([]udpconn.Message{{Buf: []byte{1}, Addr: loopback}}); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WriteBatch after Close: %v, want net.ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestReadDeadlineExpires(t *testing.T) {
	c := listen(t, udpconn.Options{})
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := c.ReadBatch([]udpconn.Message{{Buf: make([]byte, 100)}})
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadBatch past deadline: %v, want os.ErrDeadlineExceeded", err)
	}
}

// TestIPv6BatchesWithGSOAndGRO: an IPv6 Conn sends single datagrams and a
// GSO train, and receives the train as one GRO message, as an IPv4 one.
func TestIPv6BatchesWithGSOAndGRO(t *testing.T) {
	a := listenOn(t, loopback6, udpconn.Options{})
	b := listenOn(t, loopback6, udpconn.Options{})
	if a.LocalAddr().Addr() != netip.IPv6Loopback() || a.LocalAddr().Port() == 0 {
		t.Fatalf("LocalAddr %v", a.LocalAddr())
	}
	if !a.GSO() || !b.GRO() {
		nstest.SkipMissing(t, fmt.Sprintf("kernel lacks UDP GSO (%v) or GRO (%v) over IPv6", a.GSO(), b.GRO()))
	}
	train := payload(3, gsoLen)
	msgs := []udpconn.Message{
		{Buf: payload(1, 100), Addr: b.LocalAddr()},
		{Iov: [][]byte{train[:10], train[10:]}, SegSize: gsoSeg, Addr: b.LocalAddr()},
	}
	if n, err := a.WriteBatch(msgs); n != 2 || err != nil || msgs[0].Err != 0 || msgs[1].Err != 0 {
		t.Fatalf("WriteBatch = %d, %v, Err %v %v", n, err, msgs[0].Err, msgs[1].Err)
	}
	got := readDatagrams(t, b, 1+11, udpconn.GROBufferSize)
	if !bytes.Equal(got[0].data, msgs[0].Buf) || got[0].from != a.LocalAddr() {
		t.Fatalf("single datagram: %d bytes from %v", len(got[0].data), got[0].from)
	}
	var joined []byte
	for _, d := range got[1:] {
		joined = append(joined, d.data...)
	}
	if !bytes.Equal(joined, train) {
		t.Fatal("the GSO train arrived changed")
	}
	in := []udpconn.Message{{Buf: make([]byte, udpconn.GROBufferSize)}}
	if _, err := a.WriteBatch(msgs[1:]); err != nil {
		t.Fatal(err)
	}
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := b.ReadBatch(in); err != nil || n != 1 || in[0].SegSize != gsoSeg || in[0].N != gsoLen {
		t.Fatalf("ReadBatch = %d, %v: N %d SegSize %d, want one GRO message of %d in %d", n, err, in[0].N, in[0].SegSize, gsoLen, gsoSeg)
	}
}

// TestEachFamilyHasItsOwnSocket: an IPv6 Conn is IPv6-only (it shares a
// port with an IPv4 Conn, and IPv4 never reaches it), and a message to an
// address of the other family fails alone with EAFNOSUPPORT.
func TestEachFamilyHasItsOwnSocket(t *testing.T) {
	c4 := listenOn(t, netip.MustParseAddrPort("0.0.0.0:0"), udpconn.Options{ReusePort: true})
	port := c4.LocalAddr().Port()
	c6 := listenOn(t, netip.AddrPortFrom(netip.IPv6Unspecified(), port), udpconn.Options{ReusePort: true})
	if c6.LocalAddr() != netip.AddrPortFrom(netip.IPv6Unspecified(), port) {
		t.Fatalf("IPv6 Conn bound to %v, want [::]:%d beside 0.0.0.0:%d", c6.LocalAddr(), port, port)
	}
	to4 := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	to6 := netip.AddrPortFrom(netip.IPv6Loopback(), port)
	for _, c := range []struct {
		name string
		from *udpconn.Conn
		to   netip.AddrPort
		err  syscall.Errno
	}{
		{"IPv6 to an IPv4 address", c6, to4, unix.EAFNOSUPPORT},
		{"IPv6 to an IPv4-mapped address", c6, netip.AddrPortFrom(netip.AddrFrom16(to4.Addr().As16()), port), unix.EAFNOSUPPORT},
		{"IPv4 to an IPv6 address", c4, to6, unix.EAFNOSUPPORT},
		{"IPv4 to an IPv4-mapped address", c4, netip.AddrPortFrom(netip.AddrFrom16(to4.Addr().As16()), port), 0},
		{"IPv6 to IPv6", c6, to6, 0},
	} {
		msgs := []udpconn.Message{{Buf: []byte(c.name), Addr: c.to}}
		if _, err := c.from.WriteBatch(msgs); err != nil || msgs[0].Err != c.err {
			t.Errorf("%s: %v, Err %v, want %v", c.name, err, msgs[0].Err, c.err)
		}
	}
	got4 := readDatagrams(t, c4, 1, 2048)
	got6 := readDatagrams(t, c6, 1, 2048)
	if string(got4[0].data) != "IPv4 to an IPv4-mapped address" || string(got6[0].data) != "IPv6 to IPv6" || got6[0].from != netip.AddrPortFrom(netip.IPv6Loopback(), port) {
		t.Errorf("IPv4 socket got %q, IPv6 socket %q from %v", got4[0].data, got6[0].data, got6[0].from)
	}
}

func TestGSOMessageOfMaxMessageBytesIsOneSendAndBeyondIsSplit(t *testing.T) {
	a := listen(t, udpconn.Options{})
	b := listen(t, udpconn.Options{DisableGRO: true})
	if !a.GSO() {
		nstest.SkipMissing(t, "kernel has no UDP GSO")
	}
	const seg = 1400
	msgs := []udpconn.Message{{Buf: payload(13, udpconn.MaxMessageBytes), SegSize: seg, Addr: b.LocalAddr()}}
	if _, err := a.WriteBatch(msgs); err != nil || msgs[0].Err != 0 {
		t.Fatalf("WriteBatch of MaxMessageBytes: %v, Err %v", err, msgs[0].Err)
	}
	if s := a.Stats().SplitSends; s != 0 {
		t.Fatalf("a GSO message of MaxMessageBytes was split (SplitSends %d)", s)
	}
	segs := (udpconn.MaxMessageBytes + seg - 1) / seg
	readDatagrams(t, b, segs, 2048)

	msgs[0].Buf = payload(14, 60*seg) // 84000 bytes: too big for one IPv4 packet
	if _, err := a.WriteBatch(msgs); err != nil || msgs[0].Err != 0 {
		t.Fatalf("WriteBatch of %d bytes: %v, Err %v", len(msgs[0].Buf), err, msgs[0].Err)
	}
	if s := a.Stats().SplitSends; s != 1 {
		t.Fatalf("SplitSends = %d after an oversize GSO message, want 1", s)
	}
	readDatagrams(t, b, 60, 2048)
}

func TestWriteBatchSendsMoreMessagesThanBatchSize(t *testing.T) {
	a := listen(t, udpconn.Options{BatchSize: 4})
	b := listen(t, udpconn.Options{DisableGRO: true})
	msgs := make([]udpconn.Message, 10)
	for i := range msgs {
		msgs[i] = udpconn.Message{Buf: payload(byte(i), 10+i), Addr: b.LocalAddr()}
	}
	if n, err := a.WriteBatch(msgs); n != 10 || err != nil {
		t.Fatalf("WriteBatch = %d, %v; want 10, nil", n, err)
	}
	got := readDatagrams(t, b, 10, 100)
	for i, d := range got {
		if len(d.data) != 10+i {
			t.Fatalf("datagram %d: %d bytes, want %d", i, len(d.data), 10+i)
		}
	}
}

// TestPiecesAreSentAsTheirConcatenation sends a GSO train and a plain
// datagram gathered from pieces that do not line up with the segments,
// with GSO and without (then each segment is gathered on its own).
func TestPiecesAreSentAsTheirConcatenation(t *testing.T) {
	for _, gso := range []bool{true, false} {
		a := listen(t, udpconn.Options{DisableGSO: !gso})
		b := listen(t, udpconn.Options{DisableGRO: true})
		whole := payload(3, 5*700+123)
		var pieces [][]byte
		for off, k := 0, 0; off < len(whole); k++ {
			n := min(len(whole)-off, 1+k*97%450) // 1..450 bytes, straddling segments
			pieces = append(pieces, whole[off:off+n])
			off += n
		}
		msgs := []udpconn.Message{
			{Iov: pieces, SegSize: 700, Addr: b.LocalAddr()},
			{Iov: [][]byte{[]byte("ab"), nil, []byte("cd")}, Addr: b.LocalAddr()},
		}
		if n, err := a.WriteBatch(msgs); n != 2 || err != nil || msgs[0].Err != 0 || msgs[1].Err != 0 {
			t.Fatalf("gso %v: WriteBatch = %d, %v (errs %v %v)", gso, n, err, msgs[0].Err, msgs[1].Err)
		}
		got := readDatagrams(t, b, 7, 2048)
		for i := range 6 {
			want := whole[i*700 : min((i+1)*700, len(whole))]
			if !bytes.Equal(got[i].data, want) {
				t.Fatalf("gso %v: datagram %d: %d bytes, want %d of the concatenation", gso, i, len(got[i].data), len(want))
			}
		}
		if string(got[6].data) != "abcd" {
			t.Fatalf("gso %v: plain datagram %q", gso, got[6].data)
		}
	}
}

func TestMessageWithMorePiecesThanTheKernelTakesFailsAlone(t *testing.T) {
	a := listen(t, udpconn.Options{})
	b := listen(t, udpconn.Options{DisableGRO: true})
	many := make([][]byte, udpconn.MaxIovecs+1)
	for i := range many {
		many[i] = []byte{byte(i)}
	}
	msgs := []udpconn.Message{{Iov: many, Addr: b.LocalAddr()}, {Buf: []byte("ok"), Addr: b.LocalAddr()}}
	if _, err := a.WriteBatch(msgs); err != nil {
		t.Fatal(err)
	}
	if msgs[0].Err != syscall.EMSGSIZE || msgs[1].Err != 0 {
		t.Fatalf("errs %v, %v; want EMSGSIZE, 0", msgs[0].Err, msgs[1].Err)
	}
	if got := readDatagrams(t, b, 1, 100); string(got[0].data) != "ok" {
		t.Fatalf("got %q", got[0].data)
	}
}

// TestInterruptEndsCallsButKeepsTheSocket: Interrupt wakes a waiting
// ReadBatch, and later calls fail too, but the descriptor stays open (the
// owner closes it once its loops have returned).
func TestInterruptEndsCallsButKeepsTheSocket(t *testing.T) {
	c, err := udpconn.Listen(loopback, udpconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	before, err := fdpoll.Waiting()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.ReadBatch([]udpconn.Message{{Buf: make([]byte, 2048)}})
		done <- err
	}()
	if err := fdpoll.AwaitWaiting(before+1, 5*time.Second); err != nil {
		t.Fatalf("ReadBatch does not wait: %v", err)
	}
	c.Interrupt()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("ReadBatch after Interrupt: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadBatch still blocked 5 s after Interrupt")
	}
	if _, err := c.WriteBatch([]udpconn.Message{{Buf: []byte{1}, Addr: c.LocalAddr()}}); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WriteBatch after Interrupt: %v, want net.ErrClosed", err)
	}
	if _, err := unix.GetsockoptInt(c.Fd(), unix.SOL_SOCKET, unix.SO_TYPE); err != nil {
		t.Fatalf("the socket was closed by Interrupt: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close after Interrupt: %v", err)
	}
}
