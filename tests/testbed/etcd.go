package testbed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// DefaultEtcdPrefix is flannel's etcd prefix, which the bed's helpers write
// under.
const DefaultEtcdPrefix = "/coreos.com/network"

const etcdStartTimeout = 60 * time.Second

// EtcdOptions shape the bed's etcd server.
type EtcdOptions struct {
	// Binary runs this etcd executable in the etcd namespace (e.g.
	// Debian's etcd 3.4, as operators run it) instead of tests/etcdserver.
	Binary string
	// Users turns authentication on at the first start: the user root
	// (password EtcdRootPassword) and these users are created, then auth is
	// enabled. The bed's own client logs in as root.
	Users []EtcdUser
	// AuthTokenTTL is etcd's --auth-token-ttl: how long an unused simple
	// token lives (0: etcd's default, 5 minutes).
	AuthTokenTTL time.Duration
}

// EtcdUser is an etcd user with read-write permission on key prefixes,
// through a role of the same name.
type EtcdUser struct {
	Name, Password string
	ReadWrite      []string
}

// EtcdRootPassword is the password of etcd's root user when
// EtcdOptions.Users turns authentication on.
const EtcdRootPassword = "root-secret"

// EtcdLogFile is the etcd server's log (all runs appended).
func (b *Bed) EtcdLogFile() string { return filepath.Join(b.Dir, "etcd.log") }

func (b *Bed) etcdDataDir() string { return filepath.Join(b.Dir, "etcd-data") }

// StartEtcd starts the etcd server in the etcd namespace on the bed's data
// directory (so a restart keeps the data) and waits until it answers.
// New calls it; tests call it again after StopEtcd. The bed's client is
// made anew after each start (clientv3 can not renew its auth token on an
// etcd 3.4 that restarted).
func (b *Bed) StartEtcd(ctx context.Context) error {
	if b.Etcd == nil {
		return fmt.Errorf("testbed %s: the bed has no etcd node (Options.NoEtcd)", b.Prefix)
	}
	b.mu.Lock()
	running := b.etcdProc != nil && !b.etcdProc.exited()
	old := b.client
	b.client = nil
	b.mu.Unlock()
	if running {
		return fmt.Errorf("testbed %s: etcd is already running", b.Prefix)
	}
	if old != nil {
		_ = old.Close()
	}
	opts := b.etcdOpts
	peer := "http://" + net.JoinHostPort(EtcdAddr.String(), "2380")
	var bin string
	var args []string
	if opts.Binary != "" {
		bin = opts.Binary
		args = []string{
			"--name", "tulle-test", "--data-dir", b.etcdDataDir(),
			"--listen-client-urls", EtcdEndpoint, "--advertise-client-urls", EtcdEndpoint,
			"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
			"--initial-cluster", "tulle-test=" + peer,
			"--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
			"--bcrypt-cost", "4",
		}
	} else {
		var err error
		if bin, err = BuildEtcdServer(ctx); err != nil {
			return err
		}
		args = []string{"--data-dir", b.etcdDataDir(), "--listen-client", EtcdEndpoint, "--listen-peer", peer}
	}
	if opts.AuthTokenTTL > 0 {
		args = append(args, "--auth-token-ttl", strconv.Itoa(int((opts.AuthTokenTTL+time.Second-1)/time.Second)))
	}
	p, err := b.startProc("etcd", b.Etcd.NS, b.EtcdLogFile(), bin, args...)
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.etcdProc = p
	b.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, etcdStartTimeout)
	defer cancel()
	probe, err := b.newEtcdClient(false)
	if err != nil {
		return err
	}
	defer probe.Close()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if p.exited() {
			return fmt.Errorf("testbed %s: etcd exited at start with %s; log %s:\n%s", b.Prefix, p.exitDescription(), b.EtcdLogFile(), LogTail(b.EtcdLogFile(), 30))
		}
		// Status needs no login, so it answers with auth on too.
		sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := probe.Status(sctx, EtcdEndpoint)
		scancel()
		if err == nil && st.Leader != 0 {
			break
		}
		if err == nil {
			err = errors.New("no leader yet")
		}
		last = err
		select {
		case <-ctx.Done():
			_ = p.kill()
			return fmt.Errorf("testbed %s: etcd not ready within %v (%v); last check: %v; log:\n%s", b.Prefix, etcdStartTimeout, ctx.Err(), last, LogTail(b.EtcdLogFile(), 30))
		case <-tick.C:
		}
	}
	if len(opts.Users) > 0 && !b.etcdAuthOn() {
		if err := enableEtcdAuth(ctx, probe, opts.Users); err != nil {
			return fmt.Errorf("testbed %s: etcd: %w", b.Prefix, err)
		}
		b.mu.Lock()
		b.etcdAuth = true
		b.mu.Unlock()
	}
	b.logf("etcd ready on %s (pid %d)", EtcdEndpoint, p.pid())
	return nil
}

func (b *Bed) etcdAuthOn() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.etcdAuth
}

// enableEtcdAuth creates root and users, each with a role granting
// read-write on its prefixes, and turns authentication on.
func enableEtcdAuth(ctx context.Context, c *clientv3.Client, users []EtcdUser) error {
	if _, err := c.UserAdd(ctx, "root", EtcdRootPassword); err != nil {
		return fmt.Errorf("add user root: %w", err)
	}
	if _, err := c.UserGrantRole(ctx, "root", "root"); err != nil {
		return fmt.Errorf("grant root: %w", err)
	}
	for _, u := range users {
		if _, err := c.UserAdd(ctx, u.Name, u.Password); err != nil {
			return fmt.Errorf("add user %s: %w", u.Name, err)
		}
		if _, err := c.RoleAdd(ctx, u.Name); err != nil {
			return fmt.Errorf("add role %s: %w", u.Name, err)
		}
		for _, p := range u.ReadWrite {
			if _, err := c.RoleGrantPermission(ctx, u.Name, p, clientv3.GetPrefixRangeEnd(p), clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
				return fmt.Errorf("grant %s read-write on %s: %w", u.Name, p, err)
			}
		}
		if _, err := c.UserGrantRole(ctx, u.Name, u.Name); err != nil {
			return fmt.Errorf("grant role %s to %s: %w", u.Name, u.Name, err)
		}
	}
	if _, err := c.AuthEnable(ctx); err != nil {
		return fmt.Errorf("enable auth: %w", err)
	}
	return nil
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
	if err := stopEtcdProc(p, 15*time.Second); err != nil {
		return fmt.Errorf("testbed %s: stop etcd: %w", b.Prefix, err)
	}
	b.logf("etcd stopped")
	return nil
}

// stopEtcdProc stops etcd as systemd does (SIGTERM; SIGKILL after
// timeout). etcd 3.4 ends by raising SIGTERM again once it has stopped
// cleanly, so that counts as a clean stop as well as exit status 0.
func stopEtcdProc(p *proc, timeout time.Duration) error {
	if err := p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-p.done:
	case <-time.After(timeout):
		_ = p.kill()
		return fmt.Errorf("%s (pid %d) did not exit within %v of SIGTERM; killed", p.name, p.pid(), timeout)
	}
	if p.state == nil {
		return fmt.Errorf("%s (pid %d): %v", p.name, p.pid(), p.waitErr)
	}
	if ws, ok := p.state.Sys().(syscall.WaitStatus); p.state.Success() || ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
		return nil
	}
	return fmt.Errorf("%s (pid %d) stopped with %s", p.name, p.pid(), p.exitDescription())
}

// EtcdClient returns the bed's etcd client (created on first use after
// each StartEtcd, closed by Close), logged in as root when auth is on. Its
// connections are made inside the etcd namespace, so the test program,
// which lives in the root namespace, can reach the server.
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
	c, err := b.newEtcdClientLocked(b.etcdAuth)
	if err != nil {
		return nil, err
	}
	b.client = c
	return c, nil
}

func (b *Bed) newEtcdClient(asRoot bool) (*clientv3.Client, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.newEtcdClientLocked(asRoot)
}

func (b *Bed) newEtcdClientLocked(asRoot bool) (*clientv3.Client, error) {
	ns := b.Etcd.NS
	cfg := clientv3.Config{
		Endpoints:   []string{EtcdEndpoint},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				return Dial(ctx, ns, "tcp", addr)
			}),
		},
	}
	if asRoot {
		cfg.Username, cfg.Password = "root", EtcdRootPassword
	}
	c, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("testbed %s: etcd client for %s: %w", b.Prefix, EtcdEndpoint, err)
	}
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
