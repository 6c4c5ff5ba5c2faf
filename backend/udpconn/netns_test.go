//go:build linux

package udpconn_test

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/tests/nstest"
)

// TestGSOThroughDeviceWithoutChecksumOffloadDelivers sends a GSO message
// over a route whose device has no checksum offload (a TUN without
// IFF_VNET_HDR). Older kernels refuse that with EIO, which must turn GSO
// off and resend the segments; newer ones segment in software. Either way
// every segment must come out of the device.
func TestGSOThroughDeviceWithoutChecksumOffloadDelivers(t *testing.T) {
	nstest.EnterNewNetns(t)
	dev, err := tundev.Open(tundev.Options{Name: "tlu" + itoa(os.Getpid()%100000), MTU: 1400, Driver: tundev.DriverWater})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	link, err := netlink.LinkByName(dev.Name())
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(198, 18, 0, 1), Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	c, err := udpconn.Listen(netip.MustParseAddrPort("198.18.0.1:0"), udpconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.GSO() {
		nstest.SkipMissing(t, "no UDP GSO (Linux >= 4.18)")
	}
	const seg, segs = 1000, 10
	peer := netip.MustParseAddrPort("198.18.0.2:9999")
	msgs := []udpconn.Message{{Buf: make([]byte, seg*segs), SegSize: seg, Addr: peer}}
	if _, err := c.WriteBatch(msgs); err != nil || msgs[0].Err != 0 {
		t.Fatalf("WriteBatch: %v, Err %v", err, msgs[0].Err)
	}
	q := dev.Queues()[0]
	buf := make([]byte, 1400)
	watchdog := time.AfterFunc(5*time.Second, func() { dev.Close() })
	defer watchdog.Stop()
	for got := 0; got < segs; {
		n, err := q.ReadPacket(buf, true)
		if errors.Is(err, os.ErrClosed) {
			t.Fatalf("only %d of %d segments came out of the device within 5 s", got, segs)
		}
		if err != nil {
			t.Fatal(err)
		}
		if p := buf[:n]; len(p) == 28+seg && p[0]>>4 == 4 && p[9] == 17 {
			got++
		}
	}
	t.Logf("GSO over a device without checksum offload: GSO() now %v, SplitSends %d", c.GSO(), c.Stats().SplitSends)
}

func itoa(n int) string { return strconv.Itoa(n) }
