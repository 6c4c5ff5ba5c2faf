package udp

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
)

// contents is what a table routes: subnet -> PublicIP of its peer.
func contents(tb *table) map[netip.Prefix]netip.Addr {
	m := map[netip.Prefix]netip.Addr{}
	for p := range tb.all() {
		if _, dup := m[p.subnet]; dup {
			panic(fmt.Sprintf("subnet %v twice in the table", p.subnet))
		}
		m[p.subnet] = p.addr.Addr()
	}
	return m
}

// checkTable compares tb with the leases of the model: every lease is
// routed to its peer over its whole range, the other subnets of pool are
// not routed, the senders are exactly the model's PublicIPs, and the
// control side agrees.
func checkTable(t *testing.T, b *Backend, tb *table, model map[netip.Prefix]netip.Addr, pool []netip.Prefix, publics []netip.Addr) {
	t.Helper()
	if got := contents(tb); !maps.Equal(got, model) {
		t.Fatalf("table holds %d leases, model %d; they differ", len(got), len(model))
	}
	if tb.count != len(model) || len(b.ctl.peers) != len(model) {
		t.Fatalf("count %d, control %d, want %d", tb.count, len(b.ctl.peers), len(model))
	}
	// Every counter index is held by one live peer, or free, or retired:
	// none shared, none lost.
	owner := map[int]string{}
	claim := func(i int, by string) {
		if prev, dup := owner[i]; dup {
			t.Fatalf("counter index %d held by %s and %s", i, prev, by)
		}
		owner[i] = by
	}
	for s, p := range b.ctl.peers {
		claim(p.index, s.String())
	}
	for _, i := range b.ctl.free {
		claim(i, "the free list")
	}
	for _, r := range b.ctl.retired {
		for _, i := range r.indices {
			claim(i, "the retired")
		}
	}
	if len(owner) != b.ctl.next {
		t.Fatalf("%d counter indices accounted for, %d handed out", len(owner), b.ctl.next)
	}
	holders := map[netip.Addr]bool{}
	for s, pub := range model {
		holders[pub] = true
		first, _ := proto.AddrUint32(s.Addr())
		last := first | (1<<(32-s.Bits()) - 1)
		for _, a := range []uint32{first, last} {
			if p := tb.lookup(a); p == nil || p.subnet != s || p.addr.Addr() != pub || p != b.ctl.peers[s] {
				t.Fatalf("lookup(%v) = %v, want the peer of %v at %v", proto.Uint32Addr(a), p, s, pub)
			}
		}
	}
	for _, s := range pool {
		if _, ok := model[s]; !ok {
			a, _ := proto.AddrUint32(s.Addr())
			if p := tb.lookup(a + 1); p != nil {
				t.Fatalf("lookup(%v) = peer of %v, want none (no lease)", proto.Uint32Addr(a+1), p.subnet)
			}
		}
	}
	for _, pub := range publics {
		if tb.isSender(pub) != holders[pub] {
			t.Fatalf("isSender(%v) = %v, want %v", pub, !holders[pub], holders[pub])
		}
	}
}

// TestTableEqualsTheLeasesAfterRandomChurn applies random batches (leases
// added, renewed, moved to another PublicIP, removed, removed twice, bursts
// of thousands of removals, PublicIPs shared by two leases) and after every
// batch compares the table with a model of the leases. It also checks that
// a published table never changes: the data path may still hold one.
func TestTableEqualsTheLeasesAfterRandomChurn(t *testing.T) {
	for _, c := range []struct {
		network   string
		subnetLen int
		pool      int
	}{
		{"198.18.0.0/16", 24, 255},  // small and dense
		{"198.18.0.0/15", 30, 6000}, // 32,768 subnets
		{"198.0.0.0/8", 30, 6000},   // 4 million subnets, leases spread thinly (in memory only)
	} {
		t.Run(fmt.Sprintf("%s in /%d", c.network, c.subnetLen), func(t *testing.T) {
			r := rand.New(rand.NewPCG(uint64(c.subnetLen), uint64(c.pool)))
			network := netip.MustParsePrefix(c.network)
			own := netip.PrefixFrom(network.Addr(), c.subnetLen)
			b := newPureBackend(t, c.network, c.subnetLen, own.String(), 2)
			var pool []netip.Prefix
			for _, ev := range scaleLeases(scaleNet{c.network, c.subnetLen}, c.pool, 9) {
				pool = append(pool, ev.Lease.Subnet)
			}
			pool = append(pool, own) // our own lease: never a peer
			publics := make([]netip.Addr, c.pool/2)
			for i := range publics {
				publics[i] = proto.Uint32Addr(addr32("198.19.0.1") + uint32(i))
			}
			event := func(typ subnet.EventType, s netip.Prefix, pub netip.Addr) subnet.Event {
				return subnet.Event{Type: typ, Lease: subnet.Lease{Subnet: s, Attrs: subnet.LeaseAttrs{PublicIP: pub}}}
			}
			model := map[netip.Prefix]netip.Addr{}
			maxPeers := 0
			for round := range 150 {
				before := b.table.Load()
				beforeContents := contents(before)
				n := 1 + r.IntN(40)
				if round%50 == 25 {
					n = len(pool) // a burst
				}
				var batch []subnet.Event
				for range n {
					s := pool[r.IntN(len(pool))]
					cur, held := model[s]
					switch k := r.IntN(10); {
					case round%50 == 25 && held: // the burst removes all
						batch = append(batch, event(subnet.EventRemoved, s, cur))
						delete(model, s)
					case round%50 == 25:
					case k < 5: // added, or moved to another PublicIP
						pub := publics[r.IntN(len(publics))]
						batch = append(batch, event(subnet.EventAdded, s, pub))
						if s != own {
							model[s] = pub
						}
					case k < 6 && held: // renewed
						batch = append(batch, event(subnet.EventAdded, s, cur))
					default: // removed (also when absent)
						batch = append(batch, event(subnet.EventRemoved, s, cur))
						delete(model, s)
					}
				}
				b.Apply(batch)
				checkTable(t, b, b.table.Load(), model, pool, publics)
				maxPeers = max(maxPeers, len(model))
				if !maps.Equal(contents(before), beforeContents) {
					t.Fatalf("round %d: Apply changed the table published before it", round)
				}
			}
			// Indices are reused: no more than the most peers at once, and
			// the peers one batch replaced.
			if b.ctl.next > maxPeers+len(pool)/2 {
				t.Errorf("%d counter indices handed out for at most %d peers at once", b.ctl.next, maxPeers)
			}
			// Emptied, the table keeps no page or node: memory follows the
			// leases.
			var batch []subnet.Event
			for s, pub := range model {
				batch = append(batch, event(subnet.EventRemoved, s, pub))
			}
			b.Apply(batch)
			tb := b.table.Load()
			for i, nd := range tb.v4.top {
				if nd != emptyNode {
					t.Fatalf("empty table keeps node %d", i)
				}
			}
			for i, nd := range tb.senders.top {
				if nd == nil {
					continue
				}
				for j, bucket := range nd {
					if len(bucket) != 0 {
						t.Fatalf("empty table keeps senders %v in bucket %d/%d", bucket, i, j)
					}
				}
			}
		})
	}
}

// TestSurvivingPeersAreNeverMissingDuringChurn: loops that load the table
// while Apply churns other leases (single changes, a burst of 5,000
// removals, 5,000 additions) always find every peer that stays, as the
// same peer, and its PublicIP as a sender; run with -race.
func TestSurvivingPeersAreNeverMissingDuringChurn(t *testing.T) {
	evs := scaleLeases(scale15, 6500, 11)
	stable, churn := evs[:500], evs[500:]
	b := scaleBackend(t, scale15, stable)
	tb := b.table.Load()
	type want struct {
		addr   uint32
		public netip.Addr
		p      *peer
	}
	var wants []want
	for _, ev := range stable {
		a, _ := proto.AddrUint32(ev.Lease.Subnet.Addr())
		wants = append(wants, want{a + 2, ev.Lease.Attrs.PublicIP, tb.lookup(a + 2)})
	}

	var (
		stop    atomic.Bool
		wg      sync.WaitGroup
		loads   atomic.Int64
		failure atomic.Pointer[string]
	)
	for _, w := range b.workers {
		wg.Go(func() {
			s := w.tx.stats
			for !stop.Load() {
				s.enterStep()
				tb := b.table.Load()
				for _, x := range wants {
					if p := tb.lookup(x.addr); p != x.p || !tb.isSender(x.public) {
						msg := fmt.Sprintf("surviving peer at %v: lookup %v, sender %v", proto.Uint32Addr(x.addr), p, tb.isSender(x.public))
						failure.CompareAndSwap(nil, &msg)
					}
				}
				for p := range tb.all() {
					s.peer(p.index).packets.Add(1) // counters of every peer, as a loop would
				}
				s.leaveStep()
				loads.Add(1)
			}
		})
	}
	// Wait for the loops to run before churning, and after each phase.
	waitLoads := func(n int64) {
		for target := loads.Load() + n; loads.Load() < target && failure.Load() == nil; {
			runtime.Gosched()
		}
	}
	waitLoads(2)
	for i, ev := range churn[:1000] {
		b.Apply([]subnet.Event{ev})
		if i%2 == 1 {
			b.Apply(asRemoved(churn[i-1 : i]))
		}
	}
	waitLoads(2)
	b.Apply(churn[1000:6000])
	waitLoads(2)
	b.Apply(asRemoved(churn[1000:6000]))
	waitLoads(2)
	stop.Store(true)
	wg.Wait()
	if msg := failure.Load(); msg != nil {
		t.Fatal(*msg)
	}
	if n := b.table.Load().count; n != 500+500 {
		t.Fatalf("%d peers after churn, want 1000", n)
	}
}

// TestTableMemoryFollowsTheLeasesNotTheNetwork: in the largest network a
// config allows, a /8 in /30s (4,194,304 subnets), 10,000 leases cost a few
// MiB (a dense table of one pointer per subnet cost 32 MiB, twice during a
// swap), and one lease change allocates KiB, not a table.
func TestTableMemoryFollowsTheLeasesNotTheNetwork(t *testing.T) {
	evs := scaleLeases(scale8, 10000, 1)
	gone := asRemoved(evs)
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	h0 := heap()
	b := scaleBackend(t, scale8, evs)
	h1 := heap()
	t.Logf("backend with 10,000 leases in %s/%d: %.1f MiB of heap", scale8.network, scale8.subnetLen, float64(h1-h0)/(1<<20))
	if h1-h0 > 16<<20 {
		t.Errorf("backend with 10,000 leases holds %.1f MiB, want <= 16 MiB", float64(h1-h0)/(1<<20))
	}

	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	const changes = 200
	for i := range changes / 2 {
		b.Apply(gone[i : i+1])
		b.Apply(evs[i : i+1])
	}
	runtime.ReadMemStats(&m1)
	perChange := (m1.TotalAlloc - m0.TotalAlloc) / changes
	t.Logf("one lease change allocates %d bytes", perChange)
	if perChange > 64<<10 {
		t.Errorf("one lease change allocates %d KiB, want <= 64 KiB", perChange>>10)
	}
	runtime.KeepAlive(b)
}
