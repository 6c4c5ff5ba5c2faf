package testbed

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/tests/testcert"
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
	// Binary runs this etcd executable (e.g. Debian's etcd 3.4, as
	// operators run it) instead of tests/etcdserver.
	Binary string
	// Members is the number of etcd members: 0 or 1 for one, at
	// 192.0.2.250 in the etcd namespace; 3 for a cluster, at 192.0.2.250,
	// .251 and .252, each member in a namespace of its own.
	Members int
	// TLS makes the members serve clients over TLS and require a client
	// certificate; the bed writes a CA, the members' certificate and a
	// client certificate (EtcdTLS), and TulledArgs gives tulled its files.
	TLS bool
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

const maxEtcdMembers = 3

// etcdMember is one etcd member of the bed.
type etcdMember struct {
	index int    // 1-based
	name  string // member name: "e1"
	node  *Node
	proc  *proc
}

// buildEtcd creates the namespace of each etcd member (the first is
// b.Etcd), the TLS files, and starts the members.
func (b *Bed) buildEtcd(ctx context.Context) error {
	n := max(b.etcdOpts.Members, 1)
	if n > maxEtcdMembers || n == 2 {
		return fmt.Errorf("testbed: EtcdOptions.Members %d: want 1 or 3", b.etcdOpts.Members)
	}
	for i := 1; i <= n; i++ {
		role, ns, link, port := "etcd", b.Prefix+"-etcd", b.Prefix+"ue", b.Prefix+"se"
		if i > 1 {
			role, ns, link, port = fmt.Sprintf("etcd%d", i), fmt.Sprintf("%s-etcd%d", b.Prefix, i), fmt.Sprintf("%sue%d", b.Prefix, i), fmt.Sprintf("%sse%d", b.Prefix, i)
		}
		node, err := b.attach(ctx, role, ns, link, port, etcdAddr(i), defaultMTU)
		if err != nil {
			return err
		}
		if i == 1 {
			b.Etcd = node
		}
		b.etcdMembers = append(b.etcdMembers, &etcdMember{index: i, name: fmt.Sprintf("e%d", i), node: node})
	}
	if b.etcdOpts.TLS {
		dir := filepath.Join(b.Dir, "etcd-tls")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("testbed: %w", err)
		}
		var ips []net.IP
		for i := 1; i <= n; i++ {
			ips = append(ips, net.IP(etcdAddr(i).AsSlice()))
		}
		f, err := testcert.Write(dir, "testbed etcd CA", ips...)
		if err != nil {
			return fmt.Errorf("testbed: %w", err)
		}
		b.etcdTLS = &f
	}
	return b.StartEtcd(ctx)
}

// etcdAddr is member i's underlay address: 192.0.2.250, .251, .252.
func etcdAddr(i int) netip.Addr {
	a := EtcdAddr.As4()
	a[3] += byte(i - 1)
	return netip.AddrFrom4(a)
}

func (b *Bed) etcdScheme() string {
	if b.etcdOpts.TLS {
		return "https"
	}
	return "http"
}

func (b *Bed) memberEndpoint(m *etcdMember) string {
	return b.etcdScheme() + "://" + net.JoinHostPort(m.node.Addr.String(), "2379")
}

// EtcdEndpoints are the client URLs of every etcd member, as tulled is
// given them: "http://192.0.2.250:2379" for the default bed.
func (b *Bed) EtcdEndpoints() []string {
	var eps []string
	for _, m := range b.etcdMembers {
		eps = append(eps, b.memberEndpoint(m))
	}
	return eps
}

// EtcdTLS returns the bed's TLS files (CA, member and client certificates)
// when EtcdOptions.TLS is set.
func (b *Bed) EtcdTLS() (testcert.Files, bool) {
	if b.etcdTLS == nil {
		return testcert.Files{}, false
	}
	return *b.etcdTLS, true
}

// etcdTulledArgs are the --etcd-* flags of tulled for the bed's etcd:
// every endpoint and, with TLS, the CA and client certificate.
func (b *Bed) etcdTulledArgs() []string {
	args := []string{"--etcd-endpoints", strings.Join(b.EtcdEndpoints(), ",")}
	if f := b.etcdTLS; f != nil {
		args = append(args, "--etcd-cafile", f.CA, "--etcd-certfile", f.ClientCert, "--etcd-keyfile", f.ClientKey)
	}
	return args
}

// EtcdLogFile is the first etcd member's log (all runs appended).
func (b *Bed) EtcdLogFile() string { return b.memberLogFile(1) }

func (b *Bed) memberLogFile(i int) string {
	if i == 1 {
		return filepath.Join(b.Dir, "etcd.log")
	}
	return filepath.Join(b.Dir, fmt.Sprintf("etcd%d.log", i))
}

func (b *Bed) memberDataDir(i int) string {
	if i == 1 {
		return filepath.Join(b.Dir, "etcd-data")
	}
	return filepath.Join(b.Dir, fmt.Sprintf("etcd%d-data", i))
}

// StartEtcd starts every etcd member that does not run, on its data
// directory (so a restart keeps the data), and waits until each answers.
// New calls it; tests call it again after StopEtcd. The bed's client is
// made anew after each start (clientv3 can not renew its auth token on an
// etcd 3.4 that restarted).
func (b *Bed) StartEtcd(ctx context.Context) error {
	if b.Etcd == nil {
		return fmt.Errorf("testbed %s: the bed has no etcd node (Options.NoEtcd)", b.Prefix)
	}
	var started []*etcdMember
	for _, m := range b.etcdMembers {
		b.mu.Lock()
		running := m.proc != nil && !m.proc.exited()
		b.mu.Unlock()
		if running {
			continue
		}
		if err := b.launchMember(ctx, m); err != nil {
			return err
		}
		started = append(started, m)
	}
	if len(started) == 0 {
		return fmt.Errorf("testbed %s: etcd is already running", b.Prefix)
	}
	for _, m := range started {
		if err := b.waitMember(ctx, m); err != nil {
			return err
		}
	}
	if len(b.etcdOpts.Users) > 0 && !b.etcdAuthOn() {
		probe, err := b.newEtcdClient(false)
		if err != nil {
			return err
		}
		defer probe.Close()
		actx, cancel := context.WithTimeout(ctx, etcdStartTimeout)
		defer cancel()
		if err := enableEtcdAuth(actx, probe, b.etcdOpts.Users); err != nil {
			return fmt.Errorf("testbed %s: etcd: %w", b.Prefix, err)
		}
		b.mu.Lock()
		b.etcdAuth = true
		b.mu.Unlock()
	}
	return nil
}

// StartEtcdMember starts member i (1-based) again and waits until it
// serves (it needs a quorum).
func (b *Bed) StartEtcdMember(ctx context.Context, i int) error {
	m, err := b.member(i)
	if err != nil {
		return err
	}
	if err := b.launchMember(ctx, m); err != nil {
		return err
	}
	return b.waitMember(ctx, m)
}

func (b *Bed) member(i int) (*etcdMember, error) {
	if i < 1 || i > len(b.etcdMembers) {
		return nil, fmt.Errorf("testbed %s: no etcd member %d (the bed has %d)", b.Prefix, i, len(b.etcdMembers))
	}
	return b.etcdMembers[i-1], nil
}

// launchMember starts member m's process without waiting for it. A new
// client is made after it (see StartEtcd).
func (b *Bed) launchMember(ctx context.Context, m *etcdMember) error {
	b.mu.Lock()
	if m.proc != nil && !m.proc.exited() {
		b.mu.Unlock()
		return fmt.Errorf("testbed %s: etcd member %s is already running", b.Prefix, m.name)
	}
	old := b.client
	b.client = nil
	b.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
	opts := b.etcdOpts
	client := b.memberEndpoint(m)
	peer := "http://" + net.JoinHostPort(m.node.Addr.String(), "2380")
	var cluster []string
	for _, o := range b.etcdMembers {
		cluster = append(cluster, o.name+"=http://"+net.JoinHostPort(o.node.Addr.String(), "2380"))
	}
	common := []string{
		"--name", m.name, "--data-dir", b.memberDataDir(m.index),
		"--initial-cluster", strings.Join(cluster, ","),
		"--heartbeat-interval", "100", "--election-timeout", "1000", // etcd's defaults
	}
	if opts.AuthTokenTTL > 0 {
		common = append(common, "--auth-token-ttl", strconv.Itoa(int((opts.AuthTokenTTL+time.Second-1)/time.Second)))
	}
	if f := b.etcdTLS; f != nil {
		common = append(common, "--cert-file", f.ServerCert, "--key-file", f.ServerKey, "--trusted-ca-file", f.CA, "--client-cert-auth")
	}
	var bin string
	var args []string
	if opts.Binary != "" {
		bin = opts.Binary
		args = append(common,
			"--listen-client-urls", client, "--advertise-client-urls", client,
			"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
			"--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
			"--bcrypt-cost", "4")
	} else {
		var err error
		if bin, err = BuildEtcdServer(ctx); err != nil {
			return err
		}
		args = append(common, "--listen-client", client, "--listen-peer", peer)
	}
	p, err := b.startProc("etcd "+m.name, m.node.NS, b.memberLogFile(m.index), bin, args...)
	if err != nil {
		return err
	}
	b.mu.Lock()
	m.proc = p
	b.mu.Unlock()
	return nil
}

// waitMember waits until member m answers a status request with a leader
// known (Status needs no login, so it answers with auth on too).
func (b *Bed) waitMember(ctx context.Context, m *etcdMember) error {
	ctx, cancel := context.WithTimeout(ctx, etcdStartTimeout)
	defer cancel()
	probe, err := b.newEtcdClient(false)
	if err != nil {
		return err
	}
	defer probe.Close()
	ep := b.memberEndpoint(m)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if m.proc.exited() {
			return fmt.Errorf("testbed %s: etcd %s exited at start with %s; log %s:\n%s", b.Prefix, m.name, m.proc.exitDescription(), b.memberLogFile(m.index), LogTail(b.memberLogFile(m.index), 30))
		}
		sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := probe.Status(sctx, ep)
		scancel()
		if err == nil && st.Leader != 0 {
			b.logf("etcd %s ready on %s (pid %d)", m.name, ep, m.proc.pid())
			return nil
		}
		if err == nil {
			err = errors.New("no leader yet")
		}
		last = err
		select {
		case <-ctx.Done():
			_ = m.proc.kill()
			return fmt.Errorf("testbed %s: etcd %s not ready within %v (%v); last check: %v; log:\n%s", b.Prefix, m.name, etcdStartTimeout, ctx.Err(), last, LogTail(b.memberLogFile(m.index), 30))
		case <-tick.C:
		}
	}
}

func (b *Bed) etcdAuthOn() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.etcdAuth
}

// EtcdLeader returns the member (1-based) that leads the cluster now.
func (b *Bed) EtcdLeader(ctx context.Context) (int, error) {
	probe, err := b.newEtcdClient(false)
	if err != nil {
		return 0, err
	}
	defer probe.Close()
	for _, m := range b.etcdMembers {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := probe.Status(sctx, b.memberEndpoint(m))
		cancel()
		if err == nil && st.Leader != 0 && st.Leader == st.Header.MemberId {
			return m.index, nil
		}
	}
	return 0, fmt.Errorf("testbed %s: no etcd member says it leads", b.Prefix)
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

// StopEtcd stops every etcd member (SIGTERM) and waits for them; the data
// stays for StartEtcd.
func (b *Bed) StopEtcd() error {
	var errs []error
	stopped := 0
	for _, m := range b.etcdMembers {
		b.mu.Lock()
		p := m.proc
		b.mu.Unlock()
		if p == nil || p.exited() {
			continue
		}
		if err := stopEtcdProc(p, 15*time.Second); err != nil {
			errs = append(errs, fmt.Errorf("testbed %s: stop etcd %s: %w", b.Prefix, m.name, err))
		}
		stopped++
	}
	if stopped == 0 {
		return fmt.Errorf("testbed %s: etcd is not running", b.Prefix)
	}
	b.logf("etcd stopped")
	return errors.Join(errs...)
}

// runningMember returns member i (1-based) and its process, or an error if
// it is not running.
func (b *Bed) runningMember(i int) (*etcdMember, *proc, error) {
	m, err := b.member(i)
	if err != nil {
		return nil, nil, err
	}
	b.mu.Lock()
	p := m.proc
	b.mu.Unlock()
	if p == nil || p.exited() {
		return nil, nil, fmt.Errorf("testbed %s: etcd %s is not running", b.Prefix, m.name)
	}
	return m, p, nil
}

// StopEtcdMember stops member i (1-based) as systemd does (SIGTERM).
func (b *Bed) StopEtcdMember(i int) error {
	m, p, err := b.runningMember(i)
	if err != nil {
		return err
	}
	if err := stopEtcdProc(p, 15*time.Second); err != nil {
		return fmt.Errorf("testbed %s: stop etcd %s: %w", b.Prefix, m.name, err)
	}
	b.logf("etcd %s stopped", m.name)
	return nil
}

// KillEtcdMember kills member i (1-based) with SIGKILL: no leadership
// transfer, its connections reset.
func (b *Bed) KillEtcdMember(i int) error {
	m, p, err := b.runningMember(i)
	if err != nil {
		return err
	}
	if err := p.kill(); err != nil {
		return fmt.Errorf("testbed %s: kill etcd %s: %w", b.Prefix, m.name, err)
	}
	b.logf("etcd %s killed", m.name)
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

// EtcdClient returns the bed's etcd client of every member (created on
// first use after each start, closed by Close), logged in as root when
// auth is on. Its connections are made inside the etcd namespace, so the
// test program, which lives in the root namespace, can reach the members.
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
		Endpoints:   b.EtcdEndpoints(),
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
	if f := b.etcdTLS; f != nil {
		tc, err := clientTLS(*f)
		if err != nil {
			return nil, fmt.Errorf("testbed %s: etcd client TLS: %w", b.Prefix, err)
		}
		cfg.TLS = tc
	}
	c, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("testbed %s: etcd client for %s: %w", b.Prefix, strings.Join(cfg.Endpoints, ","), err)
	}
	return c, nil
}

// clientTLS is the TLS config of a client with the bed's client
// certificate.
func clientTLS(f testcert.Files) (*tls.Config, error) {
	pemCA, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemCA) {
		return nil, fmt.Errorf("no certificate in %s", f.CA)
	}
	kp, err := tls.LoadX509KeyPair(f.ClientCert, f.ClientKey)
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS12}, nil
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
	value, err := json.Marshal(struct {
		PublicIP   string
		PublicIPv6 *string
	}{PublicIP: publicIP.String()})
	if err != nil {
		return 0, err
	}
	return b.putLeaseKey(ctx, FlannelLeaseKey(subnet), string(value), ttl)
}

// putLeaseKey writes value at key, attached to an etcd lease of ttl (0: no
// etcd lease), and returns the etcd lease ID (0 without one).
func (b *Bed) putLeaseKey(ctx context.Context, key, value string, ttl time.Duration) (clientv3.LeaseID, error) {
	c, err := b.EtcdClient()
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
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
	if _, err := c.Put(ctx, key, value, opts...); err != nil {
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
