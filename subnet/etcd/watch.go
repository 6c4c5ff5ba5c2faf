package etcd

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync/atomic"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/internal/backoff"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// watcher is the state of one WatchLeases call.
type watcher struct {
	r            *Registry
	out          chan<- []subnet.Event
	known        map[string]subnet.Lease // etcd key -> lease, as last sent
	rev          int64                   // every change up to rev has been applied
	relist       bool                    // the next session must re-list (compaction)
	snapshotSent bool
}

// WatchLeases implements subnet.Registry. It lists <prefix>/subnets/ at
// revision R, sends that snapshot, then sends every change after R. After any error
// it resumes from the last revision applied, after a capped, jittered
// backoff (100ms to 10s); after a compaction past that revision it lists
// again and sends exactly the difference. Events below the applied revision
// are dropped, so nothing is sent twice. A watch that stays silent is asked
// for progress (RequestProgress) and abandoned if etcd does not answer, so
// an outage is noticed even though the etcd client would wait quietly.
// Malformed keys and values are skipped (logged, counted); a lease that
// becomes malformed is sent as removed.
func (r *Registry) WatchLeases(ctx context.Context, events chan<- []subnet.Event) error {
	w := &watcher{r: r, out: events, known: map[string]subnet.Lease{}}
	bo := backoff.Backoff{Min: r.backoffMin, Max: r.backoffMax}
	lastCompacted := false
	for {
		r.attempts.Add(1)
		connectedAt, err := w.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if !connectedAt.IsZero() && time.Since(connectedAt) >= r.backoffMax {
			bo.Reset()
		}
		if errors.Is(err, rpctypes.ErrCompacted) && !lastCompacted {
			lastCompacted = true
			r.log.Info("etcd compacted past the watch; listing leases again", "revision", w.rev, "error", err)
			continue
		}
		lastCompacted = errors.Is(err, rpctypes.ErrCompacted)
		if !lastCompacted {
			err = r.fail(ctx, err)
		}
		d := bo.Next()
		r.log.Warn("etcd watch interrupted; will resume", "revision", w.rev, "error", err, "retry_in", d.Round(time.Millisecond))
		if !backoff.Sleep(ctx, d) {
			return nil
		}
	}
}

// session lists if needed, then watches until an error or ctx is done. It
// returns when the watch was created (zero if it never was).
func (w *watcher) session(ctx context.Context) (connectedAt time.Time, err error) {
	r := w.r
	cli, err := r.client(ctx)
	if err != nil {
		return time.Time{}, err
	}
	if w.rev == 0 || w.relist {
		if err := w.resync(ctx, cli); err != nil {
			return time.Time{}, err
		}
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	// Until etcd confirms the watch, clientv3 may wait silently: give up
	// after opTimeout.
	var createTimedOut atomic.Bool
	createTimer := time.AfterFunc(r.opTimeout, func() { createTimedOut.Store(true); cancel() })
	defer createTimer.Stop()
	// Changes after w.rev are wanted; the watch starts at w.rev itself (its
	// events come again and are dropped by apply) because etcd answers a
	// progress request only once the store has reached the watch's start
	// revision: a watch from w.rev+1 with no write since could not be probed.
	from := w.rev
	wch := cli.Watch(wctx, r.subnetsPrefix, clientv3.WithPrefix(), clientv3.WithRev(from),
		clientv3.WithProgressNotify(), clientv3.WithCreatedNotify())

	tick := time.NewTicker(max(r.probeInterval/4, 10*time.Millisecond))
	defer tick.Stop()
	lastRecv := time.Now()
	var probeSent time.Time
	for {
		select {
		case <-ctx.Done():
			return connectedAt, nil
		case resp, ok := <-wch:
			if !ok {
				if ctx.Err() != nil {
					return connectedAt, nil
				}
				if createTimedOut.Load() {
					return connectedAt, fmt.Errorf("watch %s from revision %d: etcd did not confirm within %s: %w", r.subnetsPrefix, from, r.opTimeout, context.DeadlineExceeded)
				}
				return connectedAt, fmt.Errorf("watch %s from revision %d: closed by the etcd client", r.subnetsPrefix, from)
			}
			lastRecv, probeSent = time.Now(), time.Time{}
			if err := resp.Err(); err != nil {
				if errors.Is(err, rpctypes.ErrCompacted) {
					w.relist = true
					return connectedAt, fmt.Errorf("watch %s from revision %d: %w (compacted up to %d)", r.subnetsPrefix, from, err, resp.CompactRevision)
				}
				return connectedAt, fmt.Errorf("watch %s from revision %d: %w", r.subnetsPrefix, from, err)
			}
			switch {
			case resp.Created:
				createTimer.Stop()
				connectedAt = time.Now()
				r.okDetail(fmt.Sprintf("watching %d leases at revision %d", len(w.known), w.rev))
			case resp.IsProgressNotify():
				r.ok()
				w.noteRevision(resp.Header.Revision)
			default:
				if err := w.apply(ctx, resp.Events); err != nil {
					return connectedAt, nil // ctx done while sending
				}
				r.okDetail(fmt.Sprintf("watching %d leases at revision %d", len(w.known), w.rev))
			}
		case <-tick.C:
			if connectedAt.IsZero() || time.Since(lastRecv) < r.probeInterval {
				continue
			}
			if probeSent.IsZero() {
				probeSent = time.Now()
				pctx, pcancel := context.WithTimeout(wctx, r.probeInterval)
				err := cli.RequestProgress(pctx) // same metadata as wctx: same stream
				pcancel()
				if err == nil || ctx.Err() != nil {
					continue
				}
			} else if time.Since(probeSent) < r.probeInterval {
				continue
			}
			return connectedAt, fmt.Errorf("watch %s at revision %d: no answer from etcd for %s: %w",
				r.subnetsPrefix, w.rev, time.Since(lastRecv).Round(time.Millisecond), context.DeadlineExceeded)
		}
	}
}

// noteRevision records a revision the watch has seen for Status. A progress
// notification does not move w.rev: resuming always starts after the last
// event applied.
func (w *watcher) noteRevision(rev int64) {
	for {
		cur := w.r.watchRev.Load()
		if rev <= cur || w.r.watchRev.CompareAndSwap(cur, rev) {
			return
		}
	}
}

// resync lists all leases at the current revision. The first time it sends
// them all as EventAdded; later (after a compaction) it sends the exact
// difference to what was sent before.
func (w *watcher) resync(ctx context.Context, cli *clientv3.Client) error {
	entries, _, rev, err := w.r.list(ctx, cli)
	if err != nil {
		return err
	}
	now := make(map[string]subnet.Lease, len(entries))
	for _, e := range entries {
		if e.valueOK {
			now[string(e.kv.Key)] = e.lease
		}
	}
	var batch []subnet.Event
	if w.snapshotSent {
		for _, k := range sortedKeys(w.known) {
			if _, ok := now[k]; !ok {
				batch = append(batch, subnet.Event{Type: subnet.EventRemoved, Lease: w.known[k]})
			}
		}
	}
	for _, k := range sortedKeys(now) {
		if old, ok := w.known[k]; !ok || !old.Equal(now[k]) {
			batch = append(batch, subnet.Event{Type: subnet.EventAdded, Lease: now[k]})
		}
	}
	w.known, w.rev, w.relist = now, rev, false
	w.r.watchRev.Store(rev)
	if w.snapshotSent && len(batch) == 0 {
		return nil
	}
	if batch == nil {
		batch = []subnet.Event{}
	}
	if err := w.send(ctx, batch); err != nil {
		return err
	}
	w.snapshotSent = true
	w.r.okDetail(fmt.Sprintf("watching %d leases at revision %d", len(w.known), w.rev))
	return nil
}

// apply turns watch events into lease events and sends them as one batch.
// Events at or below w.rev were applied already (by the snapshot or before
// a resume) and are dropped.
func (w *watcher) apply(ctx context.Context, evs []*clientv3.Event) error {
	var batch []subnet.Event
	last := w.rev
	for _, ev := range evs {
		rev := ev.Kv.ModRevision
		if rev <= w.rev {
			continue
		}
		last = max(last, rev)
		key := string(ev.Kv.Key)
		old, had := w.known[key]
		switch ev.Type {
		case mvccpb.PUT:
			l, _, err := w.r.parseKV(ev.Kv)
			if err != nil {
				w.r.noteMalformed(key, rev, err)
				if had {
					delete(w.known, key)
					batch = append(batch, subnet.Event{Type: subnet.EventRemoved, Lease: old})
				}
				continue
			}
			if had && old.Equal(l) {
				continue
			}
			w.known[key] = l
			batch = append(batch, subnet.Event{Type: subnet.EventAdded, Lease: l})
		case mvccpb.DELETE:
			if had {
				delete(w.known, key)
				batch = append(batch, subnet.Event{Type: subnet.EventRemoved, Lease: old})
			}
		}
	}
	w.rev = last
	w.noteRevision(last)
	if len(batch) == 0 {
		return nil
	}
	return w.send(ctx, batch)
}

func (w *watcher) send(ctx context.Context, batch []subnet.Event) error {
	select {
	case w.out <- batch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func sortedKeys(m map[string]subnet.Lease) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
