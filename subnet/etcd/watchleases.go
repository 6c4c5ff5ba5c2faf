package etcd

import (
	"context"

	"github.com/tulle-net/tulle/subnet"
	"go.etcd.io/etcd/api/v3/mvccpb"
)

// WatchLeases implements subnet.Registry on WatchPrefix's mechanism: the
// keys below <prefix>/subnets/ become lease events. Malformed keys and
// values are skipped (logged, counted once per version); a lease that
// becomes malformed is sent as removed. Changes that leave a lease as it
// was are not sent.
func (r *Registry) WatchLeases(ctx context.Context, events chan<- []subnet.Event) error {
	known := map[string]subnet.Lease{} // key below subnets/ -> lease as last sent
	w := &prefixWatch{r: r, prefix: r.subnetsPrefix, known: map[string]keyState{}, leases: true}
	w.deliver = func(ctx context.Context, batch []KeyEvent, snapshot bool) error {
		out := r.leaseEvents(known, batch)
		if len(out) == 0 && !snapshot {
			return nil
		}
		if out == nil {
			out = []subnet.Event{}
		}
		select {
		case events <- out:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	r.watchUp(false) // until etcd confirms it
	w.run(ctx)
	return nil
}

// leaseEvents turns key events below <prefix>/subnets/ into lease events,
// updating known.
func (r *Registry) leaseEvents(known map[string]subnet.Lease, batch []KeyEvent) []subnet.Event {
	var out []subnet.Event
	for _, ev := range batch {
		old, had := known[ev.Key]
		if ev.Deleted {
			if had {
				delete(known, ev.Key)
				out = append(out, subnet.Event{Type: subnet.EventRemoved, Lease: old})
			}
			continue
		}
		kv := &mvccpb.KeyValue{Key: []byte(r.subnetsPrefix + ev.Key), Value: ev.Value, Lease: ev.Lease, ModRevision: ev.Revision}
		l, _, err := r.parseKV(kv)
		if err != nil {
			r.noteMalformed(string(kv.Key), kv.ModRevision, err)
			if had {
				delete(known, ev.Key)
				out = append(out, subnet.Event{Type: subnet.EventRemoved, Lease: old})
			}
			continue
		}
		if had && old.Equal(l) {
			continue
		}
		known[ev.Key] = l
		out = append(out, subnet.Event{Type: subnet.EventAdded, Lease: l})
	}
	r.leaseCount.Store(int64(len(known)))
	return out
}
