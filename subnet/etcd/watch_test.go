package etcd

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func otherValue(i int) string {
	return fmt.Sprintf(`{"PublicIP":"192.0.2.%d","PublicIPv6":null}`, i)
}

func TestWatchSnapshotThenChangesInOrder(t *testing.T) {
	s := etcdtest.Start(t)
	c := s.Client()
	prefix := testPrefix(t)
	putLease(t, c, prefix, "198.18.1.0-24", otherValue(101), 600)
	putLease(t, c, prefix, "198.18.2.0-24", otherValue(102), 0)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	w := watch(t, r)
	eventually(t, 10*time.Second, "snapshot", func() bool { return w.nbatches() >= 1 })
	w.mu.Lock()
	snap := w.batches[0]
	w.mu.Unlock()
	if len(snap) != 2 || snap[0].Type != subnet.EventAdded || snap[1].Type != subnet.EventAdded ||
		snap[0].Lease.Subnet.String() != "198.18.1.0/24" || snap[0].Lease.Reservation || snap[0].Lease.LeaseID == 0 ||
		snap[1].Lease.Subnet.String() != "198.18.2.0/24" || !snap[1].Lease.Reservation {
		t.Fatalf("snapshot %+v", snap)
	}
	putLease(t, c, prefix, "198.18.3.0-24", otherValue(103), 600)
	putLease(t, c, prefix, "198.18.2.0-24", otherValue(122), 0)
	if _, err := c.Delete(ctx(t), prefix+"/subnets/198.18.1.0-24"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "three changes", func() bool { return len(w.events()) == 5 })
	ev := w.events()[2:]
	if ev[0].Type != subnet.EventAdded || ev[0].Lease.Subnet.String() != "198.18.3.0/24" ||
		ev[1].Type != subnet.EventAdded || ev[1].Lease.Attrs.PublicIP.String() != "192.0.2.122" ||
		ev[2].Type != subnet.EventRemoved || ev[2].Lease.Subnet.String() != "198.18.1.0/24" || ev[2].Lease.Attrs.PublicIP.String() != "192.0.2.101" {
		t.Errorf("events %+v", ev)
	}
	if st := r.Status(); !st.Connected || st.WatchRevision == 0 || st.WatchAttempts != 1 {
		t.Errorf("status %+v", st)
	}
}

func TestWatchSurvivesEtcdRestartWithoutLossOrDuplicates(t *testing.T) {
	t.Parallel()
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16"}`)
	for i := 201; i <= 203; i++ {
		putLease(t, c, prefix, fmt.Sprintf("198.18.%d.0-24", i), otherValue(i), 600)
	}
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	// etcd's graceful stop serves open streams for about 5s, while its
	// leases still run out: the TTL outlasts that, and renewals (every 5s)
	// fail during the outage.
	m, _, own := startManager(t, r, subnet.ManagerOptions{LeaseTTL: 10 * time.Second})
	w, done := runManager(t, m)
	eventually(t, 10*time.Second, "snapshot of 4 leases", func() bool { return len(w.state()) == 4 })

	s.Stop()
	attemptsBefore := r.Status().WatchAttempts
	outage := time.Now()
	// A renewal falls into the outage (they come every 5s) and fails with
	// the cause; the watch retries meanwhile.
	wantDetail := "waiting for etcd at " + s.Endpoint() + ": connection refused"
	var st subnet.ManagerStatus
	eventually(t, 20*time.Second, "a failed renewal naming the cause, and a watch retry", func() bool {
		st = m.Status()
		return !st.Registry.Connected && st.Registry.Detail == wantDetail && st.RenewFailures > 0 && st.LastRenewError != nil &&
			strings.Contains(st.LastRenewError.Error(), "renew lease "+own.Subnet.String()+": "+wantDetail) &&
			st.Phase == subnet.PhaseRenewalFailing && r.Status().WatchAttempts > attemptsBefore
	})
	elapsed := time.Since(outage)
	attemptsDuring := r.Status().WatchAttempts - attemptsBefore
	t.Logf("outage of %s: %d watch attempts, %d renewal attempts", elapsed.Round(time.Millisecond), attemptsDuring, st.RenewFailures)
	// Capped exponential backoff (100ms doubling to 2s here): about one
	// attempt per second at most.
	if limit := 4 + uint64(elapsed/time.Second); attemptsDuring > limit {
		t.Errorf("%d watch attempts in a %s outage, want at most %d (capped exponential backoff)", attemptsDuring, elapsed.Round(time.Millisecond), limit)
	}

	s.Start() // same data directory and ports
	c2 := s.Client()
	for i := 211; i <= 213; i++ {
		putLease(t, c2, prefix, fmt.Sprintf("198.18.%d.0-24", i), otherValue(i), 600)
	}
	if _, err := c2.Delete(ctx(t), prefix+"/subnets/198.18.201.0-24"); err != nil {
		t.Fatal(err)
	}
	want := []string{own.Subnet.String(), "198.18.202.0/24", "198.18.203.0/24", "198.18.211.0/24", "198.18.212.0/24", "198.18.213.0/24"}
	eventually(t, 20*time.Second, "the leases made after the restart", func() bool {
		got := w.state()
		if len(got) != len(want) {
			return false
		}
		for _, k := range want {
			if _, ok := got[k]; !ok {
				return false
			}
		}
		return true
	})
	eventually(t, 10*time.Second, "connected again", func() bool { return m.Status().Registry.Connected })
	// A last change: anything the watch would send twice comes before it.
	putLease(t, c2, prefix, "198.18.214.0-24", otherValue(214), 600)
	eventually(t, 10*time.Second, "the last change", func() bool { return w.count(subnet.EventAdded, "198.18.214.0/24") == 1 })
	w.wantAddedOnce(t, want...)
	if a, rm := w.count(subnet.EventAdded, "198.18.201.0/24"), w.count(subnet.EventRemoved, "198.18.201.0/24"); a != 1 || rm != 1 {
		t.Errorf("198.18.201.0/24 added %d and removed %d times, want once each", a, rm)
	}
	if st := m.Status(); !st.LeaseHeld || st.Lease.Subnet != own.Subnet || st.Lease.LeaseID != own.LeaseID {
		t.Errorf("after the outage: %+v, want the same lease %s on etcd lease %x", st, own.Subnet, own.LeaseID)
	}
	if total, limit := r.Status().WatchAttempts-attemptsBefore, 6+uint64(time.Since(outage)/time.Second); total > limit {
		t.Errorf("%d watch attempts for one outage of %s, want at most %d", total, time.Since(outage).Round(time.Millisecond), limit)
	}
	wantRunning(t, done)
}

func TestWatchAfterCompactionSendsTheExactDiff(t *testing.T) {
	t.Parallel()
	s := etcdtest.Start(t)
	c := s.Client()
	prefix := testPrefix(t)
	for i := 1; i <= 3; i++ {
		putLease(t, c, prefix, fmt.Sprintf("198.18.%d.0-24", i), otherValue(100+i), 0)
	}
	p := etcdtest.NewProxy(t, s.Addr())
	lg, logs := testLogger(t)
	r := newRegistry(t, p.Endpoint(), prefix, lg)
	w := watch(t, r)
	eventually(t, 10*time.Second, "snapshot", func() bool { return len(w.state()) == 3 })
	snapshotEvents := len(w.events())
	watchedAt := r.Status().WatchRevision

	p.Cut() // the watcher is cut off from etcd...
	eventually(t, 10*time.Second, "the watcher to notice", func() bool { return !r.Status().Connected })
	// ...while others change the leases and etcd compacts past the watcher.
	if _, err := c.Delete(ctx(t), prefix+"/subnets/198.18.2.0-24"); err != nil {
		t.Fatal(err)
	}
	putLease(t, c, prefix, "198.18.3.0-24", otherValue(133), 0)
	putLease(t, c, prefix, "198.18.4.0-24", otherValue(104), 0)
	putLease(t, c, prefix, "198.18.5.0-24", otherValue(105), 0)
	if _, err := c.Delete(ctx(t), prefix+"/subnets/198.18.5.0-24"); err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get(ctx(t), "/")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Compact(ctx(t), resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	if resp.Header.Revision <= watchedAt {
		t.Fatalf("compacted at %d, not past the watcher's %d", resp.Header.Revision, watchedAt)
	}
	p.Heal()

	eventually(t, 20*time.Second, "the diff", func() bool { return len(w.events()) > snapshotEvents })
	// And the watch goes on from there; anything sent twice or late comes
	// before this change.
	putLease(t, c, prefix, "198.18.6.0-24", otherValue(106), 0)
	eventually(t, 10*time.Second, "a change after the re-list", func() bool {
		_, ok := w.state()[netip.MustParsePrefix("198.18.6.0/24").String()]
		return ok
	})
	diff := w.events()[snapshotEvents:]
	var got []string
	for _, e := range diff {
		got = append(got, fmt.Sprintf("%d %s %s", e.Type, e.Lease.Subnet, e.Lease.Attrs.PublicIP))
	}
	want := []string{
		fmt.Sprintf("%d 198.18.2.0/24 192.0.2.102", subnet.EventRemoved),
		fmt.Sprintf("%d 198.18.3.0/24 192.0.2.133", subnet.EventAdded),
		fmt.Sprintf("%d 198.18.4.0/24 192.0.2.104", subnet.EventAdded),
		fmt.Sprintf("%d 198.18.6.0/24 192.0.2.106", subnet.EventAdded),
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("diff after compaction, then one change:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if !strings.Contains(logs.String(), "compacted") {
		t.Error("the re-list after compaction was not logged")
	}
}

func TestConnectionLossShowsAtOnceAndItsEndIsLoggedOnce(t *testing.T) {
	t.Parallel()
	s := etcdtest.Start(t)
	p := etcdtest.NewProxy(t, s.Addr())
	lg, logs := testLogger(t)
	r := newRegistry(t, p.Endpoint(), testPrefix(t), lg)
	w := watch(t, r)
	eventually(t, 10*time.Second, "snapshot", func() bool { return w.nbatches() >= 1 && r.Status().WatchDownSince.IsZero() })

	cut := time.Now() // before the cut: the watch may notice while Cut returns
	p.Cut()           // etcd gone: its connections closed, new ones refused
	// The watch alone would notice after its progress probe went
	// unanswered (2 × DialTimeout); the connection's state shows it now.
	eventually(t, time.Second, "not connected", func() bool { return !r.Status().Connected })
	t.Logf("connection loss shown after %s", time.Since(cut).Round(time.Millisecond))
	if st := r.Status(); st.Detail != "waiting for etcd at "+p.Endpoint()+": connection refused" {
		t.Errorf("detail %q", st.Detail)
	}
	eventually(t, 5*time.Second, "the watch down", func() bool { return !r.Status().WatchDownSince.IsZero() })
	if d := r.Status().WatchDownSince; d.Before(cut) {
		t.Errorf("watch down since %s, before the cut at %s", d, cut)
	}

	p.Heal()
	eventually(t, 10*time.Second, "connected again with the watch up", func() bool {
		st := r.Status()
		return st.Connected && st.WatchDownSince.IsZero()
	})
	// More successful calls do not log it again.
	if _, _, err := r.GetKey(ctx(t), "config"); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(logs.String(), `msg="etcd reachable again"`); n != 1 {
		t.Errorf(`"etcd reachable again" logged %d times, want once`, n)
	}
	if !strings.Contains(logs.String(), "down_for=") {
		t.Error("the outage's length was not logged")
	}
	if n := strings.Count(logs.String(), `msg="etcd unreachable"`); n != 1 {
		t.Errorf(`"etcd unreachable" logged %d times, want once`, n)
	}
}
