package udp

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
)

// scaleNet is a network of many small leases: the shape of issue 14, and
// the shape of the largest network a config allows (a /8 in /30s).
type scaleNet struct {
	network   string
	subnetLen int
}

var (
	scale15 = scaleNet{"198.18.0.0/15", 30} // 32,768 subnets
	scale8  = scaleNet{"198.0.0.0/8", 30}   // 4,194,304 subnets: in memory only, never on a link
)

// scaleLeases returns n distinct random subnets of sn other than its first
// (our own lease) and a distinct fake PublicIP for each (198.19.0.0/16 and
// up: never sent anything).
func scaleLeases(sn scaleNet, n int, seed uint64) []subnet.Event {
	network := netip.MustParsePrefix(sn.network)
	net32, _ := proto.AddrUint32(network.Addr())
	subnets := 1 << (sn.subnetLen - network.Bits())
	r := rand.New(rand.NewPCG(seed, uint64(n)))
	seen := map[int]bool{0: true}
	evs := make([]subnet.Event, 0, n)
	for len(evs) < n {
		k := r.IntN(subnets)
		if seen[k] {
			continue
		}
		seen[k] = true
		evs = append(evs, subnet.Event{Type: subnet.EventAdded, Lease: subnet.Lease{
			Subnet: netip.PrefixFrom(proto.Uint32Addr(net32+uint32(k)<<(32-sn.subnetLen)), sn.subnetLen),
			Attrs:  subnet.LeaseAttrs{PublicIP: proto.Uint32Addr(addr32("198.19.0.1") + uint32(len(evs)))},
		}})
	}
	return evs
}

// scaleBackend is a backend of sn (2 workers) holding the n leases evs.
func scaleBackend(b testing.TB, sn scaleNet, evs []subnet.Event) *Backend {
	network := netip.MustParsePrefix(sn.network)
	own := netip.PrefixFrom(network.Addr(), sn.subnetLen)
	be := newPureBackend(b, sn.network, sn.subnetLen, own.String(), 2)
	be.Apply(evs)
	return be
}

func asRemoved(evs []subnet.Event) []subnet.Event {
	out := make([]subnet.Event, len(evs))
	for i, ev := range evs {
		out[i] = subnet.Event{Type: subnet.EventRemoved, Lease: ev.Lease}
	}
	return out
}

// BenchmarkApplyOneChange is the control side's cost of one lease change
// (a lease removed, or added back: alternately) at 1,000 to 30,000 leases.
// It should not grow with the leases.
func BenchmarkApplyOneChange(b *testing.B) {
	for _, c := range []struct {
		sn scaleNet
		n  int
	}{{scale15, 1000}, {scale15, 10000}, {scale15, 30000}, {scale8, 10000}} {
		b.Run(fmt.Sprintf("%s/%d/leases=%d", c.sn.network, c.sn.subnetLen, c.n), func(b *testing.B) {
			evs := scaleLeases(c.sn, c.n, 1)
			be := scaleBackend(b, c.sn, evs)
			gone := asRemoved(evs)
			r := rand.New(rand.NewPCG(2, 3))
			b.ReportAllocs()
			for b.Loop() {
				k := r.IntN(len(evs))
				be.Apply(gone[k : k+1])
				be.Apply(evs[k : k+1])
			}
			// Two changes per iteration.
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(2*b.N), "ns/change")
		})
	}
}

// BenchmarkApplyBurst5000Deletions is a rack gone at once: one batch of
// 5,000 lease deletions (timed), then the leases come back (not timed).
func BenchmarkApplyBurst5000Deletions(b *testing.B) {
	for _, c := range []struct {
		sn scaleNet
		n  int
	}{{scale15, 10000}, {scale15, 30000}, {scale8, 10000}} {
		b.Run(fmt.Sprintf("%s/%d/leases=%d", c.sn.network, c.sn.subnetLen, c.n), func(b *testing.B) {
			evs := scaleLeases(c.sn, c.n, 1)
			be := scaleBackend(b, c.sn, evs)
			burst := asRemoved(evs[:5000])
			b.ReportAllocs()
			for b.Loop() {
				be.Apply(burst)
				b.StopTimer()
				be.Apply(evs[:5000])
				b.StartTimer()
			}
		})
	}
}

// BenchmarkLookupSparse is the lookup in the largest network a config
// allows, 10,000 leases spread over its 4 million subnets, destinations
// spread over the leases (each lookup misses the CPU caches more often
// than in BenchmarkLookup).
func BenchmarkLookupSparse(b *testing.B) {
	evs := scaleLeases(scale8, 10000, 1)
	tb := scaleBackend(b, scale8, evs).table.Load()
	dsts := make([]uint32, 4096)
	r := rand.New(rand.NewPCG(4, 5))
	for i := range dsts {
		a, _ := proto.AddrUint32(evs[r.IntN(len(evs))].Lease.Subnet.Addr())
		dsts[i] = a + uint32(r.IntN(4))
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if tb.lookup(dsts[i&4095]) == nil {
			b.Fatal("miss")
		}
		i++
	}
}
