package etcd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tulle-net/tulle/subnet/internal/backoff"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"
)

// KeyEvent is one key below a watched prefix: its value after a change, or
// its deletion.
type KeyEvent struct {
	// Key is the part of the etcd key after the watched prefix: "web" for
	// <prefix>/policies/web watched as "policies/".
	Key   string
	Value []byte // nil when Deleted
	// Deleted: the key was deleted (or expired with its etcd lease).
	Deleted bool
	// Revision is the etcd revision of the change; for a change found by a
	// re-list after compaction, the revision of that listing.
	Revision int64
	// Lease is the etcd lease attached to the key, 0 for none.
	Lease int64
}

// errAuthRenewed: the session ended because etcd rejected its token, and
// a new one is in place; the watch resumes at once.
var errAuthRenewed = errors.New("auth token renewed")

// keyState is a key as last delivered.
type keyState struct {
	value []byte
	lease int64
}

// prefixWatch is the state of one watch of a prefix: WatchPrefix, and
// WatchLeases on top of it.
type prefixWatch struct {
	r      *Registry
	prefix string // the whole etcd prefix, e.g. /coreos.com/network/policies/
	// deliver hands a batch to the consumer; snapshot is true for the first
	// one. It returns an error only when ctx is done.
	deliver func(ctx context.Context, batch []KeyEvent, snapshot bool) error
	// leases: this is the lease watch, whose state Status reports
	// (revision, attempts, "watching N leases").
	leases       bool
	known        map[string]keyState // key below prefix -> as last delivered
	rev          int64               // every change up to rev has been delivered
	relist       bool                // the next session must re-list (compaction)
	snapshotSent bool
}

// WatchPrefix watches every key below <prefix>/<suffix> (suffix e.g.
// "policies/") and sends the keys to out until ctx is done: first one batch
// with every key there now (possibly empty), then every change, in
// revision order, one batch per etcd watch response. After any error it
// resumes from the last revision delivered (capped, jittered backoff:
// 100ms to 10s); after a compaction past that revision it lists again and
// sends exactly the difference to what it sent before. Nothing is sent
// twice: a put that leaves value and etcd lease as they were is not sent. A
// watch that stays silent is asked for progress and abandoned if etcd does
// not answer, so an outage is noticed although the etcd client would wait
// quietly; an expired or invalid auth token is renewed. It returns nil when
// ctx is done, an error only for an unusable suffix.
func (r *Registry) WatchPrefix(ctx context.Context, suffix string, out chan<- []KeyEvent) error {
	prefix, err := r.key(suffix)
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	w := &prefixWatch{r: r, prefix: prefix, known: map[string]keyState{},
		deliver: func(ctx context.Context, batch []KeyEvent, _ bool) error {
			select {
			case out <- batch:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}}
	w.run(ctx)
	return nil
}

// key returns the etcd key <prefix>/<suffix>.
func (r *Registry) key(suffix string) (string, error) {
	if suffix == "" || strings.HasPrefix(suffix, "/") {
		return "", fmt.Errorf("key %q below %s: want a relative, non-empty key such as \"policies/\"", suffix, r.cfg.Prefix)
	}
	return r.cfg.Prefix + "/" + suffix, nil
}

// run watches until ctx is done.
func (w *prefixWatch) run(ctx context.Context) {
	r := w.r
	bo := backoff.Backoff{Min: r.backoffMin, Max: r.backoffMax}
	lastCompacted := false
	for {
		if w.leases {
			r.attempts.Add(1)
		}
		connectedAt, err := w.session(ctx)
		if ctx.Err() != nil {
			return
		}
		if w.leases {
			r.watchUp(false)
		}
		if !connectedAt.IsZero() && time.Since(connectedAt) >= r.backoffMax {
			bo.Reset()
		}
		if errors.Is(err, errAuthRenewed) {
			r.log.Info("etcd watch resumes with a new auth token", "prefix", w.prefix, "revision", w.rev)
			continue
		}
		if errors.Is(err, rpctypes.ErrCompacted) && !lastCompacted {
			lastCompacted = true
			r.log.Info("etcd compacted past the watch; listing again", "prefix", w.prefix, "revision", w.rev, "error", err)
			continue
		}
		lastCompacted = errors.Is(err, rpctypes.ErrCompacted)
		if !lastCompacted {
			err = r.failOn(ctx, w.prefix, err)
		}
		d := bo.Next()
		r.log.Warn("etcd watch interrupted; will resume", "prefix", w.prefix, "revision", w.rev, "error", err, "retry_in", d.Round(time.Millisecond))
		if !backoff.Sleep(ctx, d) {
			return
		}
	}
}

// session lists if needed, then watches until an error or ctx is done. It
// returns when the watch was created (zero if it never was).
func (w *prefixWatch) session(ctx context.Context) (connectedAt time.Time, err error) {
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
	// Each session gets a gRPC stream of its own (clientv3 shares one
	// among watches with the same metadata): a stream made with a token
	// etcd has since rejected must not be joined again.
	used := r.tokenInUse()
	wctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(clientv3.WithRequireLeader(ctx),
		"tulle-watch-session", strconv.FormatUint(r.sessions.Add(1), 10)))
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
	wch := cli.Watch(wctx, w.prefix, clientv3.WithPrefix(), clientv3.WithRev(from),
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
					return connectedAt, fmt.Errorf("watch %s from revision %d: etcd did not confirm within %s: %w", w.prefix, from, r.opTimeout, context.DeadlineExceeded)
				}
				return connectedAt, fmt.Errorf("watch %s from revision %d: closed by the etcd client", w.prefix, from)
			}
			lastRecv, probeSent = time.Now(), time.Time{}
			if err := resp.Err(); err != nil {
				if errors.Is(err, rpctypes.ErrCompacted) {
					w.relist = true
					return connectedAt, fmt.Errorf("watch %s from revision %d: %w (compacted up to %d)", w.prefix, from, err, resp.CompactRevision)
				}
				err = fmt.Errorf("watch %s from revision %d: %w", w.prefix, from, err)
				if r.refreshAuth(ctx, cli.ActiveConnection(), used, err) {
					err = fmt.Errorf("%w: %w", errAuthRenewed, err)
				}
				return connectedAt, err
			}
			switch {
			case resp.Created:
				createTimer.Stop()
				connectedAt = time.Now()
				if w.leases {
					r.watchUp(true)
				}
				w.okDetail()
			case resp.IsProgressNotify():
				r.ok()
				w.noteRevision(resp.Header.Revision)
			default:
				if err := w.apply(ctx, resp.Events); err != nil {
					return connectedAt, nil // ctx done while delivering
				}
				w.okDetail()
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
				w.prefix, w.rev, time.Since(lastRecv).Round(time.Millisecond), context.DeadlineExceeded)
		}
	}
}

// okDetail records a working watch; the lease watch also says what it
// watches.
func (w *prefixWatch) okDetail() {
	if !w.leases {
		w.r.ok()
		return
	}
	w.r.okDetail(fmt.Sprintf("watching %d leases at revision %d", w.r.leaseCount.Load(), w.rev))
}

// noteRevision records a revision the lease watch has seen for Status. A
// progress notification does not move w.rev: resuming always starts after
// the last event applied.
func (w *prefixWatch) noteRevision(rev int64) {
	if !w.leases {
		return
	}
	for {
		cur := w.r.watchRev.Load()
		if rev <= cur || w.r.watchRev.CompareAndSwap(cur, rev) {
			return
		}
	}
}

// resync lists every key at the current revision. The first time it
// delivers them all; later (after a compaction) it delivers exactly the
// difference to what was delivered before.
func (w *prefixWatch) resync(ctx context.Context, cli *clientv3.Client) error {
	r := w.r
	octx, cancel := r.op(ctx)
	resp, err := cli.Get(octx, w.prefix, clientv3.WithPrefix())
	cancel()
	if err != nil {
		return fmt.Errorf("list %s: %w", w.prefix, r.failOn(ctx, w.prefix, err))
	}
	r.ok()
	rev := resp.Header.Revision
	now := make(map[string]keyState, len(resp.Kvs))
	var batch []KeyEvent
	for _, kv := range resp.Kvs {
		k := strings.TrimPrefix(string(kv.Key), w.prefix)
		st := keyState{value: kv.Value, lease: kv.Lease}
		now[k] = st
		if old, ok := w.known[k]; !ok || !old.equal(st) {
			batch = append(batch, KeyEvent{Key: k, Value: kv.Value, Revision: kv.ModRevision, Lease: kv.Lease})
		}
	}
	if w.snapshotSent {
		for _, k := range sortedKeys(w.known) {
			if _, ok := now[k]; !ok {
				batch = append(batch, KeyEvent{Key: k, Deleted: true, Revision: rev})
			}
		}
	}
	// Deletions first, then puts, each in key order: the order a consumer
	// would see from the changes themselves does not exist after a
	// compaction, so make it deterministic.
	sort.SliceStable(batch, func(i, j int) bool {
		if batch[i].Deleted != batch[j].Deleted {
			return batch[i].Deleted
		}
		return batch[i].Key < batch[j].Key
	})
	w.known, w.rev, w.relist = now, rev, false
	if w.leases {
		r.watchRev.Store(rev)
	}
	if w.snapshotSent && len(batch) == 0 {
		return nil
	}
	if batch == nil {
		batch = []KeyEvent{}
	}
	if err := w.deliver(ctx, batch, !w.snapshotSent); err != nil {
		return err
	}
	w.snapshotSent = true
	w.okDetail()
	return nil
}

// apply turns watch events into key events and delivers them as one batch.
// Events at or below w.rev were delivered already (by the snapshot or
// before a resume) and are dropped, as are puts that change nothing.
func (w *prefixWatch) apply(ctx context.Context, evs []*clientv3.Event) error {
	var batch []KeyEvent
	last := w.rev
	for _, ev := range evs {
		rev := ev.Kv.ModRevision
		if rev <= w.rev {
			continue
		}
		last = max(last, rev)
		k := strings.TrimPrefix(string(ev.Kv.Key), w.prefix)
		old, had := w.known[k]
		switch ev.Type {
		case mvccpb.PUT:
			st := keyState{value: ev.Kv.Value, lease: ev.Kv.Lease}
			if had && old.equal(st) {
				continue
			}
			w.known[k] = st
			batch = append(batch, KeyEvent{Key: k, Value: ev.Kv.Value, Revision: rev, Lease: ev.Kv.Lease})
		case mvccpb.DELETE:
			if had {
				delete(w.known, k)
				batch = append(batch, KeyEvent{Key: k, Deleted: true, Revision: rev})
			}
		}
	}
	w.rev = last
	w.noteRevision(last)
	if len(batch) == 0 {
		return nil
	}
	return w.deliver(ctx, batch, false)
}

func (s keyState) equal(o keyState) bool {
	return s.lease == o.lease && bytes.Equal(s.value, o.value)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
