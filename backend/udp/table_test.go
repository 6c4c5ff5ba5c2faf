package udp

import (
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
)

// newPureBackend builds a Backend with its control side, route table, loops
// and counters but no device and no sockets, for tests of the pure parts.
func newPureBackend(t testing.TB, network string, subnetLen int, own string, workers int, mods ...func(*Options)) *Backend {
	t.Helper()
	opts := Options{
		Network:   netip.MustParsePrefix(network),
		SubnetLen: subnetLen,
		Lease:     subnet.Lease{Subnet: netip.MustParsePrefix(own)},
		PublicIP:  netip.MustParseAddr("192.0.2.1"),
		MTU:       1400,
		Workers:   workers,
		Logger:    slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	for _, m := range mods {
		m(&opts)
	}
	if err := checkOptions(&opts); err != nil {
		t.Fatal(err)
	}
	b := &Backend{opts: opts, log: opts.Logger}
	b.ownPartial.Store(true) // a Tulle host
	b.prober = &mtuProber{b: b, fd: -1, fd6: -1, wake: make(chan struct{}, 1)}
	b.ctl.init()
	b.table.Store(newTableFor(&opts))
	for i := range workers {
		w := &worker{id: i, b: b}
		w.tx.init(w, true, 64)
		w.rx.init(w, nil, true, true)
		b.workers = append(b.workers, w)
		b.stats = append(b.stats, w.tx.stats, w.rx.stats)
	}
	return b
}

func added(subnetStr, public string) subnet.Event {
	return subnet.Event{Type: subnet.EventAdded, Lease: subnet.Lease{
		Subnet: netip.MustParsePrefix(subnetStr),
		Attrs:  subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(public)},
	}}
}

func removed(subnetStr, public string) subnet.Event {
	ev := added(subnetStr, public)
	ev.Type = subnet.EventRemoved
	return ev
}

func addr32(s string) uint32 {
	v, ok := proto.AddrUint32(netip.MustParseAddr(s))
	if !ok {
		panic(s)
	}
	return v
}

func TestLookupFindsTheLeaseHolderOfADestination(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{
		added("198.18.1.0/24", "192.0.2.1"), // own lease: not a peer
		added("198.18.2.0/24", "192.0.2.2"),
		added("198.18.255.0/24", "192.0.2.3"),
	})
	tb := b.table.Load()
	if tb.count != 2 {
		t.Fatalf("peers = %d, want 2", tb.count)
	}
	cases := map[string]string{
		"198.18.2.0":      "192.0.2.2:8285",
		"198.18.2.77":     "192.0.2.2:8285",
		"198.18.2.255":    "192.0.2.2:8285",
		"198.18.255.255":  "192.0.2.3:8285",
		"198.18.1.5":      "", // own lease
		"198.18.3.1":      "", // nobody's
		"198.19.0.1":      "", // above the network
		"198.17.255.255":  "", // below the network
		"0.0.0.0":         "",
		"255.255.255.255": "",
	}
	for dst, want := range cases {
		p := tb.lookup(addr32(dst))
		got := ""
		if p != nil {
			got = p.addr.String()
		}
		if got != want {
			t.Errorf("lookup(%s) = %q, want %q", dst, got, want)
		}
	}
	if !tb.isOwn(addr32("198.18.1.9")) || tb.isOwn(addr32("198.18.2.9")) {
		t.Error("isOwn wrong")
	}
	if !tb.isSender(netip.MustParseAddr("192.0.2.3")) || tb.isSender(netip.MustParseAddr("192.0.2.1")) || tb.isSender(netip.MustParseAddr("192.0.2.9")) {
		t.Error("isSender wrong")
	}
}

func TestLookupAgreesWithPrefixContainsOnRandomNetworks(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for round := 0; round < 200; round++ {
		bits := 8 + r.IntN(21)                             // /8 .. /28
		subnetLen := bits + 2 + r.IntN(min(31-bits-1, 12)) // at most 4096 subnets per round
		subnetLen = min(subnetLen, 30)
		network := netip.PrefixFrom(proto.Uint32Addr(r.Uint32()), bits).Masked()
		net32, _ := proto.AddrUint32(network.Addr())
		nSubnets := 1 << (subnetLen - bits)
		own := netip.PrefixFrom(proto.Uint32Addr(net32+uint32(r.IntN(nSubnets))<<(32-subnetLen)), subnetLen)
		b := newPureBackend(t, network.String(), subnetLen, own.String(), 1)
		var evs []subnet.Event
		leases := map[netip.Prefix]string{}
		for i := 0; i < 20; i++ {
			s := netip.PrefixFrom(proto.Uint32Addr(net32+uint32(r.IntN(nSubnets))<<(32-subnetLen)), subnetLen)
			pub := fmt.Sprintf("198.51.100.%d", i+1)
			evs = append(evs, added(s.String(), pub))
			if s != own {
				leases[s] = pub
			}
		}
		b.Apply(evs)
		tb := b.table.Load()
		for i := 0; i < 500; i++ {
			var a uint32
			if i%2 == 0 {
				a = net32 + uint32(r.IntN(1<<(32-bits)))
			} else {
				a = r.Uint32()
			}
			want := ""
			for s, pub := range leases {
				if s.Contains(proto.Uint32Addr(a)) {
					want = pub
				}
			}
			got := ""
			if p := tb.lookup(a); p != nil {
				got = p.addr.Addr().String()
			}
			if got != want {
				t.Fatalf("network %v /%d: lookup(%v) = %q, want %q", network, subnetLen, proto.Uint32Addr(a), got, want)
			}
		}
	}
}

func TestApplyKeepsPeerOnRenewalAndReplacesItOnNewPublicIP(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")})
	p1 := b.table.Load().lookup(addr32("198.18.2.1"))
	p1.innerMTU.Store(1200)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")}) // renewal
	if p := b.table.Load().lookup(addr32("198.18.2.1")); p != p1 || p.innerMTU.Load() != 1200 {
		t.Fatal("renewal replaced the peer or lost its path MTU")
	}
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.9")})
	p2 := b.table.Load().lookup(addr32("198.18.2.1"))
	if p2 == p1 || p2.addr.Addr() != netip.MustParseAddr("192.0.2.9") {
		t.Fatalf("new public IP not applied: %v", p2.addr)
	}
	b.Apply([]subnet.Event{removed("198.18.2.0/24", "192.0.2.9")})
	if p := b.table.Load().lookup(addr32("198.18.2.1")); p != nil || b.table.Load().count != 0 {
		t.Fatal("removed lease still routed")
	}
}

func TestApplyIgnoresLeasesThatDoNotFit(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{
		added("198.19.2.0/24", "192.0.2.2"),   // outside the network
		added("198.18.4.0/25", "192.0.2.3"),   // wrong length
		added("198.18.5.0/24", "2001:db8::1"), // no IPv4 public IP
		added("198.18.6.0/24", "192.0.2.1"),   // our own public IP
		added("198.18.7.0/24", "192.0.2.7"),   // fine
	})
	if n := b.table.Load().count; n != 1 {
		t.Fatalf("peers = %d, want 1", n)
	}
}

// txPackets is the transmit packet count the collector reports for a peer.
func txPackets(t *testing.T, b *Backend, public, subnetStr string) string {
	t.Helper()
	prefix := fmt.Sprintf("tulle_peer_transmit_packets_total{peer=%q,subnet=%q} ", public, subnetStr)
	for line := range strings.Lines(collectText(t, b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), prefix); ok {
			return v
		}
	}
	return "absent"
}

// TestDepartedPeersLatePacketsNeverCountForANewPeer: a loop in the middle
// of a step holds the table it loaded and may still count packets for a
// peer that has just left. Those must not land in the series of a peer
// that joins meanwhile, in the same Apply or a later one.
func TestDepartedPeersLatePacketsNeverCountForANewPeer(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	tx := &b.workers[0].tx
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")})

	tx.stats.enterStep()
	x := b.table.Load().lookup(addr32("198.18.2.1"))
	b.Apply([]subnet.Event{removed("198.18.2.0/24", "192.0.2.2"), added("198.18.3.0/24", "192.0.2.3")})
	tx.run.add(tx.stats, x, 5, 500) // the loop ends its batch
	tx.run.flush(tx.stats)
	tx.stats.leaveStep()
	if got := txPackets(t, b, "192.0.2.3", "198.18.3.0/24"); got != "0" {
		t.Errorf("peer joining in the Apply that removed another: %s packets sent, want 0", got)
	}

	tx.stats.enterStep()
	y := b.table.Load().lookup(addr32("198.18.3.1"))
	b.Apply([]subnet.Event{removed("198.18.3.0/24", "192.0.2.3")})
	b.Apply([]subnet.Event{added("198.18.4.0/24", "192.0.2.4")})
	tx.run.add(tx.stats, y, 7, 700)
	tx.run.flush(tx.stats)
	tx.stats.leaveStep()
	if got := txPackets(t, b, "192.0.2.4", "198.18.4.0/24"); got != "0" {
		t.Errorf("peer joining in a later Apply, while a loop still counted for the departed: %s packets, want 0", got)
	}

	// Once no step holds a departed peer, its index is reused (counters
	// stay as many as the peers), with zeroed counters: x's by the peer of
	// 198.18.4.0 already (that step had ended), y's now.
	b.Apply([]subnet.Event{added("198.18.5.0/24", "192.0.2.5")})
	tb := b.table.Load()
	if w := tb.lookup(addr32("198.18.4.1")); w.index != x.index {
		t.Errorf("index %d of the first departed peer not reused once its step ended (got %d)", x.index, w.index)
	}
	if v := tb.lookup(addr32("198.18.5.1")); v.index != y.index {
		t.Errorf("index %d of the second departed peer not reused once its step ended (got %d)", y.index, v.index)
	}
	if got := txPackets(t, b, "192.0.2.5", "198.18.5.0/24"); got != "0" {
		t.Errorf("peer on a reused index starts at %s packets, want 0", got)
	}
}

// TestCounterIndexIsNotReusedDuringAScrape: a scrape reads counters by the
// indices of the table it loaded; an index reused meanwhile would show the
// new peer's counters under the departed peer's labels.
func TestCounterIndexIsNotReusedDuringAScrape(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{added("198.18.2.0/24", "192.0.2.2")})
	x := b.table.Load().lookup(addr32("198.18.2.1"))
	b.ctl.scrapes.RLock() // a scrape in progress
	b.Apply([]subnet.Event{removed("198.18.2.0/24", "192.0.2.2")})
	b.Apply([]subnet.Event{added("198.18.3.0/24", "192.0.2.3")})
	b.ctl.scrapes.RUnlock()
	if y := b.table.Load().lookup(addr32("198.18.3.1")); y.index == x.index {
		t.Errorf("index %d reused while a scrape ran", x.index)
	}
	b.Apply([]subnet.Event{added("198.18.4.0/24", "192.0.2.4")})
	if z := b.table.Load().lookup(addr32("198.18.4.1")); z.index != x.index {
		t.Errorf("index %d not reused after the scrape (got %d)", x.index, z.index)
	}
}

// TestTableSwapUnderConcurrentApplyIsRaceFree runs lookups (as workers do,
// once per batch) while Apply rebuilds the table; run with -race.
func TestTableSwapUnderConcurrentApplyIsRaceFree(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 2)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				tb := b.table.Load()
				for i := uint32(0); i < 256; i++ {
					if p := tb.lookup(addr32("198.18.0.0") + i<<8 + 1); p != nil {
						_ = p.addr
						_ = p.innerMTU.Load()
						b.workers[0].tx.stats.peer(p.index).packets.Add(1)
					}
				}
			}
		})
	}
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(b.Collector()); err != nil {
		t.Fatal(err)
	}
	wg.Go(func() { // a scraper, concurrently
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := reg.Gather(); err != nil {
				t.Error(err)
				return
			}
		}
	})
	for i := 0; i < 300; i++ {
		s := fmt.Sprintf("198.18.%d.0/24", 2+i%200)
		pub := fmt.Sprintf("198.51.100.%d", 1+i%250)
		if i%3 == 2 {
			b.Apply([]subnet.Event{removed(s, pub)})
		} else {
			b.Apply([]subnet.Event{added(s, pub)})
		}
	}
	close(stop)
	wg.Wait()
}

// benchTable builds a /8 network in /24s with n leases.
func benchTable(b *testing.B, n int) *table {
	be := newPureBackend(b, "198.0.0.0/8", 24, "198.0.0.0/24", 1)
	evs := make([]subnet.Event, 0, n)
	for i := 1; i <= n; i++ {
		s := netip.PrefixFrom(proto.Uint32Addr(addr32("198.0.0.0")+uint32(i%65536)<<8), 24)
		evs = append(evs, subnet.Event{Type: subnet.EventAdded, Lease: subnet.Lease{
			Subnet: s, Attrs: subnet.LeaseAttrs{PublicIP: proto.Uint32Addr(addr32("198.51.0.0") + uint32(i))},
		}})
	}
	be.Apply(evs)
	tb := be.table.Load()
	if tb.count != min(n, 65535) {
		b.Fatalf("table has %d peers, want %d", tb.count, n)
	}
	return tb
}

// BenchmarkLookup shows O(1): the same ns/op at 16 leases (15 peers + ours) and at 65,536 (a
// /8 in /24s), 0 allocs. "same15" looks up the addresses of 16 peers in both
// tables (the algorithm); "spread" spreads lookups over every lease (adds
// the cache misses of a 256 KiB slot array).
func BenchmarkLookup(b *testing.B) {
	for _, n := range []int{15, 65535} { // peers; plus our own lease
		tb := benchTable(b, n)
		for _, pattern := range []string{"same15", "spread"} {
			dsts := make([]uint32, 4096)
			r := rand.New(rand.NewPCG(1, uint64(n)))
			for i := range dsts {
				k := 1 + r.IntN(15)
				if pattern == "spread" {
					k = 1 + r.IntN(n)
				}
				dsts[i] = addr32("198.0.0.0") + uint32(k)<<8 + uint32(r.IntN(256))
			}
			b.Run(fmt.Sprintf("leases=%d/%s", n+1, pattern), func(b *testing.B) {
				b.ReportAllocs()
				var hits int
				i := 0
				for b.Loop() {
					if tb.lookup(dsts[i&4095]) != nil {
						hits++
					}
					i++
				}
				if hits == 0 {
					b.Fatal("no hits")
				}
			})
		}
	}
}

func TestGOMAXPROCSIsRaisedForTheLoopsUnlessTheOperatorSetIt(t *testing.T) {
	orig := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(orig) })
	runtime.GOMAXPROCS(1)
	t.Setenv("GOMAXPROCS", "1")
	if raiseGOMAXPROCS(4, discardLogger()) {
		t.Error("GOMAXPROCS=1 for 4 loops: the loops may wait hot, holding every P")
	}
	if got := runtime.GOMAXPROCS(0); got != 1 {
		t.Errorf("GOMAXPROCS=1 in the environment: raised to %d, want it kept", got)
	}
	os.Unsetenv("GOMAXPROCS")
	if !raiseGOMAXPROCS(4, discardLogger()) {
		t.Error("raised for 4 loops, yet they may not wait hot")
	}
	if got, want := runtime.GOMAXPROCS(0), runtime.NumCPU()+4; got != want {
		t.Errorf("GOMAXPROCS %d after raising for 4 loops, want NumCPU+4 = %d", got, want)
	}
}
