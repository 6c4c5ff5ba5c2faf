package tests

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

func TestOversizeDFPacketGetsFragNeeded(t *testing.T) {
	b := cluster(t, testbed.Options{}, "")
	ctx := testCtx(t, 2*time.Minute)
	h1, h3 := b.Host(1), b.Host(3)
	c1, c3 := container(t, b, 1), container(t, b, 3)
	reach(t, ctx, c1, c3, 1)

	// Host 1's path to host 3 is narrower than the links: a locked route
	// MTU, as a tunnel or a small-MTU hop on the way would make it.
	const routeMTU = 1200
	const pathMTU = routeMTU - 28 // what fits inside the outer IPv4 + UDP headers
	if _, err := h1.Exec(ctx, "ip", "route", "add", h3.Addr.String()+"/32", "dev", h1.Link, "mtu", "lock", strconv.Itoa(routeMTU)); err != nil {
		t.Fatal(err)
	}

	// A DF echo of 1300 bytes (+ 28) from container 1 to container 3: tulled
	// on host 1 must answer "fragmentation needed, mtu 1172"; ping prints
	// it ("Frag needed and DF set (mtu = 1172)"), or, once the container's
	// kernel has learned the path MTU, refuses locally ("message too long,
	// mtu=1172"). tulled learns the path MTU on its slow path, so the first
	// echoes may be dropped.
	oversize := func() float64 {
		return metric(t, ctx, h1, "tulle_dropped_packets_total", "direction", "transmit", "reason", "oversize")
	}
	before := oversize()
	out := pingUntilTooBig(t, ctx, c1, c3.Addr, 1300, pathMTU, "ICMP fragmentation needed")
	t.Logf("ping -M do -s 1300: %s", out)
	// tulled dropped (and counted) the packet it answered with the ICMP.
	if after := oversize(); after <= before {
		t.Errorf("host 1 transmit oversize drops %v -> %v, though it answered an oversize DF packet", before, after)
	}

	// What fits the path passes, DF and all.
	if _, err := c1.Ping(ctx, c3.Addr, 2, "-M", "do", "-s", strconv.Itoa(pathMTU-28)); err != nil {
		t.Fatal(err)
	}
	// TCP from container 1 to container 3 learns the path MTU end to end
	// (container 3 announces an MSS for 1472-byte packets; the ICMP from
	// tulled lowers it) and completes.
	tr, err := testbed.TransferTCP(ctx, c1, c3, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("TCP c1 -> c3 over the %d-byte path: %d bytes in %v; host 1 oversize drops: %v", routeMTU, tr.Bytes, tr.Elapsed, oversize())
}

func TestTCPCompletesWithSmallerUnderlayMTUOnOneHost(t *testing.T) {
	const smallMTU = 1400
	b := cluster(t, testbed.Options{HostMTU: map[int]int{3: smallMTU}}, "")
	ctx := testCtx(t, 2*time.Minute)
	env1, err := b.Host(1).SubnetEnv()
	if err != nil {
		t.Fatal(err)
	}
	env3, err := b.Host(3).SubnetEnv()
	if err != nil {
		t.Fatal(err)
	}
	if env1.MTU != 1500-28 || env3.MTU != smallMTU-28 {
		t.Fatalf("FLANNEL_MTU: host 1 %d, host 3 %d; want underlay MTU - 28: %d and %d", env1.MTU, env3.MTU, 1500-28, smallMTU-28)
	}
	if out, err := b.Host(3).Exec(ctx, "ip", "-o", "link", "show", "tulle0"); err != nil || !strings.Contains(out, fmt.Sprintf("mtu %d", smallMTU-28)) {
		t.Fatalf("host 3 tulle0: want mtu %d: %v %s", smallMTU-28, err, out)
	}
	c1, c3 := container(t, b, 1), container(t, b, 3)
	reach(t, ctx, c1, c3, 1)
	// The largest DF packet for container 3's MTU passes.
	if _, err := c1.Ping(ctx, c3.Addr, 2, "-M", "do", "-s", strconv.Itoa(env3.MTU-28)); err != nil {
		t.Fatal(err)
	}
	for _, p := range [][2]*testbed.Node{{c1, c3}, {c3, c1}} {
		tr, err := testbed.TransferTCP(ctx, p[0], p[1], 16<<20)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s -> %s: %d bytes in %v (%s)", p[0].Name, p[1].Name, tr.Bytes, tr.Elapsed, testbed.FormatBits(tr.BitsPerSecond()))
	}
}

// pingUntilTooBig pings dst from c with size bytes of echo and DF (for
// IPv6, no fragmentation) until ping reports the path MTU pathMTU (what:
// the ICMP error that tells it), within 15 s, and returns ping's output.
func pingUntilTooBig(t *testing.T, ctx context.Context, c *testbed.Node, dst netip.Addr, size, pathMTU int, what string) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		out, _ := c.Exec(ctx, "ping", "-n", "-M", "do", "-s", strconv.Itoa(size), "-c", "1", "-W", "1", dst.String())
		if strings.Contains(out, fmt.Sprintf("mtu = %d", pathMTU)) || strings.Contains(out, fmt.Sprintf("mtu=%d", pathMTU)) {
			return strings.TrimSpace(out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s with mtu %d within 15 s; last ping:\n%s", what, pathMTU, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
