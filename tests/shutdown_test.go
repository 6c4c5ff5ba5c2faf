package tests

import (
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/testbed"
)

// shutdownBound is how long tulled may take to exit after SIGTERM, whatever
// its data plane is doing.
const shutdownBound = 2 * time.Second

// fullSendBuffer is the data-plane socket's send-buffer use (sk_wmem_alloc)
// at which the buffer counts as full: tulled asks for 8 MiB, which the
// kernel doubles to 16 MiB; a send fails (and the TX loop waits for room)
// once the queued datagrams reach that, with at most a 64 KiB train more.
const fullSendBuffer = 15 << 20

// TestTulledExitsWithin2sWhileItsSendBufferIsFull stops tulled on host 1
// while its data plane cannot send: host 1's underlay link drains at
// 10 kB/s (a TBF queue holding 64 MiB), container 1 keeps offering UDP to
// container 2, and the data-plane socket's send buffer is full, so a TX
// loop waits for room in it. tulled must exit 0 within 2 s of SIGTERM and
// leave neither its device nor its route behind.
func TestTulledExitsWithin2sWhileItsSendBufferIsFull(t *testing.T) {
	b := cluster(t, testbed.Options{Hosts: 2}, "")
	ctx := testCtx(t, 2*time.Minute)
	h1 := b.Host(1)
	c1, c2 := container(t, b, 1), container(t, b, 2)
	reach(t, ctx, c1, c2, 1) // ARP resolved on both underlay links before the queue slows host 1's

	const rate = 10_000 // bytes per second
	tbf := func() *netlink.Tbf {
		return &netlink.Tbf{QdiscAttrs: netlink.QdiscAttrs{Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT}}
	}
	err := testbed.InNetns(h1.NS, func() error {
		l, err := netlink.LinkByName(h1.Link)
		if err != nil {
			return err
		}
		q := tbf()
		q.LinkIndex = l.Attrs().Index
		q.Rate, q.Limit, q.Buffer = rate, 64<<20, netlink.Xmittime(rate, 256<<10) // a burst above 64 KiB: GSO trains queue whole
		return netlink.QdiscAdd(q)
	})
	if err != nil {
		nstest.SkipMissing(t, fmt.Sprintf("cannot add a TBF qdisc to host 1's underlay link: %v", err))
	}

	// Container 1 offers 60 KB datagrams (fragmented to its MTU) to
	// container 2 for at most 30 s, until the test ends.
	sock, err := testbed.ListenUDP(c1.NS, netip.AddrPortFrom(c1.Addr, 0))
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	stopOffer := make(chan struct{})
	var offer sync.WaitGroup
	offer.Go(func() {
		payload := make([]byte, 60000)
		dst := netip.AddrPortFrom(c2.Addr, 9)
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
			select {
			case <-stopOffer:
				return
			default:
			}
			_, _ = sock.WriteToUDPAddrPort(payload, dst) // ENOBUFS or unreachable once tulled is gone: keep offering
		}
	})
	defer func() {
		close(stopOffer)
		offer.Wait()
	}()

	var full uint32
	deadline := time.Now().Add(30 * time.Second)
	for full < fullSendBuffer {
		if time.Now().After(deadline) {
			t.Fatalf("host 1's data-plane send buffer holds %d bytes after 30 s of offered traffic, want %d (full)", full, fullSendBuffer)
		}
		if full, err = dataPlaneSendQueue(h1); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	tulled := h1.Tulled()
	stopped := time.Now()
	if err := tulled.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-tulled.Exited():
	case <-time.After(shutdownBound):
		// Let the queue go so that a hung tulled can finish and the bed
		// can be taken down; the test has failed.
		_ = testbed.InNetns(h1.NS, func() error {
			l, err := netlink.LinkByName(h1.Link)
			if err == nil {
				q := tbf()
				q.LinkIndex = l.Attrs().Index
				err = netlink.QdiscDel(q)
			}
			return err
		})
		t.Fatalf("tulled did not exit within %v of SIGTERM with its send buffer full (%d bytes queued); log:\n%s",
			shutdownBound, full, tulled.LogTail(30))
	}
	took := time.Since(stopped)
	if code := tulled.ExitCode(); code != 0 {
		t.Fatalf("tulled exited with %s after SIGTERM, want exit status 0; log:\n%s", tulled.ExitDescription(), tulled.LogTail(30))
	}
	links, err := h1.Exec(ctx, "ip", "-br", "link")
	if err != nil {
		t.Fatal(err)
	}
	routes, err := h1.Exec(ctx, "ip", "route")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(links, "tulle0") || strings.Contains(routes, "tulle0") || strings.Contains(routes, "198.18.0.0/16") {
		t.Errorf("tulled left its device or route behind:\n%s\n%s", links, routes)
	}
	t.Logf("tulled exited 0 in %v with %d bytes in its send buffer", took.Round(time.Millisecond), full)
}

// dataPlaneSendQueue returns the largest send-buffer use (sk_wmem_alloc)
// among host h's sockets on the data-plane port.
func dataPlaneSendQueue(h *testbed.Host) (uint32, error) {
	var most uint32
	err := testbed.InNetns(h.NS, func() error {
		socks, err := netlink.SocketDiagUDPInfo(unix.AF_INET)
		if err != nil {
			return fmt.Errorf("sock_diag UDP: %w", err)
		}
		for _, s := range socks {
			if s.InetDiagMsg.ID.SourcePort == subnet.DefaultPort && s.Memory != nil {
				most = max(most, s.Memory.TMem)
			}
		}
		return nil
	})
	return most, err
}
