package testbed

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// DefaultEtcdPrefix is flannel's etcd prefix, which the bed's helpers write
// under.
const DefaultEtcdPrefix = "/coreos.com/network"

const etcdStartTimeout = 60 * time.Second

// EtcdLogFile is the etcd server's log (all runs appended).
func (b *Bed) EtcdLogFile() string { return filepath.Join(b.Dir, "etcd.log") }

func (b *Bed) etcdDataDir() string { return filepath.Join(b.Dir, "etcd-data") }

// StartEtcd starts the etcd server in the etcd namespace on the bed's data
// directory (so a restart keeps the data) and waits until it answers
// /health. New calls it; tests call it again after StopEtcd.
func (b *Bed) StartEtcd(ctx context.Context) error {
	if b.Etcd == nil {
		return fmt.Errorf("testbed %s: the bed has no etcd node (Options.NoEtcd)", b.Prefix)
	}
	b.mu.Lock()
	running := b.etcdProc != nil && !b.etcdProc.exited()
	b.mu.Unlock()
	if running {
		return fmt.Errorf("testbed %s: etcd is already running", b.Prefix)
	}
	bin, err := BuildEtcdServer(ctx)
	if err != nil {
		return err
	}
	p, err := b.startProc("etcd", b.Etcd.NS, b.EtcdLogFile(), bin,
		"--data-dir", b.etcdDataDir(),
		"--listen-client", EtcdEndpoint,
		"--listen-peer", "http://"+net.JoinHostPort(EtcdAddr.String(), "2380"),
	)
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.etcdProc = p
	b.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, etcdStartTimeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if p.exited() {
			return fmt.Errorf("testbed %s: etcd exited at start with %s; log %s:\n%s", b.Prefix, p.exitDescription(), b.EtcdLogFile(), LogTail(b.EtcdLogFile(), 30))
		}
		hctx, hcancel := context.WithTimeout(ctx, 2*time.Second)
		code, body, err := HTTPGet(hctx, b.Etcd.NS, EtcdEndpoint+"/health")
		hcancel()
		if err == nil && code == 200 && strings.Contains(string(body), `"true"`) {
			b.logf("etcd ready on %s (pid %d)", EtcdEndpoint, p.pid())
			return nil
		}
		if err == nil {
			err = fmt.Errorf("/health answered %d: %s", code, strings.TrimSpace(string(body)))
		}
		last = err
		select {
		case <-ctx.Done():
			_ = p.kill()
			return fmt.Errorf("testbed %s: etcd not healthy within %v (%v); last check: %v; log:\n%s", b.Prefix, etcdStartTimeout, ctx.Err(), last, LogTail(b.EtcdLogFile(), 30))
		case <-tick.C:
		}
	}
}

// StopEtcd stops the etcd server (SIGTERM) and waits for it; the data
// stays for StartEtcd.
func (b *Bed) StopEtcd() error {
	b.mu.Lock()
	p := b.etcdProc
	b.mu.Unlock()
	if p == nil || p.exited() {
		return fmt.Errorf("testbed %s: etcd is not running", b.Prefix)
	}
	if err := p.stop(15 * time.Second); err != nil {
		return fmt.Errorf("testbed %s: stop etcd: %w", b.Prefix, err)
	}
	b.logf("etcd stopped")
	return nil
}

// EtcdClient returns the bed's etcd client (created on first use, closed
// by Close). Its connections are made inside the etcd namespace, so the
// test program, which lives in the root namespace, can reach the server. It
// reconnects by itself after StopEtcd / StartEtcd.
func (b *Bed) EtcdClient() (*clientv3.Client, error) {
	if b.Etcd == nil {
		return nil, fmt.Errorf("testbed %s: the bed has no etcd node (Options.NoEtcd)", b.Prefix)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, fmt.Errorf("testbed %s: the bed is closed", b.Prefix)
	}
	if b.client != nil {
		return b.client, nil
	}
	ns := b.Etcd.NS
	c, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{EtcdEndpoint},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				return Dial(ctx, ns, "tcp", addr)
			}),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("testbed %s: etcd client for %s: %w", b.Prefix, EtcdEndpoint, err)
	}
	b.client = c
	return c, nil
}

// WriteNetworkConfig puts config (flannel's JSON, e.g. DefaultNetworkConfig)
// at /coreos.com/network/config. It does not validate it: tests write bad
// configs on purpose.
func (b *Bed) WriteNetworkConfig(ctx context.Context, config string) error {
	c, err := b.EtcdClient()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.Put(ctx, DefaultEtcdPrefix+"/config", config); err != nil {
		return fmt.Errorf("testbed %s: put %s/config: %w", b.Prefix, DefaultEtcdPrefix, err)
	}
	return nil
}

// FlannelLeaseKey is flannel's etcd key of an IPv4 lease:
// /coreos.com/network/subnets/198.18.7.0-24.
func FlannelLeaseKey(subnet netip.Prefix) string {
	subnet = subnet.Masked()
	return fmt.Sprintf("%s/subnets/%s-%d", DefaultEtcdPrefix, subnet.Addr(), subnet.Bits())
}

// PutFlannelLease writes a lease exactly as a flanneld udp host does: key
// FlannelLeaseKey(subnet), value {"PublicIP":"<publicIP>","PublicIPv6":null},
// attached to an etcd lease of ttl (ttl 0 writes a reservation: no etcd
// lease). It returns the etcd lease ID (0 for a reservation).
func (b *Bed) PutFlannelLease(ctx context.Context, subnet netip.Prefix, publicIP netip.Addr, ttl time.Duration) (clientv3.LeaseID, error) {
	c, err := b.EtcdClient()
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	value, err := json.Marshal(struct {
		PublicIP   string
		PublicIPv6 *string
	}{PublicIP: publicIP.String()})
	if err != nil {
		return 0, err
	}
	key := FlannelLeaseKey(subnet)
	var opts []clientv3.OpOption
	var id clientv3.LeaseID
	if ttl > 0 {
		g, err := c.Grant(ctx, int64((ttl+time.Second-1)/time.Second))
		if err != nil {
			return 0, fmt.Errorf("testbed %s: grant an etcd lease for %s: %w", b.Prefix, key, err)
		}
		id = g.ID
		opts = append(opts, clientv3.WithLease(id))
	}
	if _, err := c.Put(ctx, key, string(value), opts...); err != nil {
		return 0, fmt.Errorf("testbed %s: put %s: %w", b.Prefix, key, err)
	}
	return id, nil
}

// Leases returns the leases in etcd: subnet key ("198.18.1.0-24") -> PublicIP.
func (b *Bed) Leases(ctx context.Context) (map[string]string, error) {
	c, err := b.EtcdClient()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	prefix := DefaultEtcdPrefix + "/subnets/"
	resp, err := c.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("testbed %s: get %s: %w", b.Prefix, prefix, err)
	}
	out := make(map[string]string, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var v struct{ PublicIP string }
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, fmt.Errorf("testbed %s: lease %s: %w", b.Prefix, kv.Key, err)
		}
		out[strings.TrimPrefix(string(kv.Key), prefix)] = v.PublicIP
	}
	return out, nil
}
