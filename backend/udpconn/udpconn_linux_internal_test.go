//go:build linux

package udpconn

import (
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/tests/nstest"
)

func TestParseKernelRelease(t *testing.T) {
	for _, c := range []struct {
		in           string
		major, minor int
		ok           bool
	}{
		{"6.18.44-fc-v669", 6, 18, true},
		{"6.9", 6, 9, true},
		{"5.15.0-91-generic", 5, 15, true},
		{"6.8.0+", 6, 8, true},
		{"garbage", 0, 0, false},
	} {
		major, minor, ok := parseRelease(c.in)
		if major != c.major || minor != c.minor || ok != c.ok {
			t.Errorf("parseRelease(%q) = %d, %d, %v; want %d, %d, %v", c.in, major, minor, ok, c.major, c.minor, c.ok)
		}
	}
}

// TestEIOTurnsGSOOffAndResendsSegments injects the EIO older kernels return
// for a GSO send over a route without checksum offload: GSO must go off for
// the conn, and the message (and later ones) go out one datagram per segment.
func TestEIOTurnsGSOOffAndResendsSegments(t *testing.T) {
	a, err := Listen(netip.MustParseAddrPort("127.0.0.1:0"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Listen(netip.MustParseAddrPort("127.0.0.1:0"), Options{DisableGRO: true})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if !a.GSO() {
		nstest.SkipMissing(t, "no UDP GSO (Linux >= 4.18)")
	}
	real := sendmmsg
	t.Cleanup(func() { sendmmsg = real })
	var refused int
	// Like the kernel: send up to the first GSO message, fail on it.
	sendmmsg = func(fd uintptr, hdrs *unix.Mmsghdr, n int) (int, syscall.Errno) {
		for k, h := range unsafe.Slice(hdrs, n) {
			if h.Hdr.Controllen == 0 {
				continue
			}
			if k == 0 {
				refused++
				return 0, unix.EIO
			}
			return real(fd, hdrs, k)
		}
		return real(fd, hdrs, n)
	}
	const seg = 500
	msgs := []Message{
		{Buf: []byte("plain"), Addr: b.LocalAddr()},
		{Buf: make([]byte, 4*seg), SegSize: seg, Addr: b.LocalAddr()},
		{Buf: make([]byte, 3*seg), SegSize: seg, Addr: b.LocalAddr()},
	}
	if n, err := a.WriteBatch(msgs); n != 3 || err != nil {
		t.Fatalf("WriteBatch = %d, %v", n, err)
	}
	for i, m := range msgs {
		if m.Err != 0 {
			t.Errorf("message %d: Err %v", i, m.Err)
		}
	}
	if a.GSO() {
		t.Error("GSO still on after EIO")
	}
	if refused != 1 || a.Stats().SplitSends != 2 {
		t.Errorf("refused %d GSO sends and split %d messages; want 1 and 2", refused, a.Stats().SplitSends)
	}
	in := make([]Message, 16)
	for i := range in {
		in[i].Buf = make([]byte, 2048)
	}
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	want := []int{5, seg, seg, seg, seg, seg, seg, seg}
	var got []int
	for len(got) < len(want) {
		n, err := b.ReadBatch(in)
		if err != nil {
			t.Fatalf("after %d datagrams: %v", len(got), err)
		}
		for _, m := range in[:n] {
			got = append(got, m.N)
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("datagram sizes %v, want %v", got, want)
	}
}
