package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/tulle-net/tulle/tests/testbed"
)

const (
	leaseTTL  = time.Hour // the fake hosts' etcd leases; the bed is gone long before
	txnOps    = 128       // etcd's default --max-txn-ops
	applyWait = 30 * time.Second
)

// fleet is the fake hosts' side: their leases in etcd and the model of what
// etcd holds.
type fleet struct {
	cfg     Config
	cli     *clientv3.Client
	own     netip.Prefix
	publics []netip.Addr
	hosts   clientv3.LeaseID // etcd lease of the leases that churn
	rack    clientv3.LeaseID // etcd lease of the burst's leases

	mu       sync.Mutex
	present  map[netip.Prefix]netip.Addr // churnable leases in etcd
	free     []netip.Prefix              // subnets without a lease (not ours)
	busy     map[netip.Prefix]bool       // a change in flight
	rackSubs map[netip.Prefix]netip.Addr
	next     int // next PublicIP to hand out
}

// choosePublics returns the fake PublicIPs: one per lease from 198.18.0.0/15
// outside the overlay when that has room (never sent anything, and not on
// any link), else the documentation underlay ranges, shared between leases
// (flannel and Tulle allow that; only the bed's own addresses are left
// out).
func choosePublics(network netip.Prefix, need int) ([]netip.Addr, string) {
	bench := netip.MustParsePrefix("198.18.0.0/15")
	var out []netip.Addr
	if network.Bits() > bench.Bits() && bench.Contains(network.Addr()) {
		for a := bench.Addr(); bench.Contains(a) && len(out) < need; a = a.Next() {
			if !network.Contains(a) && a.As4()[3] != 0 && a.As4()[3] != 255 {
				out = append(out, a)
			}
		}
		if len(out) == need {
			return out, fmt.Sprintf("one per lease, from 198.18.0.0/15 outside %v", network)
		}
	}
	out = out[:0]
	for i := 2; i <= 199; i++ { // 192.0.2.1 is the bed's host, .200 and up its etcd and extra nodes
		out = append(out, netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}))
	}
	for i := 1; i <= 254; i++ {
		out = append(out, netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}))
	}
	return out, fmt.Sprintf("%d documentation addresses (192.0.2.2-199, 198.51.100.1-254), shared between leases", len(out))
}

func (f *fleet) publicIP() netip.Addr {
	a := f.publics[f.next%len(f.publics)]
	f.next++
	return a
}

// value is a flanneld udp host's lease value.
func value(pub netip.Addr) string {
	return `{"PublicIP":"` + pub.String() + `","PublicIPv6":null}`
}

// populate writes n leases (burst of them on the rack's etcd lease) into
// etcd in transactions of txnOps puts, at random free subnets.
func (f *fleet) populate(ctx context.Context, n, burst int, r *rand.Rand) error {
	subnets := 1 << (f.cfg.SubnetLen - f.cfg.Network.Bits())
	if n+1 > subnets {
		return fmt.Errorf("%d leases and ours do not fit %v in /%d (%d subnets)", n, f.cfg.Network, f.cfg.SubnetLen, subnets)
	}
	for _, lid := range []*clientv3.LeaseID{&f.hosts, &f.rack} {
		g, err := f.cli.Grant(ctx, int64(leaseTTL/time.Second))
		if err != nil {
			return fmt.Errorf("grant an etcd lease: %w", err)
		}
		*lid = g.ID
	}
	all := make([]netip.Prefix, subnets)
	base := f.cfg.Network.Addr().As4()
	b32 := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	for i := range all {
		a := b32 + uint32(i)<<(32-f.cfg.SubnetLen)
		all[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), f.cfg.SubnetLen)
	}
	r.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	f.present, f.busy, f.rackSubs = map[netip.Prefix]netip.Addr{}, map[netip.Prefix]bool{}, map[netip.Prefix]netip.Addr{}
	var ops []clientv3.Op
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		if _, err := f.cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			return fmt.Errorf("write leases: %w", err)
		}
		ops = ops[:0]
		return nil
	}
	written := 0
	for _, s := range all {
		if written == n {
			f.free = append(f.free, s)
			continue
		}
		pub := f.publicIP()
		lid := f.hosts
		if written < burst {
			lid = f.rack
			f.rackSubs[s] = pub
		} else {
			f.present[s] = pub
		}
		ops = append(ops, clientv3.OpPut(testbed.FlannelLeaseKey(s), value(pub), clientv3.WithLease(lid)))
		written++
		if len(ops) == txnOps {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// setOwn removes tulled's own lease from the free subnets.
func (f *fleet) setOwn(own netip.Prefix) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.own = own
	f.free = slices.DeleteFunc(f.free, func(s netip.Prefix) bool { return s == own })
}

// change is one churn step done to etcd.
type change struct {
	kind   string // "add", "delete", "move"
	subnet netip.Prefix
	start  time.Time
}

// pick chooses the next change (about 45% adds, 45% deletes, 10% moves to
// another PublicIP) on a subnet with no change in flight, and applies it
// to the model.
func (f *fleet) pick(i int, r *rand.Rand) (change, clientv3.Op) {
	f.mu.Lock()
	defer f.mu.Unlock()
	kind := "add"
	switch {
	case i%10 == 9:
		kind = "move"
	case i%2 == 1:
		kind = "delete"
	}
	if kind == "add" && len(f.free) <= len(f.busy) {
		kind = "delete"
	}
	if kind != "add" && len(f.present) <= len(f.busy) {
		kind = "add"
	}
	var s netip.Prefix
	if kind == "add" {
		for {
			k := r.IntN(len(f.free))
			if s = f.free[k]; !f.busy[s] {
				f.free[k] = f.free[len(f.free)-1]
				f.free = f.free[:len(f.free)-1]
				break
			}
		}
	} else {
		// A random present lease: map order is random enough, and skipping
		// a few keeps it from favouring the first.
		skip := r.IntN(8)
		for p := range f.present {
			if f.busy[p] {
				continue
			}
			s = p
			if skip--; skip < 0 {
				break
			}
		}
	}
	f.busy[s] = true
	c := change{kind: kind, subnet: s}
	key := testbed.FlannelLeaseKey(s)
	switch kind {
	case "delete":
		delete(f.present, s)
		return c, clientv3.OpDelete(key)
	default:
		pub := f.publicIP()
		if old, ok := f.present[s]; ok && pub == old {
			pub = f.publicIP()
		}
		f.present[s] = pub
		return c, clientv3.OpPut(key, value(pub), clientv3.WithLease(f.hosts))
	}
}

func (f *fleet) done(c change) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.busy, c.subnet)
	if c.kind == "delete" {
		f.free = append(f.free, c.subnet)
	}
}

// churn makes rate changes per second for d, each its own etcd request
// (as many hosts would), up to 32 in flight, paced so that the count made
// keeps up with the clock. It returns the changes made.
func (f *fleet) churn(ctx context.Context, rate int, d time.Duration, r *rand.Rand) ([]change, error) {
	var (
		mu      sync.Mutex
		changes []change
		errs    []error
		wg      sync.WaitGroup
	)
	defer wg.Wait()
	sem := make(chan struct{}, 32)
	tick := time.NewTicker(min(10*time.Millisecond, time.Second/time.Duration(rate)))
	defer tick.Stop()
	start := time.Now()
	for made := 0; ; {
		elapsed := time.Since(start)
		if elapsed >= d {
			break
		}
		for owed := int(elapsed.Seconds() * float64(rate)); made < owed; made++ {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			c, op := f.pick(made, r)
			c.start = time.Now()
			wg.Go(func() {
				defer func() { <-sem }()
				_, err := f.cli.Do(ctx, op)
				f.done(c)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, fmt.Errorf("%s %v: %w", c.kind, c.subnet, err))
					return
				}
				changes = append(changes, c)
			})
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
	wg.Wait()
	return changes, errors.Join(errs...)
}
