package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/internal/backoff"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// freePickLimit is how many free subnets flannel collects before picking
// one at random.
const freePickLimit = 100

// errConflict: a transaction's condition did not hold (another host was
// faster); the caller re-reads and retries.
var errConflict = errors.New("key changed meanwhile")

// GetNetworkConfig implements subnet.Registry. A missing key wraps
// subnet.ErrConfigNotFound; a config that does not parse wraps
// subnet.ErrInvalidConfig.
func (r *Registry) GetNetworkConfig(ctx context.Context) (*subnet.Config, error) {
	cli, err := r.client(ctx)
	if err != nil {
		return nil, fmt.Errorf("read network config %s: %w", r.configKey, err)
	}
	value, err := r.getConfig(ctx, cli)
	if err != nil {
		return nil, err
	}
	if value == nil {
		return nil, fmt.Errorf("read network config %s: %w", r.configKey, subnet.ErrConfigNotFound)
	}
	cfg, err := subnet.ParseConfig(value)
	if err != nil {
		return nil, fmt.Errorf("network config %s: %w", r.configKey, err)
	}
	return cfg, nil
}

// getConfig reads <prefix>/config: its value, nil if the key is absent
// (never nil if present, even if empty).
func (r *Registry) getConfig(ctx context.Context, cli *clientv3.Client) ([]byte, error) {
	octx, cancel := r.op(ctx)
	defer cancel()
	resp, err := cli.Get(octx, r.configKey)
	if err != nil {
		return nil, fmt.Errorf("read network config %s: %w", r.configKey, r.failOn(ctx, r.configKey, err))
	}
	r.ok()
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	return append([]byte{}, resp.Kvs[0].Value...), nil
}

// entry is one key below <prefix>/subnets/ whose key parsed.
type entry struct {
	kv      *mvccpb.KeyValue
	lease   subnet.Lease
	valueOK bool // false: the key holds the subnet but its value is malformed
}

// parseKV reads a key below <prefix>/subnets/. keyOK is true when the key
// names a subnet, even if the value is malformed (err != nil).
func (r *Registry) parseKV(kv *mvccpb.KeyValue) (l subnet.Lease, keyOK bool, err error) {
	v4, v6, err := subnet.ParseLeaseKey(strings.TrimPrefix(string(kv.Key), r.subnetsPrefix))
	if err != nil {
		return subnet.Lease{}, false, err
	}
	l = subnet.Lease{Subnet: v4, IPv6Subnet: v6, LeaseID: kv.Lease, Reservation: kv.Lease == 0}
	if err := json.Unmarshal(kv.Value, &l.Attrs); err != nil {
		return l, true, err
	}
	return l, true, nil
}

// Malformed is a key below <prefix>/subnets/ whose key or value does not
// parse.
type Malformed struct {
	Key string // the whole etcd key
	Err error
}

// list reads every key below <prefix>/subnets/ and the revision read at.
// Malformed ones are logged, counted and returned in bad; those whose key
// parses are also kept in entries (they still hold their subnet).
func (r *Registry) list(ctx context.Context, cli *clientv3.Client) (entries []entry, bad []Malformed, rev int64, err error) {
	octx, cancel := r.op(ctx)
	defer cancel()
	resp, err := cli.Get(octx, r.subnetsPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, nil, 0, fmt.Errorf("list %s: %w", r.subnetsPrefix, r.failOn(ctx, r.subnetsPrefix, err))
	}
	r.ok()
	entries = make([]entry, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		l, keyOK, err := r.parseKV(kv)
		if err != nil {
			r.noteMalformed(string(kv.Key), kv.ModRevision, err)
			bad = append(bad, Malformed{Key: string(kv.Key), Err: err})
		}
		if keyOK {
			entries = append(entries, entry{kv: kv, lease: l, valueOK: err == nil})
		}
	}
	return entries, bad, resp.Header.Revision, nil
}

func ttlSeconds(ttl time.Duration) int64 {
	s := int64((ttl + time.Second - 1) / time.Second)
	return max(s, 1)
}

// AcquireLease implements subnet.Registry in flannel's order:
//  1. a key holding attrs.PublicIP that fits cfg is reused: a reservation as
//     it is; a leased key is moved to a new etcd lease of ttl (with the
//     current value) and the old etcd lease is revoked. A leased key of ours
//     that no longer fits is deleted (a reservation that does not fit is
//     left alone);
//  2. else previous (its IPv6 subnet too, see Config.PreviousAllocation),
//     if it fits cfg and no key holds or overlaps it;
//  3. else a random pick among the first 100 free subnets from SubnetMin.
//
// A new key is created by Txn If Version(key)==0; a lost race revokes the
// etcd lease it granted and retries (bounded). No free subnet: an error
// wrapping subnet.ErrNoFreeSubnet that names the network.
func (r *Registry) AcquireLease(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs, previous subnet.Allocation, ttl time.Duration) (subnet.Lease, error) {
	if cfg == nil || !cfg.EnableIPv4 {
		return subnet.Lease{}, fmt.Errorf("acquire lease: %w", &subnet.ConfigError{Field: "EnableIPv4", Value: "false", Rule: "Tulle leases need an IPv4 network"})
	}
	value, err := json.Marshal(attrs)
	if err != nil {
		return subnet.Lease{}, fmt.Errorf("acquire lease in network %s: %w", cfg.Network, err)
	}
	_ = json.Unmarshal(value, &attrs) // normalised, as the watch will report it
	l, err := r.retryConflicts(ctx, func(first bool) (subnet.Lease, error) {
		return r.tryAcquire(ctx, cfg, attrs, value, previous, ttl, first)
	})
	if errors.Is(err, errConflict) {
		return subnet.Lease{}, fmt.Errorf("acquire lease in network %s: other hosts were faster %d times in a row", cfg.Network, r.acquireTries)
	}
	return l, err
}

// retryConflicts calls try until it returns anything but errConflict, at
// most r.acquireTries times, pausing briefly (jittered) after each lost
// race. If every try lost, it returns the last errConflict error.
func (r *Registry) retryConflicts(ctx context.Context, try func(first bool) (subnet.Lease, error)) (subnet.Lease, error) {
	bo := backoff.Backoff{Min: 10 * time.Millisecond, Max: 500 * time.Millisecond}
	err := errConflict
	for n := 1; n <= r.acquireTries; n++ {
		var l subnet.Lease
		if l, err = try(n == 1); !errors.Is(err, errConflict) {
			return l, err
		}
		r.log.Debug("lost a race for a subnet; retrying", "try", n, "error", err)
		if !backoff.Sleep(ctx, bo.Next()) {
			return subnet.Lease{}, ctx.Err()
		}
	}
	return subnet.Lease{}, err
}

func (r *Registry) tryAcquire(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs, value []byte, previous subnet.Allocation, ttl time.Duration, first bool) (subnet.Lease, error) {
	cli, err := r.client(ctx)
	if err != nil {
		return subnet.Lease{}, fmt.Errorf("acquire lease in network %s: %w", cfg.Network, err)
	}
	entries, _, _, err := r.list(ctx, cli)
	if err != nil {
		return subnet.Lease{}, fmt.Errorf("acquire lease in network %s: %w", cfg.Network, err)
	}
	held := make([]subnet.Lease, 0, len(entries))
	for _, e := range entries {
		if !e.valueOK || e.lease.Attrs.PublicIP != attrs.PublicIP {
			held = append(held, e.lease)
			continue
		}
		switch {
		case cfg.Fits(e.lease):
			return r.adopt(ctx, cli, e, attrs, value, ttl)
		case e.lease.Reservation:
			r.log.Warn("ignoring our reservation that does not fit the network config", "subnet", e.lease.Subnet, "network", cfg.Network)
			held = append(held, e.lease)
		default:
			if err := r.deleteUnfit(ctx, cli, e, cfg); err != nil {
				return subnet.Lease{}, err
			}
		}
	}
	occ := cfg.Occupancy(held)
	if previous.Subnet.IsValid() {
		a, fits := cfg.PreviousAllocation(previous.Subnet.Masked(), previous.IPv6Subnet.Masked())
		switch {
		case fits && occ.Free(a):
			if first {
				r.log.Info("reusing the previous subnet", "subnet", a)
			}
			return r.create(ctx, cli, a, attrs, value, ttl)
		case first && !fits:
			r.log.Info("previous subnet does not fit the network config; ignoring it", "subnet", previous, "network", cfg.Network)
		case first:
			r.log.Info("previous subnet is held by another host; ignoring it", "subnet", previous)
		}
	}
	free := cfg.FreeAllocations(occ, freePickLimit)
	if len(free) == 0 {
		return subnet.Lease{}, fmt.Errorf("acquire lease in network %s: %w: all %d subnets from %s to %s are held",
			cfg.Network, subnet.ErrNoFreeSubnet, cfg.SubnetCount(),
			netip.PrefixFrom(cfg.SubnetMin, cfg.SubnetLen), netip.PrefixFrom(cfg.SubnetMax, cfg.SubnetLen))
	}
	return r.create(ctx, cli, free[rand.IntN(len(free))], attrs, value, ttl)
}

// create writes a new key for a, attached to a new etcd lease of ttl, if no
// key exists for it. On a lost race the granted lease is revoked and the
// error wraps errConflict.
func (r *Registry) create(ctx context.Context, cli *clientv3.Client, a subnet.Allocation, attrs subnet.LeaseAttrs, value []byte, ttl time.Duration) (subnet.Lease, error) {
	key := r.subnetsPrefix + a.Key()
	id, granted, expires, err := r.putOnNewLease(ctx, cli, key, clientv3.Compare(clientv3.Version(key), "=", 0), value, ttl, a.String())
	if err != nil {
		return subnet.Lease{}, fmt.Errorf("acquire lease %s: %w", a, err)
	}
	l := subnet.Lease{Subnet: a.Subnet, IPv6Subnet: a.IPv6Subnet, Attrs: attrs, LeaseID: int64(id), Expiration: expires}
	r.log.Info("acquired lease", "subnet", a, "public_ip", attrs.PublicIP, "ttl", granted)
	return l, nil
}

// adopt reuses a key of ours that fits: a reservation as it is; a leased
// key is put again with our value on a new etcd lease (If its ModRevision
// is unchanged) and its old etcd lease revoked, so the TTL and value are
// the current ones and nothing is left behind.
func (r *Registry) adopt(ctx context.Context, cli *clientv3.Client, e entry, attrs subnet.LeaseAttrs, value []byte, ttl time.Duration) (subnet.Lease, error) {
	l := e.lease
	if l.Reservation {
		r.log.Info("using our reservation", "subnet", l, "public_ip", attrs.PublicIP)
		return l, nil
	}
	key := string(e.kv.Key)
	id, granted, expires, err := r.putOnNewLease(ctx, cli, key, clientv3.Compare(clientv3.ModRevision(key), "=", e.kv.ModRevision), value, ttl, l.Subnet.String())
	if err != nil {
		return subnet.Lease{}, fmt.Errorf("acquire lease %s: %w", l.Subnet, err)
	}
	r.revokeIfUnused(ctx, cli, clientv3.LeaseID(e.kv.Lease), l.Subnet.String())
	l.Attrs, l.LeaseID, l.Expiration = attrs, int64(id), expires
	r.log.Info("reusing our lease", "subnet", l.Subnet, "public_ip", attrs.PublicIP, "ttl", granted)
	return l, nil
}

// deleteUnfit deletes a leased key of ours that no longer fits the config
// (flannel does the same), and its etcd lease.
func (r *Registry) deleteUnfit(ctx context.Context, cli *clientv3.Client, e entry, cfg *subnet.Config) error {
	key := string(e.kv.Key)
	octx, cancel := r.op(ctx)
	defer cancel()
	resp, err := cli.Txn(octx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", e.kv.ModRevision)).
		Then(clientv3.OpDelete(key)).
		Commit()
	if err != nil {
		return fmt.Errorf("delete lease %s (no longer fits network %s): %w", e.lease.Subnet, cfg.Network, r.failOn(ctx, key, err))
	}
	if resp.Succeeded {
		r.log.Info("deleted our lease that no longer fits the network config", "subnet", e.lease, "network", cfg.Network)
		r.revokeIfUnused(ctx, cli, clientv3.LeaseID(e.kv.Lease), e.lease.Subnet.String())
	}
	return nil
}

// putOnNewLease puts value at key, attached to a new etcd lease of ttl, if
// cond holds, and returns the lease, its granted TTL and when it expires.
// If the txn fails or cond does not hold (errConflict), the lease is revoked
// again: a failed attempt leaves no lease behind, and if the put did happen
// despite an error, revoking removes it again.
func (r *Registry) putOnNewLease(ctx context.Context, cli *clientv3.Client, key string, cond clientv3.Cmp, value []byte, ttl time.Duration, what string) (id clientv3.LeaseID, granted time.Duration, expires time.Time, err error) {
	start := time.Now()
	id, granted, err = r.grant(ctx, cli, ttl)
	if err != nil {
		return 0, 0, time.Time{}, err
	}
	octx, cancel := r.op(ctx)
	defer cancel()
	resp, err := cli.Txn(octx).If(cond).Then(clientv3.OpPut(key, string(value), clientv3.WithLease(id))).Commit()
	if err != nil || !resp.Succeeded {
		r.revoke(ctx, cli, id, what)
		if err != nil {
			return 0, 0, time.Time{}, fmt.Errorf("txn: %w", r.failOn(ctx, key, err))
		}
		return 0, 0, time.Time{}, errConflict
	}
	r.ok()
	return id, granted, start.Add(granted), nil
}

// grant creates an etcd lease; the server may grant more than ttl (its
// minimum TTL), and the granted TTL is returned.
func (r *Registry) grant(ctx context.Context, cli *clientv3.Client, ttl time.Duration) (clientv3.LeaseID, time.Duration, error) {
	octx, cancel := r.op(ctx)
	defer cancel()
	g, err := cli.Grant(octx, ttlSeconds(ttl))
	if err != nil {
		return 0, 0, fmt.Errorf("grant %s etcd lease: %w", ttl, r.fail(ctx, err))
	}
	return g.ID, time.Duration(g.TTL) * time.Second, nil
}

// revoke revokes an etcd lease we granted and did not use; a failure only
// leaves a lease without keys that expires at its TTL.
func (r *Registry) revoke(ctx context.Context, cli *clientv3.Client, id clientv3.LeaseID, what string) {
	if id == 0 {
		return
	}
	octx, cancel := r.op(context.WithoutCancel(ctx))
	defer cancel()
	if _, err := cli.Revoke(octx, id); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		r.log.Warn("could not revoke an unused etcd lease; it expires at its TTL", "subnet", what, "lease_id", fmt.Sprintf("%x", int64(id)), "error", err)
	}
}

// revokeIfUnused revokes an etcd lease that no key is attached to any more.
func (r *Registry) revokeIfUnused(ctx context.Context, cli *clientv3.Client, id clientv3.LeaseID, what string) {
	if id == 0 {
		return
	}
	octx, cancel := r.op(context.WithoutCancel(ctx))
	defer cancel()
	ttl, err := cli.TimeToLive(octx, id, clientv3.WithAttachedKeys())
	if err != nil || ttl.TTL <= 0 || len(ttl.Keys) > 0 {
		return
	}
	r.revoke(ctx, cli, id, what)
}

// RenewLease implements subnet.Registry with KeepAliveOnce on the key's own
// etcd lease: the key never changes, no lease is created, none is left
// behind. The TTL is the one granted when the lease was acquired (ttl is
// only used for messages). A reservation is returned as it is if its key
// still holds it.
func (r *Registry) RenewLease(ctx context.Context, l subnet.Lease, ttl time.Duration) (subnet.Lease, error) {
	cli, err := r.client(ctx)
	if err != nil {
		return l, fmt.Errorf("renew lease %s: %w", l.Subnet, err)
	}
	if err := r.checkHeld(ctx, cli, l); err != nil {
		return l, fmt.Errorf("renew lease %s: %w", l.Subnet, err)
	}
	if l.Reservation {
		return l, nil
	}
	start := time.Now()
	octx, cancel := r.op(ctx)
	defer cancel()
	used := r.tokenInUse()
	ka, err := cli.KeepAliveOnce(octx, clientv3.LeaseID(l.LeaseID))
	if err != nil && r.refreshAuth(ctx, cli.ActiveConnection(), used, err) {
		start = time.Now()
		ka, err = cli.KeepAliveOnce(octx, clientv3.LeaseID(l.LeaseID)) // a stream: made again with the new token
	}
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return l, fmt.Errorf("renew lease %s: %w: etcd lease %x expired", l.Subnet, subnet.ErrLeaseGone, l.LeaseID)
	}
	if err != nil {
		return l, fmt.Errorf("renew lease %s: keepalive: %w", l.Subnet, r.fail(ctx, err))
	}
	r.ok()
	l.Expiration = start.Add(time.Duration(ka.TTL) * time.Second)
	r.log.Debug("renewed lease", "subnet", l.Subnet, "ttl", time.Duration(ka.TTL)*time.Second, "requested_ttl", ttl)
	return l, nil
}

// checkHeld fails with subnet.ErrLeaseGone unless l's key exists, holds
// l.LeaseID and names l's PublicIP.
func (r *Registry) checkHeld(ctx context.Context, cli *clientv3.Client, l subnet.Lease) error {
	octx, cancel := r.op(ctx)
	defer cancel()
	resp, err := cli.Get(octx, r.subnetsPrefix+l.Key())
	if err != nil {
		return r.failOn(ctx, r.subnetsPrefix+l.Key(), err)
	}
	r.ok()
	if len(resp.Kvs) == 0 {
		return fmt.Errorf("%w: key deleted", subnet.ErrLeaseGone)
	}
	kv := resp.Kvs[0]
	var a subnet.LeaseAttrs
	if err := json.Unmarshal(kv.Value, &a); err != nil {
		return fmt.Errorf("%w: value overwritten: %v", subnet.ErrLeaseGone, err)
	}
	if a.PublicIP != l.Attrs.PublicIP {
		return fmt.Errorf("%w: now held by %s", subnet.ErrLeaseGone, a.PublicIP)
	}
	if kv.Lease != l.LeaseID {
		return fmt.Errorf("%w: key now on etcd lease %x, not %x", subnet.ErrLeaseGone, kv.Lease, l.LeaseID)
	}
	return nil
}

// ReacquireLease implements subnet.Registry.
func (r *Registry) ReacquireLease(ctx context.Context, l subnet.Lease, ttl time.Duration) (subnet.Lease, error) {
	a := subnet.Allocation{Subnet: l.Subnet, IPv6Subnet: l.IPv6Subnet}
	value, err := json.Marshal(l.Attrs)
	if err != nil {
		return l, fmt.Errorf("re-acquire lease %s: %w", a, err)
	}
	attrs := l.Attrs
	_ = json.Unmarshal(value, &attrs)
	nl, err := r.retryConflicts(ctx, func(bool) (subnet.Lease, error) {
		return r.tryReacquire(ctx, l, a, attrs, value, ttl)
	})
	switch {
	case errors.Is(err, errConflict):
		return l, fmt.Errorf("re-acquire lease %s: the key kept changing %d times in a row", a, r.acquireTries)
	case err != nil:
		return l, err
	}
	if cli, cerr := r.client(ctx); cerr == nil && nl.LeaseID != l.LeaseID {
		r.revokeIfUnused(ctx, cli, clientv3.LeaseID(l.LeaseID), a.String())
	}
	return nl, nil
}

func (r *Registry) tryReacquire(ctx context.Context, old subnet.Lease, a subnet.Allocation, attrs subnet.LeaseAttrs, value []byte, ttl time.Duration) (subnet.Lease, error) {
	cli, err := r.client(ctx)
	if err != nil {
		return old, fmt.Errorf("re-acquire lease %s: %w", a, err)
	}
	entries, _, _, err := r.list(ctx, cli)
	if err != nil {
		return old, fmt.Errorf("re-acquire lease %s: %w", a, err)
	}
	key := r.subnetsPrefix + a.Key()
	var held []subnet.Lease
	for _, e := range entries {
		if string(e.kv.Key) != key {
			held = append(held, e.lease)
			continue
		}
		switch {
		case !e.valueOK:
			return old, fmt.Errorf("re-acquire lease %s: %w (its key holds a malformed value)", a, subnet.ErrSubnetTaken)
		case e.lease.Attrs.PublicIP != attrs.PublicIP:
			return old, fmt.Errorf("re-acquire lease %s: %w: held by %s", a, subnet.ErrSubnetTaken, e.lease.Attrs.PublicIP)
		case e.lease.Reservation:
			return e.lease, nil
		case e.lease.LeaseID == old.LeaseID:
			nl, err := r.RenewLease(ctx, old, ttl)
			if errors.Is(err, subnet.ErrLeaseGone) { // expired: etcd deletes the key soon
				return old, fmt.Errorf("re-acquire lease %s: %w: %v", a, errConflict, err)
			}
			return nl, err
		default:
			return r.adopt(ctx, cli, e, attrs, value, ttl)
		}
	}
	for _, h := range held {
		if (h.Subnet.IsValid() && a.Subnet.IsValid() && h.Subnet.Overlaps(a.Subnet)) ||
			(h.IPv6Subnet.IsValid() && a.IPv6Subnet.IsValid() && h.IPv6Subnet.Overlaps(a.IPv6Subnet)) {
			return old, fmt.Errorf("re-acquire lease %s: %w: overlaps %s", a, subnet.ErrSubnetTaken, h)
		}
	}
	nl, err := r.create(ctx, cli, a, attrs, value, ttl)
	if err != nil {
		return old, fmt.Errorf("re-acquire: %w", err)
	}
	return nl, nil
}

// Contents is what is stored below the prefix, as status displays show it.
type Contents struct {
	ConfigKey string // <prefix>/config
	Config    []byte // its value as stored; nil if the key is absent
	// Leases are the keys below <prefix>/subnets/ that parse, in key
	// order. Expiration is when the key's etcd lease ends; it is zero for
	// a reservation and for an etcd lease that has just expired.
	Leases    []subnet.Lease
	Malformed []Malformed // keys or values that do not parse, in key order
}

// Contents reads the network config and every lease, with the expiration
// of its etcd lease (one TimeToLive call per etcd lease), and changes
// nothing; for status displays.
func (r *Registry) Contents(ctx context.Context) (*Contents, error) {
	cli, err := r.client(ctx)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.cfg.Prefix, err)
	}
	c := &Contents{ConfigKey: r.configKey}
	if c.Config, err = r.getConfig(ctx, cli); err != nil {
		return nil, err
	}
	var entries []entry
	if entries, c.Malformed, _, err = r.list(ctx, cli); err != nil {
		return nil, err
	}
	c.Leases = leasesOf(entries)
	expires := map[int64]time.Time{} // by etcd lease
	for i := range c.Leases {
		l := &c.Leases[i]
		if l.Reservation {
			continue
		}
		exp, ok := expires[l.LeaseID]
		if !ok {
			now := time.Now()
			octx, cancel := r.op(ctx)
			ttl, err := cli.TimeToLive(octx, clientv3.LeaseID(l.LeaseID))
			cancel()
			if err != nil {
				return nil, fmt.Errorf("time to live of etcd lease %x (%s): %w", l.LeaseID, r.subnetsPrefix+l.Key(), r.fail(ctx, err))
			}
			if ttl.TTL >= 0 { // -1: expired just now
				exp = now.Add(time.Duration(ttl.TTL) * time.Second)
			}
			expires[l.LeaseID] = exp
		}
		l.Expiration = exp
	}
	return c, nil
}

// Leases reads every lease below the prefix whose key and value parse, in
// key order, without their expirations: one read, whatever the number of
// leases (Contents adds a call per etcd lease).
func (r *Registry) Leases(ctx context.Context) ([]subnet.Lease, error) {
	cli, err := r.client(ctx)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.subnetsPrefix, err)
	}
	entries, _, _, err := r.list(ctx, cli)
	if err != nil {
		return nil, err
	}
	return leasesOf(entries), nil
}

// leasesOf are the leases of the entries whose value parses.
func leasesOf(entries []entry) []subnet.Lease {
	var ls []subnet.Lease
	for _, e := range entries {
		if e.valueOK {
			ls = append(ls, e.lease)
		}
	}
	return ls
}
