package etcd

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// churn writes one new lease key every interval (another host coming up)
// until stopped, retrying a key until etcd confirms it, and remembers when
// each was confirmed.
type churn struct {
	mu      sync.Mutex
	written []string    // subnets, in order
	at      []time.Time // when each was confirmed
	cancel  context.CancelFunc
	done    chan struct{}
}

func startChurn(t *testing.T, c *clientv3.Client, prefix string, interval time.Duration) *churn {
	ch := &churn{done: make(chan struct{})}
	cx, cancel := context.WithCancel(context.Background())
	ch.cancel = cancel
	go func() {
		defer close(ch.done)
		for i := 0; ; i++ {
			// /28s in 198.19.0.0/16, away from the managers' network.
			s := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(i / 16), byte(i % 16 * 16)}), 28)
			key := fmt.Sprintf("%s/subnets/%s-28", prefix, s.Addr())
			for {
				pctx, pcancel := context.WithTimeout(cx, 2*time.Second)
				_, err := c.Put(pctx, key, otherValue(200+i%50))
				pcancel()
				if err == nil {
					break
				}
				// A put that failed may still have been applied: the same
				// value again must not be a second event.
				if cx.Err() != nil {
					return
				}
			}
			ch.mu.Lock()
			ch.written, ch.at = append(ch.written, s.String()), append(ch.at, time.Now())
			ch.mu.Unlock()
			select {
			case <-cx.Done():
				return
			case <-time.After(interval):
			}
		}
	}()
	t.Cleanup(ch.stop)
	return ch
}

func (ch *churn) stop() {
	ch.cancel()
	<-ch.done
}

// firstAfter returns the first subnet confirmed after t0 and when ("" if
// none yet).
func (ch *churn) firstAfter(t0 time.Time) (string, time.Time) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for i, at := range ch.at {
		if at.After(t0) {
			return ch.written[i], at
		}
	}
	return "", time.Time{}
}

// continued measures, from t0, how long until m renewed its lease and the
// watch delivered a change made after t0.
func continued(t *testing.T, what string, t0 time.Time, m *subnet.Manager, w *collector, ch *churn, ttl time.Duration) {
	t.Helper()
	var renewed, watched, written time.Duration
	eventually(t, 20*time.Second, what+": a renewal and a watched change after it", func() bool {
		if renewed == 0 && m.Status().Lease.Expiration.After(t0.Add(ttl)) {
			renewed = time.Since(t0)
		}
		if s, at := ch.firstAfter(t0); watched == 0 && s != "" && w.count(subnet.EventAdded, s) > 0 {
			watched, written = time.Since(t0), at.Sub(t0)
		}
		return renewed > 0 && watched > 0
	})
	t.Logf("%s: lease renewed after %s; the first change etcd confirmed after it (at %s) was watched at %s",
		what, renewed.Round(time.Millisecond), written.Round(time.Millisecond), watched.Round(time.Millisecond))
}

// TestClusterLeaderKillAndMemberOutageLoseNothing runs two hosts against a
// 3-member cluster, one renewing a 2s lease every second, while another
// host's leases keep coming: the leader is killed, later another member is
// stopped for 30s and brought back. Renewal and watch go on through both,
// nothing is restarted, and every change reaches both hosts exactly once.
func TestClusterLeaderKillAndMemberOutageLoseNothing(t *testing.T) {
	t.Parallel()
	c := etcdtest.StartCluster(t, 3, etcdtest.Options{})
	cli := c.Client()
	prefix := testPrefix(t)
	putConfig(t, cli, prefix, `{"Network":"198.18.0.0/16"}`)
	newReg := func() *Registry {
		lg, _ := testLogger(t)
		r, err := New(Config{Endpoints: c.Endpoints(), Prefix: prefix, DialTimeout: time.Second}, lg)
		if err != nil {
			t.Fatal(err)
		}
		r.backoffMax = 2 * time.Second
		t.Cleanup(func() { r.Close() })
		return r
	}
	const ttl = 2 * time.Second
	m1, _, own1 := startManager(t, newReg(), subnet.ManagerOptions{LeaseTTL: ttl, PublicIP: netip.MustParseAddr("192.0.2.1")})
	m2, _, own2 := startManager(t, newReg(), subnet.ManagerOptions{LeaseTTL: time.Minute, PublicIP: netip.MustParseAddr("192.0.2.2")})
	w1, done1 := runManager(t, m1)
	w2, done2 := runManager(t, m2)
	for _, w := range []*collector{w1, w2} {
		eventually(t, 10*time.Second, "both hosts' leases", func() bool {
			st := w.state()
			_, a := st[own1.Subnet.String()]
			_, b := st[own2.Subnet.String()]
			return a && b
		})
	}
	ch := startChurn(t, cli, prefix, 100*time.Millisecond)

	leader := c.Leader(10 * time.Second)
	killed := time.Now()
	c.Members[leader].Kill()
	t.Logf("killed the leader, member %s", c.Members[leader].Name())
	continued(t, "after the leader was killed", killed, m1, w1, ch, ttl)
	c.Members[leader].Start()

	victim := c.Leader(10 * time.Second) // the new leader
	c.Members[victim].Stop()
	stopped := time.Now()
	t.Logf("stopped member %s for 30s", c.Members[victim].Name())
	continued(t, "after a member was stopped", stopped, m1, w1, ch, ttl)
	time.Sleep(30*time.Second - time.Since(stopped)) // the outage is the test
	c.Members[victim].Start()
	back := time.Now()
	continued(t, "after the member came back", back, m1, w1, ch, ttl)
	ch.stop()

	// Every change reached both hosts exactly once; no lease was lost.
	ch.mu.Lock()
	written := append([]string(nil), ch.written...)
	ch.mu.Unlock()
	last := written[len(written)-1]
	for i, w := range []*collector{w1, w2} {
		eventually(t, 10*time.Second, "the last change", func() bool { return w.count(subnet.EventAdded, last) == 1 })
		for _, s := range written {
			if n := w.count(subnet.EventAdded, s); n != 1 {
				t.Errorf("host %d: %s added %d times, want once", i+1, s, n)
			}
		}
		for _, e := range w.events() {
			if e.Type == subnet.EventRemoved {
				t.Errorf("host %d: %s removed", i+1, e.Lease.Subnet)
			}
		}
	}
	t.Logf("%d changes while the cluster lost its leader and a member, each seen once by both hosts", len(written))
	for i, tc := range []struct {
		m   *subnet.Manager
		own subnet.Lease
	}{{m1, own1}, {m2, own2}} {
		if st := tc.m.Status(); !st.LeaseHeld || st.Lease.LeaseID != tc.own.LeaseID || st.Phase != subnet.PhaseHolding {
			t.Errorf("host %d: %+v, want its lease %s held on etcd lease %x throughout", i+1, st, tc.own.Subnet, tc.own.LeaseID)
		}
	}
	for i, done := range []<-chan error{done1, done2} {
		select {
		case err := <-done:
			t.Errorf("host %d: Run returned %v", i+1, err)
		default:
		}
	}
}
