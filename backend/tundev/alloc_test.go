//go:build linux

package tundev_test

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/tests/nstest"
)

func TestOffloadReadWriteOfUDPAllocateNothing(t *testing.T) {
	testForwardingLoopAllocs(t, tundev.DriverOffload, 17)
}

func TestOffloadReadWriteOfTCPAllocateNothing(t *testing.T) {
	testForwardingLoopAllocs(t, tundev.DriverOffload, 6)
}

func TestWaterReadWriteAllocateNothing(t *testing.T) {
	testForwardingLoopAllocs(t, tundev.DriverWater, 17)
}

// forwardLoop writes a batch of 4 flows of 8 UDP or TCP segments each from
// 198.18.0.2 to 198.18.0.3 into the TUN; the namespace forwards them back
// out of the TUN (both addresses are routed there), and reads return them.
// It drives the queue as the data plane does (the writer and reader of
// helpers_test.go): with offloads a Coalescer merges each flow into one
// WritePacket and Split cuts the superpacket ReadPacket returns.
type forwardLoop struct {
	dev       *tundev.Device
	q         tundev.Queue
	w         *writer
	r         *reader
	proto     byte
	templates [][]byte
	wbufs     [][]byte
	rbufs     [][]byte
	sizes     []int
	maxBatch  int  // most packets one read held
	check     bool // verify every forwarded packet (allocates on failure only)
	err       error
}

const loopFlows, loopSegs, loopSize = 4, 8, 1000
const loopBatch = loopFlows * loopSegs

func newForwardLoop(tb testing.TB, driver string, proto byte) *forwardLoop {
	nstest.EnterNewNetns(tb)
	writeSysctl(tb, "net/ipv4/ip_forward", "1")
	writeSysctl(tb, "net/ipv4/conf/all/send_redirects", "0")
	dev := openTUN(tb, tundev.Options{Driver: driver})
	writeSysctl(tb, "net/ipv4/conf/"+dev.Name()+"/send_redirects", "0")
	q := dev.Queues()[0]
	l := &forwardLoop{dev: dev, q: q, w: newWriter(dev, q), r: newReader(q), proto: proto}
	dst := netip.AddrPortFrom(farAddr, 6000)
	for i := range loopBatch {
		src := netip.AddrPortFrom(peerAddr, uint16(5000+i/loopSegs))
		payload := bytes.Repeat([]byte{byte(i)}, loopSize)
		buf := make([]byte, 40+loopSize)
		var p []byte
		if proto == 17 {
			p = buildUDP(buf, 0, src, dst, payload, uint16(i))
		} else {
			p = buildTCP(buf, 0, src, dst, uint32(1+(i%loopSegs)*loopSize), 1, tcpACK, nil, payload)
		}
		l.templates = append(l.templates, p)
		l.wbufs = append(l.wbufs, make([]byte, len(p)))
	}
	l.rbufs, l.sizes = makeBufs(128, dev.MTU())
	return l
}

// round writes the batch and reads until all of it came back.
func (l *forwardLoop) round() {
	for i := range l.wbufs {
		copy(l.wbufs[i], l.templates[i]) // the Coalescer rewrote the merged headers
	}
	if err := l.w.write(l.wbufs...); err != nil {
		l.err = err
		return
	}
	for got := 0; got < loopBatch; {
		n, err := l.r.read(l.rbufs, l.sizes)
		if err != nil {
			l.err = err
			return
		}
		l.maxBatch = max(l.maxBatch, n)
		for i := range n {
			p := l.rbufs[i][:l.sizes[i]]
			if len(p) < 28 || p[0]>>4 != 4 || p[9] != l.proto || p[19] != 3 {
				continue // not the forwarded flow
			}
			if l.check && l.err == nil {
				l.err = checkForwarded(p, got)
			}
			got++
		}
	}
}

// testForwardingLoopAllocs proves that one round (the writes of the batch,
// then reads until it is back) allocates nothing.
func testForwardingLoopAllocs(t *testing.T, driver string, proto byte) {
	l := newForwardLoop(t, driver, proto)
	// A lost packet would block a read forever: closing the device ends it.
	watchdog := time.AfterFunc(30*time.Second, func() { l.dev.Close() })
	defer watchdog.Stop()

	l.check = true
	l.round() // warm up, and check what comes back
	l.check = false
	if l.err != nil {
		t.Fatal(l.err)
	}
	allocs := testing.AllocsPerRun(100, l.round)
	if l.err != nil {
		t.Fatal(l.err)
	}
	t.Logf("%s, protocol %d: %d packets per round, up to %d per read, %.2f allocations per round",
		driver, proto, loopBatch, l.maxBatch, allocs)
	if allocs != 0 {
		t.Errorf("%s: writing and reading %d packets allocates %.2f times per round, want 0", driver, loopBatch, allocs)
	}
	if l.dev.Offload() && (proto == 6 || l.dev.UDPOffload()) && l.maxBatch < loopSegs {
		t.Errorf("offload: at most %d packets per read, want a coalesced flow of %d split again", l.maxBatch, loopSegs)
	}
}

// checkForwarded verifies the i-th forwarded packet: valid checksums, TTL
// decremented once, payload intact.
func checkForwarded(p []byte, i int) error {
	ip, err := parseIP(p)
	if err != nil {
		return fmt.Errorf("forwarded packet %d: %w", i, err)
	}
	if ip.ttl != 63 || len(ip.payload) != loopSize || ip.payload[0] != byte(i) || ip.payload[loopSize-1] != byte(i) {
		return fmt.Errorf("forwarded packet %d: ttl %d, %d bytes starting %d", i, ip.ttl, len(ip.payload), ip.payload[0])
	}
	return nil
}

// BenchmarkForwardLoop measures one round trip of 32 packets (4 flows of 8
// segments of 1000 bytes) through the TUN: coalesced writes, the kernel's
// forwarding, split reads. It includes the kernel's forwarding, so compare
// drivers, not absolutes.
func BenchmarkForwardLoop(b *testing.B) {
	for _, bc := range []struct {
		name   string
		driver string
		proto  byte
	}{
		{"offload-udp", tundev.DriverOffload, 17},
		{"offload-tcp", tundev.DriverOffload, 6},
		{"water-udp", tundev.DriverWater, 17},
	} {
		b.Run(bc.name, func(b *testing.B) {
			// The namespace is per goroutine: each sub-benchmark makes its own.
			l := newForwardLoop(b, bc.driver, bc.proto)
			watchdog := time.AfterFunc(60*time.Second, func() { l.dev.Close() })
			defer watchdog.Stop()
			l.round()
			b.SetBytes(loopBatch * loopSize)
			b.ReportAllocs()
			start := time.Now()
			b.ResetTimer()
			for range b.N {
				l.round()
			}
			b.StopTimer()
			if l.err != nil {
				b.Fatal(l.err)
			}
			b.ReportMetric(float64(b.N*loopBatch)/time.Since(start).Seconds(), "packets/s")
		})
	}
}
