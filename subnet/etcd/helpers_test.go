package etcd

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// logBuffer collects a test's log lines; they are printed if the test fails.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func testLogger(t *testing.T) (*slog.Logger, *logBuffer) {
	lb := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log:\n%s", lb.String())
		}
	})
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})), lb
}

// testPrefix is an etcd prefix of the test's own.
func testPrefix(t *testing.T) string {
	return "/tulletest/" + strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())
}

// newRegistry returns a Registry with short timings, closed at the end of the test.
func newRegistry(t *testing.T, endpoint, prefix string, logger *slog.Logger) *Registry {
	t.Helper()
	if logger == nil {
		logger, _ = testLogger(t)
	}
	r, err := New(Config{Endpoints: []string{endpoint}, Prefix: prefix, DialTimeout: time.Second}, logger)
	if err != nil {
		t.Fatal(err)
	}
	r.backoffMax = 2 * time.Second
	t.Cleanup(func() { r.Close() })
	return r
}

func putConfig(t *testing.T, c *clientv3.Client, prefix, cfg string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Put(ctx, prefix+"/config", cfg); err != nil {
		t.Fatal(err)
	}
}

// startEtcdWithConfig starts etcd and writes the network config cfg below
// the test's own prefix; it returns the server, a client and the prefix.
func startEtcdWithConfig(t *testing.T, cfg string) (*etcdtest.Server, *clientv3.Client, string) {
	t.Helper()
	s := etcdtest.Start(t)
	c := s.Client()
	prefix := testPrefix(t)
	putConfig(t, c, prefix, cfg)
	return s, c, prefix
}

func mustConfig(t *testing.T, r *Registry) *subnet.Config {
	t.Helper()
	cfg, err := r.GetNetworkConfig(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// ctx is bounded so a hang fails the test instead of the whole run.
func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func attrs(ip string) subnet.LeaseAttrs {
	return subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(ip)}
}

func hostIP(i int) string { return fmt.Sprintf("192.0.2.%d", i) }

// putLease writes a lease key as another host would, with an etcd lease of
// ttl (0: a reservation).
func putLease(t *testing.T, c *clientv3.Client, prefix, key, value string, ttl int64) {
	t.Helper()
	cx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var opts []clientv3.OpOption
	if ttl > 0 {
		g, err := c.Grant(cx, ttl)
		if err != nil {
			t.Fatal(err)
		}
		opts = append(opts, clientv3.WithLease(g.ID))
	}
	if _, err := c.Put(cx, prefix+"/subnets/"+key, value, opts...); err != nil {
		t.Fatal(err)
	}
}

func getKV(t *testing.T, c *clientv3.Client, key string) *clientv3.GetResponse {
	t.Helper()
	cx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := c.Get(cx, key)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func assertNoOrphanLeases(t *testing.T, c *clientv3.Client) {
	t.Helper()
	cx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	orphans, err := etcdtest.OrphanLeases(cx, c)
	if err != nil {
		t.Fatal(err)
	}
	if len(orphans) > 0 {
		t.Errorf("%d etcd leases without keys left behind: %x", len(orphans), orphans)
	}
}

func leaseCount(t *testing.T, c *clientv3.Client) int {
	t.Helper()
	cx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ls, err := c.Leases(cx)
	if err != nil {
		t.Fatal(err)
	}
	return len(ls.Leases)
}

// batchCollector drains a channel of event batches until the end of the
// test and keeps every batch.
type batchCollector[T any] struct {
	mu      sync.Mutex
	batches [][]T
}

func collectBatches[T any](t *testing.T, ch <-chan []T) *batchCollector[T] {
	c := &batchCollector[T]{}
	done := make(chan struct{})
	cx, cancel := context.WithCancel(context.Background())
	go func() {
		defer close(done)
		for {
			select {
			case b := <-ch:
				c.mu.Lock()
				c.batches = append(c.batches, b)
				c.mu.Unlock()
			case <-cx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

// events returns the events of every batch, in order.
func (c *batchCollector[T]) events() []T {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []T
	for _, b := range c.batches {
		out = append(out, b...)
	}
	return out
}

func (c *batchCollector[T]) nbatches() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.batches)
}

// collector keeps the lease events of a channel.
type collector struct{ *batchCollector[subnet.Event] }

func collect(t *testing.T, ch <-chan []subnet.Event) *collector {
	return &collector{collectBatches(t, ch)}
}

// runUntilEnd runs run until the end of the test and fails the test if it
// returns an error (what names it).
func runUntilEnd(t *testing.T, what string, run func(context.Context) error) {
	cx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(cx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: %v", what, err)
		}
	})
}

// count returns how many events of type typ there were for subnet s.
func (c *collector) count(typ subnet.EventType, s string) int {
	n := 0
	for _, e := range c.events() {
		if e.Type == typ && e.Lease.Subnet.String() == s {
			n++
		}
	}
	return n
}

// wantAddedOnce checks that each of subnets was added exactly once.
func (c *collector) wantAddedOnce(t *testing.T, subnets ...string) {
	t.Helper()
	for _, s := range subnets {
		if n := c.count(subnet.EventAdded, s); n != 1 {
			t.Errorf("%s added %d times, want once", s, n)
		}
	}
}

// state applies all events and returns the resulting set of subnets.
func (c *collector) state() map[string]subnet.Lease {
	m := map[string]subnet.Lease{}
	for _, e := range c.events() {
		if e.Type == subnet.EventAdded {
			m[e.Lease.Subnet.String()] = e.Lease
		} else {
			delete(m, e.Lease.Subnet.String())
		}
	}
	return m
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// watch runs r.WatchLeases until the end of the test.
func watch(t *testing.T, r subnet.Registry) *collector {
	ch := make(chan []subnet.Event)
	c := collect(t, ch)
	runUntilEnd(t, "WatchLeases", func(cx context.Context) error { return r.WatchLeases(cx, ch) })
	return c
}
