package etcd

import (
	"context"
	"fmt"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Keys of other families (network policies, ...) live beside the lease
// layout, below the same prefix; these helpers read and write them with the
// registry's connection, timeouts, error reports and auth handling. The
// keys the registry manages itself (<prefix>/config, <prefix>/subnets/) are
// not written through them.

// writableKey returns <prefix>/<suffix> if suffix may be written.
func (r *Registry) writableKey(suffix string) (string, error) {
	key, err := r.key(suffix)
	if err != nil {
		return "", err
	}
	if suffix == "config" || suffix == "subnets" || strings.HasPrefix(suffix, "subnets/") {
		return "", fmt.Errorf("key %s: the network config and the leases are not written through PutKey/DeleteKey", key)
	}
	if strings.HasSuffix(suffix, "/") {
		return "", fmt.Errorf("key %s: ends with /", key)
	}
	return key, nil
}

// PutKey writes value at <prefix>/<suffix> (e.g. suffix "policies/web")
// and returns the revision of the write.
func (r *Registry) PutKey(ctx context.Context, suffix string, value []byte) (int64, error) {
	key, err := r.writableKey(suffix)
	if err != nil {
		return 0, fmt.Errorf("put: %w", err)
	}
	var rev int64
	err = r.call(ctx, key, func(ctx context.Context, cli *clientv3.Client) error {
		resp, err := cli.Put(ctx, key, string(value))
		if err != nil {
			return err
		}
		rev = resp.Header.Revision
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("put %s: %w", key, err)
	}
	return rev, nil
}

// DeleteKey deletes <prefix>/<suffix>; existed says whether it was there.
func (r *Registry) DeleteKey(ctx context.Context, suffix string) (existed bool, err error) {
	key, err := r.writableKey(suffix)
	if err != nil {
		return false, fmt.Errorf("delete: %w", err)
	}
	err = r.call(ctx, key, func(ctx context.Context, cli *clientv3.Client) error {
		resp, err := cli.Delete(ctx, key)
		if err != nil {
			return err
		}
		existed = resp.Deleted > 0
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("delete %s: %w", key, err)
	}
	return existed, nil
}

// GetKey reads <prefix>/<suffix>; ok is false when the key is absent.
func (r *Registry) GetKey(ctx context.Context, suffix string) (value []byte, ok bool, err error) {
	key, err := r.key(suffix)
	if err != nil {
		return nil, false, fmt.Errorf("get: %w", err)
	}
	err = r.call(ctx, key, func(ctx context.Context, cli *clientv3.Client) error {
		resp, err := cli.Get(ctx, key)
		if err != nil {
			return err
		}
		if len(resp.Kvs) > 0 {
			value, ok = resp.Kvs[0].Value, true
		}
		return nil
	})
	if err != nil {
		return nil, false, fmt.Errorf("get %s: %w", key, err)
	}
	return value, ok, nil
}

// ListPrefix reads every key below <prefix>/<suffix> in key order, named as
// WatchPrefix names them (the part after the prefix), and the revision it
// read at.
func (r *Registry) ListPrefix(ctx context.Context, suffix string) ([]KeyEvent, int64, error) {
	prefix, err := r.key(suffix)
	if err != nil {
		return nil, 0, fmt.Errorf("list: %w", err)
	}
	var out []KeyEvent
	var rev int64
	err = r.call(ctx, prefix, func(ctx context.Context, cli *clientv3.Client) error {
		resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
		if err != nil {
			return err
		}
		out = make([]KeyEvent, 0, len(resp.Kvs))
		for _, kv := range resp.Kvs {
			out = append(out, KeyEvent{Key: strings.TrimPrefix(string(kv.Key), prefix), Value: kv.Value, Revision: kv.ModRevision, Lease: kv.Lease})
		}
		rev = resp.Header.Revision
		return nil
	})
	if err != nil {
		return nil, 0, fmt.Errorf("list %s: %w", prefix, err)
	}
	return out, rev, nil
}

// call runs one etcd request about key with the registry's client,
// bounded by opTimeout, and records its outcome in the status.
func (r *Registry) call(ctx context.Context, key string, f func(ctx context.Context, cli *clientv3.Client) error) error {
	cli, err := r.client(ctx)
	if err != nil {
		return err
	}
	octx, cancel := r.op(ctx)
	defer cancel()
	if err := f(octx, cli); err != nil {
		return r.failOn(ctx, key, err)
	}
	r.ok()
	return nil
}
