// Package etcdtest runs a real etcd server (go.etcd.io/etcd/server/v3/embed)
// inside the test process, or an etcd executable (Options.Binary, e.g.
// Debian's etcd 3.4), on free 127.0.0.1 ports and a temporary data
// directory; or a Cluster of several members. A server can be stopped and
// started again on the same data directory and ports, to test outages.
// Authentication (users, simple or JWT tokens) and TLS are options. Proxy
// sits between a client and the server and can cut the connection, to test
// partitions. For tests only.
package etcdtest

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Options shape a Server.
type Options struct {
	// TLS serves clients over https with these files (ClientCertAuth
	// requires a client certificate); nil serves http.
	TLS *transport.TLSInfo
	// TickMs and ElectionMs: etcd's heartbeat and election timeout. The
	// defaults here (10 and 100) start the server in well under a second
	// and make etcd's minimum lease TTL 1s; etcd's own defaults (100 and
	// 1000) make it 2s.
	TickMs, ElectionMs uint
	// Auth, if set, turns authentication on at the first start (etcd keeps
	// it in the data directory): the root user and Auth.Users are created,
	// then auth is enabled. Client() then logs in as root.
	Auth *Auth
	// AuthToken is etcd's token type: "" or "simple" (server-local tokens,
	// lost on a restart), or "jwt" (signed with a fresh ES256 key, which
	// survives restarts of this Server).
	AuthToken string
	// AuthTokenTTL is how long a token lives: for simple tokens since its
	// last use (etcd's --auth-token-ttl), for JWT since it was issued. 0 is
	// etcd's default (300s for simple tokens and JWT).
	AuthTokenTTL time.Duration
	// Binary runs this etcd executable as a child process instead of the
	// embedded server (the same flags exist in etcd 3.4 and later), so a
	// test meets the server version operators run.
	Binary string
}

// Auth is the users of a server with authentication on.
type Auth struct {
	RootPassword string // default "root-secret"
	Users        []User
}

// User is an etcd user with read-write permission on key prefixes (each
// through a role named after the user).
type User struct {
	Name, Password string
	ReadWrite      []string // key prefixes
	Read           []string // key prefixes, read only
}

// Server is one etcd member: alone, or one of a Cluster.
type Server struct {
	t              testing.TB
	opts           Options
	name           string
	dir            string
	client         url.URL
	peer           url.URL
	initialCluster string   // name=peerURL,...
	cluster        *Cluster // nil for a server of its own
	jwtKeys        string   // "pub-key=...,priv-key=..." for AuthToken "jwt"
	mu             sync.Mutex
	e              *embed.Etcd
	proc           *process
	proxy          *Proxy // in front of a Cluster member's client port
	clients        []*clientv3.Client
	authOn         bool // auth was enabled (Client logs in as root)
}

// New prepares a server (ports and data directory) without starting it.
// It is stopped at the end of the test.
func New(t testing.TB, opts Options) *Server {
	t.Helper()
	scheme := "http"
	if opts.TLS != nil {
		scheme = "https"
	}
	s := &Server{
		t:      t,
		opts:   opts,
		name:   "tulletest",
		dir:    t.TempDir(),
		client: url.URL{Scheme: scheme, Host: freeAddr(t)},
		peer:   url.URL{Scheme: "http", Host: freeAddr(t)},
	}
	s.initialCluster = s.name + "=" + s.peer.String()
	t.Cleanup(func() {
		s.mu.Lock()
		cs := s.clients
		s.clients = nil
		s.mu.Unlock()
		for _, c := range cs {
			c.Close()
		}
		s.Stop()
	})
	return s
}

// Start starts a new server with default options.
func Start(t testing.TB) *Server {
	t.Helper()
	s := New(t, Options{})
	s.Start()
	return s
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("etcdtest: free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Endpoint is the client URL, e.g. "http://127.0.0.1:40123".
func (s *Server) Endpoint() string { return s.client.String() }

// Addr is the client host:port.
func (s *Server) Addr() string { return s.client.Host }

// Dir is the data directory.
func (s *Server) Dir() string { return s.dir }

// Start starts the server (again, on the same data directory and ports)
// and waits until it serves. A member of a Cluster waits for its quorum.
func (s *Server) Start() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running() {
		return
	}
	if err := s.launch(); err != nil {
		s.t.Fatalf("etcdtest: %v", err)
	}
	if err := s.waitReady(30 * time.Second); err != nil {
		s.stopLocked()
		s.t.Fatalf("etcdtest: %v", err)
	}
	if s.proxy != nil {
		s.proxy.Heal()
	}
	if s.opts.Auth != nil && !s.authOn && s.cluster == nil {
		if err := s.enableAuth(); err != nil {
			s.stopLocked()
			s.t.Fatalf("etcdtest: enable auth: %v", err)
		}
		s.authOn = true
	}
}

func (s *Server) running() bool { return s.e != nil || s.proc != nil }

// launch starts the member without waiting for it (s.mu held).
func (s *Server) launch() error {
	if s.opts.Binary != "" {
		return s.launchProcess()
	}
	cfg := embed.NewConfig()
	cfg.Name = s.name
	cfg.Dir = s.dir
	cfg.ListenClientUrls = []url.URL{s.client}
	cfg.AdvertiseClientUrls = []url.URL{s.client}
	cfg.ListenPeerUrls = []url.URL{s.peer}
	cfg.AdvertisePeerUrls = []url.URL{s.peer}
	cfg.InitialCluster = s.initialCluster
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.UnsafeNoFsync = true
	cfg.BcryptCost = 4 // bcrypt's minimum: passwords are checked fast
	cfg.TickMs, cfg.ElectionMs = s.timing()
	if s.opts.TLS != nil {
		cfg.ClientTLSInfo = *s.opts.TLS
	}
	token, ttl, err := s.tokenOptions()
	if err != nil {
		return err
	}
	cfg.AuthToken = token
	if ttl > 0 {
		cfg.AuthTokenTTL = ttl
	}
	var e *embed.Etcd
	// The ports were free when New picked them; after a Stop the kernel may
	// hold them for a moment.
	for try := 0; try < 50; try++ {
		e, err = embed.StartEtcd(cfg)
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("start etcd in %s: %w", s.dir, err)
	}
	s.e = e
	return nil
}

// timing is the heartbeat and election timeout in milliseconds.
func (s *Server) timing() (tick, election uint) {
	tick, election = 10, 100
	if s.opts.TickMs > 0 {
		tick = s.opts.TickMs
	}
	if s.opts.ElectionMs > 0 {
		election = s.opts.ElectionMs
	}
	return tick, election
}

// waitReady waits until the member serves (s.mu held).
func (s *Server) waitReady(timeout time.Duration) error {
	if s.proc != nil {
		return s.waitProcess(timeout)
	}
	select {
	case <-s.e.Server.ReadyNotify():
		return nil
	case err := <-s.e.Err():
		return fmt.Errorf("etcd %s failed while starting: %w", s.name, err)
	case <-time.After(timeout):
		return fmt.Errorf("etcd %s not ready after %s", s.name, timeout)
	}
}

// Stop stops the server as etcd does on SIGTERM; the data directory stays.
// Like etcd, it first refuses new connections and requests, then lets open
// streams (watches, lease keep-alives) run for up to etcd's request timeout
// (about 5s) while the server itself still runs (leases may expire then),
// and only then stops.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked()
}

func (s *Server) stopLocked() {
	switch {
	case s.e != nil:
		s.e.Close()
		s.e = nil
	case s.proc != nil:
		s.stopProcess()
	}
	if s.proxy != nil {
		s.proxy.Cut() // the port refuses, as a stopped member's does
	}
}

// Restart stops and starts the server on the same data directory.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.Start()
}

// Client returns a new etcd client for the test to read and write with
// (closed at the end of the test), as root when auth is on. clientv3 can
// not renew its token on an etcd 3.4 server that restarted: make a new
// Client after a restart.
func (s *Server) Client() *clientv3.Client {
	s.t.Helper()
	s.mu.Lock()
	authOn := s.authOn
	s.mu.Unlock()
	c, err := newClient(s.opts, []string{s.Endpoint()}, authOn)
	if err != nil {
		s.t.Fatalf("etcdtest: client: %v", err)
	}
	s.mu.Lock()
	s.clients = append(s.clients, c)
	s.mu.Unlock()
	return c
}

// newClient is a client of endpoints, as root when authOn.
func newClient(opts Options, endpoints []string, authOn bool) (*clientv3.Client, error) {
	cfg := clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()}
	if authOn {
		cfg.Username, cfg.Password = "root", rootPassword(opts)
		cfg.DialTimeout = 30 * time.Second // the first call logs in: bcrypt, slow under -race
	}
	if opts.TLS != nil {
		tc, err := transport.TLSInfo{
			CertFile:      opts.TLS.ClientCertFile,
			KeyFile:       opts.TLS.ClientKeyFile,
			TrustedCAFile: opts.TLS.TrustedCAFile,
		}.ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("client TLS: %w", err)
		}
		cfg.TLS = tc
	}
	return clientv3.New(cfg)
}

// OrphanLeases returns the etcd leases that no key is attached to (what a
// leaking client leaves behind).
func OrphanLeases(ctx context.Context, c *clientv3.Client) ([]clientv3.LeaseID, error) {
	ls, err := c.Leases(ctx)
	if err != nil {
		return nil, fmt.Errorf("list leases: %w", err)
	}
	var out []clientv3.LeaseID
	for _, l := range ls.Leases {
		ttl, err := c.TimeToLive(ctx, l.ID, clientv3.WithAttachedKeys())
		if err != nil {
			return nil, fmt.Errorf("ttl of lease %x: %w", int64(l.ID), err)
		}
		if ttl.TTL > 0 && len(ttl.Keys) == 0 {
			out = append(out, l.ID)
		}
	}
	return out, nil
}
