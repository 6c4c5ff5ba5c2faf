package udp

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
)

// stopBound is how long stopping the data plane may take, whatever it is
// doing (the daemon's shutdown must finish within 2 s).
const stopBound = 2 * time.Second

// TestStopEndsATransmitLoopBlockedOnAFullSendBuffer fills the data plane's
// socket send buffer and keeps it full (host A's underlay link drains at
// 10 kB/s through a TBF queue that holds 64 MiB), with traffic still
// offered to the TUN, so that the TX loop waits for room in the buffer.
// Cancelling Run must end it within 2 s, and Close must remove the device
// within 2 s more.
func TestStopEndsATransmitLoopBlockedOnAFullSendBuffer(t *testing.T) {
	h := newTwoHosts(t)
	const rate = 10_000 // bytes per second
	var link netlink.Link
	err := nstest.In(h.a, func() error {
		var err error
		if link, err = netlink.LinkByName(h.vethA); err != nil {
			return err
		}
		return netlink.QdiscAdd(&netlink.Tbf{
			QdiscAttrs: netlink.QdiscAttrs{LinkIndex: link.Attrs().Index, Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT},
			Rate:       rate,
			Limit:      64 << 20,
			Buffer:     netlink.Xmittime(rate, 256<<10), // a burst above 64 KiB: GSO trains are queued whole
		})
	})
	if err != nil {
		nstest.SkipMissing(t, "cannot add a TBF qdisc to the underlay veth: "+err.Error())
	}
	// drain lets the queue go, so that a loop this test failed to stop
	// returns at last instead of blocking the test binary forever.
	drain := func() {
		_ = nstest.In(h.a, func() error {
			return netlink.QdiscDel(&netlink.Tbf{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: link.Attrs().Index, Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT}})
		})
	}

	logs := &logBuffer{}
	var b *Backend
	name := h.tunName("a")
	err = nstest.In(h.a, func() error {
		var err error
		b, err = New(Options{TunName: name, Workers: 1, PublicIP: hostA, MTU: 1500 - proto.EncapOverhead,
			Network: network, SubnetLen: 24, Lease: tulleLease(leaseA, hostA).Lease, Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log:\n%s", logs.String())
		}
	})
	b.Apply([]subnet.Event{tulleLease(leaseB, hostB)})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()

	// Offer traffic: UDP GSO trains from an application on host A to B's
	// subnet, through the TUN, for at most 30 s.
	app := openConn(t, h.a, netip.AddrPortFrom(leaseA.Addr(), 0))
	stopOffer := make(chan struct{})
	var offer sync.WaitGroup
	offer.Go(func() {
		msgs := make([]udpconn.Message, 8)
		for i := range msgs {
			msgs[i] = udpconn.Message{Buf: make([]byte, 40*1400), Addr: netip.AddrPortFrom(leaseB.Addr(), 9000), SegSize: 1400}
		}
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-stopOffer:
				return
			default:
			}
			if _, err := app.WriteBatch(msgs); err != nil {
				return
			}
		}
	})
	defer func() {
		close(stopOffer)
		offer.Wait()
	}()

	conn := b.workers[0].conn
	waitFor(t, 20*time.Second, "the TX loop to wait for room in its full socket buffer", func() bool {
		return conn.Stats().SendWaits > 0
	})
	// The buffer drains below half (when the kernel reports it writable
	// again) only after minutes at this rate: the loop waits from now on.

	stopped := time.Now()
	// returns waits for what (Run, then Close) to return on done, at most
	// stopBound from now; past that the underlay drains so that it returns
	// at last and the test can end.
	returns := func(what string, done <-chan error) {
		t.Helper()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s: %v", what, err)
			}
		case <-time.After(stopBound):
			drain()
			err := <-done
			t.Fatalf("%s did not return within %v with the send buffer full (it returned %v, %v after the stop, once the underlay drained)",
				what, stopBound, err, time.Since(stopped).Round(time.Millisecond))
		}
	}
	cancel()
	returns("Run", done)
	closed := make(chan error, 1)
	go func() { closed <- b.Close() }()
	returns("Close", closed)
	took := time.Since(stopped)
	if took > stopBound {
		t.Errorf("stopping took %v, want at most %v", took, stopBound)
	}
	err = nstest.In(h.a, func() error {
		if _, err := netlink.LinkByName(name); err == nil {
			t.Errorf("device %s still there after Close", name)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stopped in %v with the send buffer full (%d waits for room)", took.Round(time.Millisecond), conn.Stats().SendWaits)
}
