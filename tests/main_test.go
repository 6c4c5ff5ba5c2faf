package tests

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

func TestMain(m *testing.M) {
	code := m.Run()
	_ = testbed.Cleanup()
	os.Exit(code)
}

// testCtx is a context bounded well below go test's default timeout.
func testCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// cluster builds a bed, writes the default network config (or config, if
// given) and starts tulled on every host with extra flags, each with its
// container.
func cluster(t *testing.T, opts testbed.Options, config string, extra ...string) *testbed.Bed {
	t.Helper()
	b := testbed.NewT(t, opts)
	ctx := testCtx(t, 2*time.Minute)
	if config == "" {
		config = testbed.DefaultNetworkConfig
	}
	if err := b.WriteNetworkConfig(ctx, config); err != nil {
		t.Fatal(err)
	}
	if err := b.StartAll(ctx, extra...); err != nil {
		t.Fatal(err)
	}
	return b
}

// lease returns host h's lease from its subnet.env.
func lease(t *testing.T, h *testbed.Host) netip.Prefix {
	t.Helper()
	env, err := h.SubnetEnv()
	if err != nil {
		t.Fatal(err)
	}
	return env.Lease()
}

// metric scrapes h and returns the sum of the matching series.
func metric(t *testing.T, ctx context.Context, h *testbed.Host, name string, labels ...string) float64 {
	t.Helper()
	m, err := h.Scrape(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return m.Value(name, labels...)
}

// waitMetric scrapes h until cond holds for the metric's value or timeout
// passes, and returns the last value and how long it took.
func waitMetric(t *testing.T, ctx context.Context, h *testbed.Host, timeout time.Duration, cond func(float64) bool, name string, labels ...string) (float64, time.Duration, error) {
	t.Helper()
	start := time.Now()
	for {
		m, err := h.Scrape(ctx)
		var v float64
		if err == nil {
			v = m.Value(name, labels...)
			if cond(v) {
				return v, time.Since(start), nil
			}
		}
		if time.Since(start) > timeout {
			if err != nil {
				return v, time.Since(start), err
			}
			return v, time.Since(start), fmt.Errorf("host %s: %s%v = %v after %v", h.Name, name, labels, v, timeout)
		}
		select {
		case <-ctx.Done():
			return v, time.Since(start), ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// reach waits until from reaches to's address (first contact resolves ARP
// on both sides) and then requires count answered pings.
func reach(t *testing.T, ctx context.Context, from, to *testbed.Node, count int) testbed.PingResult {
	t.Helper()
	if _, err := from.WaitReachable(ctx, to.Addr, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	r, err := from.Ping(ctx, to.Addr, count)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func container(t *testing.T, b *testbed.Bed, i int) *testbed.Node {
	t.Helper()
	c := b.Host(i).Container()
	if c == nil {
		t.Fatalf("host %d has no container", i)
	}
	return &c.Node
}

// joinHost adds a host to b, starts tulled on it with args and then its
// container, and fails the test unless every node of from reaches that
// container within 5 s of tulled starting (after: what the host joined
// after, for the message). It returns how long after the start that took.
func joinHost(t *testing.T, ctx context.Context, b *testbed.Bed, after string, from []*testbed.Node, args ...string) time.Duration {
	t.Helper()
	h, err := b.AddHost(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.StartTulled(ctx, args...); err != nil {
		t.Fatal(err)
	}
	joined := time.Now()
	if _, err := h.SetupContainer(ctx); err != nil {
		t.Fatal(err)
	}
	c := container(t, b, h.Index)
	for _, n := range from {
		if _, err := n.WaitReachable(ctx, c.Addr, 5*time.Second-time.Since(joined)); err != nil {
			t.Fatalf("%s cannot reach the host that joined after %s within 5 s: %v", n.Name, after, err)
		}
	}
	return time.Since(joined)
}
