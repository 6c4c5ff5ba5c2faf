package udp

import (
	"fmt"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
)

// Addresses of the dual-stack tests (2001:db8::/32 only).
var (
	network6 = netip.MustParsePrefix("2001:db8:1::/48")
	leaseA6  = netip.MustParsePrefix("2001:db8:1:1::/64")
	leaseB6  = netip.MustParsePrefix("2001:db8:1:2::/64")
	leaseC6  = netip.MustParsePrefix("2001:db8:1:3::/64")
)

// dualStack makes a pure backend's options dual-stack: IPv6Network
// 2001:db8:1::/48 in /64s, our IPv6 lease 2001:db8:1:1::/64.
func dualStack(o *Options) {
	o.IPv6Network = network6
	o.IPv6SubnetLen = 64
	o.Lease.IPv6Subnet = leaseA6
}

// withUnderlay6 gives a pure backend's options an IPv6 underlay.
func withUnderlay6(o *Options) {
	o.PublicIPv6 = netip.MustParseAddr("2001:db8:ffff::1")
	o.IPv6Underlay = true
}

// lease6 is the lease event of a Tulle host with an IPv4 and an IPv6
// subnet, PublicIP pub, PublicIPv6 pub6 (may be ""), listing feats.
func lease6(s, s6, pub, pub6 string, feats ...string) subnet.Event {
	ev := added(s, pub)
	if s6 != "" {
		ev.Lease.IPv6Subnet = netip.MustParsePrefix(s6)
	}
	if pub6 != "" {
		ev.Lease.Attrs.PublicIPv6 = netip.MustParseAddr(pub6)
	}
	ev.Lease.Attrs.BackendData = HostInfo{Version: "test", Features: feats}.BackendData()
	return ev
}

func words(s string) (hi, lo uint64) {
	hi, lo, ok := proto.AddrWords(netip.MustParseAddr(s))
	if !ok {
		panic(s)
	}
	return hi, lo
}

func lookup6(tb *table, s string) *peer { return tb.lookup6(words(s)) }

func TestIPv6LookupFindsOnlyPeersThatCarryIPv6(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1, dualStack)
	b.Apply([]subnet.Event{
		lease6("198.18.2.0/24", "2001:db8:1:2::/64", "192.0.2.2", "", FeatureIPv6),
		lease6("198.18.3.0/24", "2001:db8:1:3::/64", "192.0.2.3", ""),                              // no FeatureIPv6
		lease6("198.18.4.0/24", "2001:db8:1:2::/64", "192.0.2.4", "", FeatureIPv6),                 // B's IPv6 subnet again
		lease6("198.18.5.0/24", "2001:db8:1:1::/64", "192.0.2.5", "", FeatureIPv6),                 // our own IPv6 subnet
		lease6("198.18.6.0/24", "2001:db8:2:6::/64", "192.0.2.6", "", FeatureIPv6),                 // outside the IPv6 network
		lease6("198.18.7.0/24", "2001:db8:1:7::/80", "192.0.2.7", "", FeatureIPv6),                 // wrong length
		lease6("198.18.8.0/24", "2001:db8:1:8::/64", "192.0.2.8", "2001:db8:ffff::8", FeatureIPv6), // fine
		lease(netip.MustParsePrefix("198.18.9.0/24"), netip.MustParseAddr("192.0.2.9")),            // flannel
	})
	tb := b.table.Load()
	if tb.count != 8 {
		t.Fatalf("peers = %d, want 8 (every lease carries IPv4)", tb.count)
	}
	pB := tb.lookup(addr32("198.18.2.1"))
	pH := tb.lookup(addr32("198.18.8.1"))
	cases := map[string]*peer{
		"2001:db8:1:2::":                        pB,
		"2001:db8:1:2:ffff:ffff:ffff:ffff":      pB,
		"2001:db8:1:8::77":                      pH,
		"2001:db8:1:3::1":                       nil, // no FeatureIPv6: never sent IPv6
		"2001:db8:1:1::1":                       nil, // our own
		"2001:db8:1:7::1":                       nil,
		"2001:db8:1:9::1":                       nil, // nobody's
		"2001:db8:2:6::1":                       nil, // above the network
		"2001:db8:0:ffff:ffff:ffff:ffff:ffff":   nil, // below the network
		"::":                                    nil,
		"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff": nil,
	}
	for dst, want := range cases {
		if got := lookup6(tb, dst); got != want {
			t.Errorf("lookup6(%s) = %v, want %v", dst, got, want)
		}
	}
	if pB == nil || pB.subnet6 != leaseB6 || pH.subnet6 != netip.MustParsePrefix("2001:db8:1:8::/64") {
		t.Fatalf("peers' IPv6 leases: %v %v", pB, pH)
	}
	for _, s := range []string{"198.18.3.1", "198.18.4.1", "198.18.5.1", "198.18.6.1", "198.18.7.1", "198.18.9.1"} {
		if p := tb.lookup(addr32(s)); p == nil || p.subnet6.IsValid() {
			t.Errorf("peer of %s: %v, want one in the IPv4 table only", s, p)
		}
	}
	if !tb.isOwn6(words("2001:db8:1:1:1::")) || tb.isOwn6(words("2001:db8:1:2::1")) {
		t.Error("isOwn6 wrong")
	}
	if !tb.inNetwork6(words("2001:db8:1:ffff::1")) || tb.inNetwork6(words("2001:db8:2::1")) {
		t.Error("inNetwork6 wrong")
	}
	// Without the IPv6 underlay, the peer with a PublicIPv6 is reached
	// over IPv4, and its datagrams are accepted from either address.
	if pH.addr != netip.MustParseAddrPort("192.0.2.8:8285") || !pH.sentFrom(netip.MustParseAddr("2001:db8:ffff::8")) ||
		!pH.sentFrom(netip.MustParseAddr("192.0.2.8")) || pH.sentFrom(netip.MustParseAddr("2001:db8:ffff::9")) {
		t.Errorf("peer with a PublicIPv6: addr %v", pH.addr)
	}
	if !tb.isSender(netip.MustParseAddr("2001:db8:ffff::8")) || tb.isSender(netip.MustParseAddr("2001:db8:ffff::9")) {
		t.Error("isSender of IPv6 underlay addresses wrong")
	}

	// The holder of an IPv6 subnet leaves: its slot is empty, the other
	// claimant keeps IPv4 only.
	b.Apply([]subnet.Event{removed("198.18.2.0/24", "192.0.2.2")})
	if p := lookup6(b.table.Load(), "2001:db8:1:2::1"); p != nil {
		t.Errorf("removed peer's IPv6 lease still routed to %v", p.subnet)
	}
}

func TestIPv6TableIsEmptyWithoutAnIPv6Network(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1)
	b.Apply([]subnet.Event{lease6("198.18.2.0/24", "2001:db8:1:2::/64", "192.0.2.2", "", FeatureIPv6)})
	tb := b.table.Load()
	if p := tb.lookup(addr32("198.18.2.1")); p == nil || p.subnet6.IsValid() {
		t.Fatalf("peer %v: want IPv4 only", p)
	}
	for _, a := range []string{"2001:db8:1:2::1", "::", "ffff::"} {
		if lookup6(tb, a) != nil || tb.inNetwork6(words(a)) || tb.isOwn6(words(a)) {
			t.Errorf("%s is routed, in the network or ours with IPv6 off", a)
		}
	}
}

func TestIPv6LookupAgreesWithPrefixContainsOnRandomNetworks(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	for round := range 300 {
		nbits := r.IntN(120)                                   // /0 .. /119
		width := 2 + r.IntN(min(128-nbits-1, maxSubnetBits)-1) // lease length up to /128
		subnetLen := nbits + width
		var raw [16]byte
		for i := range raw {
			raw[i] = byte(r.Uint32())
		}
		nw := netip.PrefixFrom(netip.AddrFrom16(raw), nbits).Masked()
		nhi, nlo, _ := proto.AddrWords(nw.Addr())
		sh := uint(128 - subnetLen)
		sub := func(k uint64) netip.Prefix { // the k-th subnet
			addHi, addLo := k>>(64-sh), k<<sh // k << sh in 128 bits (shifts of 64 and more give 0)
			if sh >= 64 {
				addHi, addLo = k<<(sh-64), 0
			}
			lo, carry := bits.Add64(nlo, addLo, 0)
			hi, _ := bits.Add64(nhi, addHi, carry)
			return netip.PrefixFrom(proto.WordsAddr(hi, lo), subnetLen)
		}
		hostHi, hostLo := ^uint64(0)>>(128-sh), ^uint64(0)>>(64-min(sh, 64)) // the host bits of a lease
		n := uint64(1) << width
		own6 := sub(r.Uint64N(n))
		b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1, func(o *Options) {
			o.IPv6Network, o.IPv6SubnetLen, o.Lease.IPv6Subnet = nw, subnetLen, own6
		})
		var evs []subnet.Event
		leases := map[netip.Prefix]string{}
		for i := range 20 {
			s := sub(r.Uint64N(n))
			pub := fmt.Sprintf("198.51.100.%d", i+1)
			evs = append(evs, lease6(fmt.Sprintf("198.18.%d.0/24", i+2), s.String(), pub, "", FeatureIPv6))
			if _, dup := leases[s]; !dup && s != own6 {
				leases[s] = pub
			}
		}
		b.Apply(evs)
		tb := b.table.Load()
		for i := range 400 {
			var a netip.Addr
			switch i % 3 {
			case 0: // in a lease
				s := sub(r.Uint64N(n))
				hi, lo, _ := proto.AddrWords(s.Addr())
				a = proto.WordsAddr(hi|r.Uint64()&hostHi, lo|r.Uint64()&hostLo)
			case 1: // anywhere
				a = proto.WordsAddr(r.Uint64(), r.Uint64())
			default: // near the network's edges, and a whole 2^(64+shift) above it
				hi, lo, _ := proto.AddrWords(nw.Addr())
				switch r.IntN(3) {
				case 0:
					lo--
					if lo == ^uint64(0) {
						hi--
					}
				case 1:
					if sh < 64 {
						hi += 1 << sh // its subnet number wraps to 0 in 64 bits
					}
				}
				a = proto.WordsAddr(hi, lo)
			}
			want := ""
			for s, pub := range leases {
				if s.Contains(a) {
					want = pub
				}
			}
			got := ""
			hi, lo, _ := proto.AddrWords(a)
			if p := tb.lookup6(hi, lo); p != nil {
				got = p.addr.Addr().String()
			}
			if got != want {
				t.Fatalf("round %d: network %v /%d: lookup6(%v) = %q, want %q", round, nw, subnetLen, a, got, want)
			}
			if tb.inNetwork6(hi, lo) != nw.Contains(a) || tb.isOwn6(hi, lo) != own6.Contains(a) {
				t.Fatalf("round %d: network %v /%d: %v inNetwork6 %v isOwn6 %v", round, nw, subnetLen, a, tb.inNetwork6(hi, lo), tb.isOwn6(hi, lo))
			}
		}
	}
}

func TestIPv6LeaseChangesReplaceThePeerAndRenewalKeepsIt(t *testing.T) {
	b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1, dualStack, withUnderlay6)
	b.Apply([]subnet.Event{lease6("198.18.2.0/24", "2001:db8:1:2::/64", "192.0.2.2", "", FeatureIPv6)})
	p1 := b.table.Load().lookup(addr32("198.18.2.1"))
	p1.innerMTU.Store(1200)
	b.Apply([]subnet.Event{lease6("198.18.2.0/24", "2001:db8:1:2::/64", "192.0.2.2", "", FeatureIPv6, FeaturePartialChecksum)})
	if p := b.table.Load().lookup(addr32("198.18.2.1")); p != p1 || p.innerMTU.Load() != 1200 || !p.partialCsum.Load() {
		t.Fatal("renewal (with a new checksum feature) replaced the peer or lost its path MTU")
	}
	steps := []struct {
		what string
		ev   subnet.Event
		addr string
		six  bool
	}{
		{"IPv6 feature gone", lease6("198.18.2.0/24", "2001:db8:1:2::/64", "192.0.2.2", ""), "192.0.2.2:8285", false},
		{"IPv6 feature back", lease6("198.18.2.0/24", "2001:db8:1:2::/64", "192.0.2.2", "", FeatureIPv6), "192.0.2.2:8285", true},
		{"IPv6 underlay offered", lease6("198.18.2.0/24", "2001:db8:1:2::/64", "192.0.2.2", "2001:db8:ffff::2", FeatureIPv6, FeatureIPv6Underlay), "[2001:db8:ffff::2]:8285", true},
		{"another IPv6 lease", lease6("198.18.2.0/24", "2001:db8:1:4::/64", "192.0.2.2", "2001:db8:ffff::2", FeatureIPv6, FeatureIPv6Underlay), "[2001:db8:ffff::2]:8285", true},
		{"PublicIPv6 without the feature", lease6("198.18.2.0/24", "2001:db8:1:4::/64", "192.0.2.2", "2001:db8:ffff::2", FeatureIPv6), "192.0.2.2:8285", true},
	}
	prev := p1
	for _, s := range steps {
		b.Apply([]subnet.Event{s.ev})
		tb := b.table.Load()
		p := tb.lookup(addr32("198.18.2.1"))
		if p == prev || p.addr.String() != s.addr {
			t.Fatalf("%s: peer %p (before %p), addr %v, want a new peer at %s", s.what, p, prev, p.addr, s.addr)
		}
		if got := lookup6(tb, s.ev.Lease.IPv6Subnet.Addr().Next().String()); (got == p) != s.six {
			t.Fatalf("%s: lookup6 of its IPv6 lease = %v, want it routed %v", s.what, got, s.six)
		}
		if tb.count != 1 {
			t.Fatalf("%s: %d peers", s.what, tb.count)
		}
		prev = p
	}
	if lookup6(b.table.Load(), "2001:db8:1:2::1") != nil {
		t.Error("the peer's former IPv6 lease is still routed")
	}
	b.Apply([]subnet.Event{removed("198.18.2.0/24", "192.0.2.2")})
	tb := b.table.Load()
	for i, nd := range tb.r6.top {
		if nd != emptyNode {
			t.Fatalf("empty table keeps IPv6 node %d", i)
		}
	}
	if tb.isSender(netip.MustParseAddr("2001:db8:ffff::2")) {
		t.Error("departed peer's PublicIPv6 is still a sender")
	}
}

func TestIPv6UnderlayOnlyWhenBothOfferIt(t *testing.T) {
	ev := lease6("198.18.2.0/24", "2001:db8:1:2::/64", "192.0.2.2", "2001:db8:ffff::2", FeatureIPv6, FeatureIPv6Underlay)
	for _, c := range []struct {
		name string
		mods []func(*Options)
		want string
	}{
		{"we have it", []func(*Options){dualStack, withUnderlay6}, "[2001:db8:ffff::2]:8285"},
		{"we have no PublicIPv6", []func(*Options){dualStack, func(o *Options) { o.IPv6Underlay = true }}, "192.0.2.2:8285"},
		{"our config leaves it off", []func(*Options){dualStack, func(o *Options) { o.PublicIPv6 = netip.MustParseAddr("2001:db8:ffff::1") }}, "192.0.2.2:8285"},
		{"IPv4-only overlay over it", []func(*Options){withUnderlay6}, "[2001:db8:ffff::2]:8285"},
	} {
		b := newPureBackend(t, "198.18.0.0/16", 24, "198.18.1.0/24", 1, c.mods...)
		b.Apply([]subnet.Event{ev})
		if p := b.table.Load().lookup(addr32("198.18.2.1")); p == nil || p.addr.String() != c.want {
			t.Errorf("%s: peer reached at %v, want %s", c.name, p.addr, c.want)
		}
	}
}

func TestIPv6OptionsAreChecked(t *testing.T) {
	for _, c := range []struct {
		mod  func(*Options)
		want string
	}{
		{func(o *Options) { dualStack(o); o.IPv6Network = netip.MustParsePrefix("2001:db8::/32") }, "more than 4194304 subnets"},
		{func(o *Options) { dualStack(o); o.Lease.IPv6Subnet = netip.Prefix{} }, "own IPv6 lease invalid Prefix"},
		{func(o *Options) { dualStack(o); o.Lease.IPv6Subnet = netip.MustParsePrefix("2001:db8:2:1::/64") }, "must be a /64 subnet of 2001:db8:1::/48"},
		{func(o *Options) { dualStack(o); o.IPv6Network = netip.MustParsePrefix("198.18.0.0/16") }, "must be an IPv6 prefix"},
		{func(o *Options) { dualStack(o); o.IPv6SubnetLen = 40 }, "IPv6SubnetLen 40"},
		{func(o *Options) { o.PublicIPv6 = netip.MustParseAddr("::ffff:192.0.2.1") }, "public IPv6"},
	} {
		o := Options{Network: network, SubnetLen: 24, Lease: subnet.Lease{Subnet: leaseA}, MTU: 1400}
		c.mod(&o)
		if err := checkOptions(&o); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("checkOptions: %v, want an error with %q", err, c.want)
		}
	}
	o := Options{Network: network, SubnetLen: 24, Lease: subnet.Lease{Subnet: leaseA}, MTU: 1400}
	dualStack(&o)
	o.IPv6SubnetLen = 0
	if err := checkOptions(&o); err != nil || o.IPv6SubnetLen != 64 {
		t.Errorf("IPv6SubnetLen 0: %v, len %d, want the default 64", err, o.IPv6SubnetLen)
	}
}

func TestIPv6FeaturesFollowTheConfigAndThePublicIPv6(t *testing.T) {
	pub6 := netip.MustParseAddr("2001:db8:ffff::1")
	for _, c := range []struct {
		cfg  subnet.Config
		pub6 netip.Addr
		want string
	}{
		{subnet.Config{EnableIPv4: true}, pub6, ""},
		{subnet.Config{EnableIPv4: true, EnableIPv6: true}, netip.Addr{}, "ipv6"},
		{subnet.Config{EnableIPv4: true, EnableIPv6: true, IPv6Underlay: true}, netip.Addr{}, "ipv6"},
		{subnet.Config{EnableIPv4: true, EnableIPv6: true, IPv6Underlay: true}, pub6, "ipv6,ipv6-underlay"},
		{subnet.Config{EnableIPv4: true, IPv6Underlay: true}, pub6, "ipv6-underlay"},
		{subnet.Config{EnableIPv6: true}, pub6, ""}, // IPv6 only: not carried by this backend
	} {
		if got := strings.Join(IPv6Features(&c.cfg, c.pub6), ","); got != c.want {
			t.Errorf("IPv6Features(%+v, %v) = %q, want %q", c.cfg, c.pub6, got, c.want)
		}
	}
}

// BenchmarkLookup6 is the IPv6 lookup: a /48 in /64s, 16 and 65,535
// leases, like BenchmarkLookup (O(1), 0 allocs).
func BenchmarkLookup6(b *testing.B) {
	for _, n := range []int{15, 65534} {
		be := newPureBackend(b, "198.0.0.0/8", 24, "198.0.0.0/24", 1, func(o *Options) {
			o.IPv6Network, o.IPv6SubnetLen, o.Lease.IPv6Subnet = network6, 64, netip.MustParsePrefix("2001:db8:1::/64")
		})
		evs := make([]subnet.Event, 0, n)
		for i := 1; i <= n; i++ {
			ev := lease6(netip.PrefixFrom(proto.Uint32Addr(addr32("198.0.0.0")+uint32(i)<<8), 24).String(),
				fmt.Sprintf("2001:db8:1:%x::/64", i), proto.Uint32Addr(addr32("198.51.0.0")+uint32(i)).String(), "", FeatureIPv6)
			evs = append(evs, ev)
		}
		be.Apply(evs)
		tb := be.table.Load()
		for _, pattern := range []string{"same15", "spread"} {
			type dst struct{ hi, lo uint64 }
			dsts := make([]dst, 4096)
			r := rand.New(rand.NewPCG(1, uint64(n)))
			for i := range dsts {
				k := 1 + r.IntN(15)
				if pattern == "spread" {
					k = 1 + r.IntN(n)
				}
				hi, _ := words(fmt.Sprintf("2001:db8:1:%x::", k))
				dsts[i] = dst{hi, r.Uint64()}
			}
			b.Run(fmt.Sprintf("leases=%d/%s", n+1, pattern), func(b *testing.B) {
				b.ReportAllocs()
				hits, i := 0, 0
				for b.Loop() {
					d := dsts[i&4095]
					if tb.lookup6(d.hi, d.lo) != nil {
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
