// Package etcdtest runs a real etcd server (go.etcd.io/etcd/server/v3/embed)
// inside the test process, on free 127.0.0.1 ports and a temporary data
// directory. The server can be stopped and started again on the same data
// directory and ports, to test outages. Proxy sits between a client and the
// server and can cut the connection, to test partitions. For tests only.
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
}

// Server is one embedded etcd member.
type Server struct {
	t       testing.TB
	opts    Options
	dir     string
	client  url.URL
	peer    url.URL
	mu      sync.Mutex
	e       *embed.Etcd
	clients []*clientv3.Client
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
		dir:    t.TempDir(),
		client: url.URL{Scheme: scheme, Host: freeAddr(t)},
		peer:   url.URL{Scheme: "http", Host: freeAddr(t)},
	}
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
// and waits until it serves.
func (s *Server) Start() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.e != nil {
		return
	}
	cfg := embed.NewConfig()
	cfg.Name = "tulletest"
	cfg.Dir = s.dir
	cfg.ListenClientUrls = []url.URL{s.client}
	cfg.AdvertiseClientUrls = []url.URL{s.client}
	cfg.ListenPeerUrls = []url.URL{s.peer}
	cfg.AdvertisePeerUrls = []url.URL{s.peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.UnsafeNoFsync = true
	cfg.BcryptCost = 4 // bcrypt's minimum: passwords are checked fast
	cfg.TickMs, cfg.ElectionMs = 10, 100
	if s.opts.TickMs > 0 {
		cfg.TickMs = s.opts.TickMs
	}
	if s.opts.ElectionMs > 0 {
		cfg.ElectionMs = s.opts.ElectionMs
	}
	if s.opts.TLS != nil {
		cfg.ClientTLSInfo = *s.opts.TLS
	}
	var (
		e   *embed.Etcd
		err error
	)
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
		s.t.Fatalf("etcdtest: start etcd in %s: %v", s.dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		s.t.Fatalf("etcdtest: etcd failed while starting: %v", err)
	case <-time.After(30 * time.Second):
		e.Close()
		s.t.Fatalf("etcdtest: etcd not ready after 30s")
	}
	s.e = e
}

// Stop stops the server as etcd does on SIGTERM; the data directory stays.
// Like etcd, it first refuses new connections and requests, then lets open
// streams (watches, lease keep-alives) run for up to etcd's request timeout
// (about 5s) while the server itself still runs (leases may expire then),
// and only then stops.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.e == nil {
		return
	}
	s.e.Close()
	s.e = nil
}

// Restart stops and starts the server on the same data directory.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.Start()
}

// Client returns a new etcd client for the test to read and write with
// (closed at the end of the test). tlsInfo is needed for a TLS server.
func (s *Server) Client() *clientv3.Client {
	s.t.Helper()
	cfg := clientv3.Config{Endpoints: []string{s.Endpoint()}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()}
	if s.opts.TLS != nil {
		tc, err := transport.TLSInfo{
			CertFile:      s.opts.TLS.ClientCertFile,
			KeyFile:       s.opts.TLS.ClientKeyFile,
			TrustedCAFile: s.opts.TLS.TrustedCAFile,
		}.ClientConfig()
		if err != nil {
			s.t.Fatalf("etcdtest: client TLS: %v", err)
		}
		cfg.TLS = tc
	}
	c, err := clientv3.New(cfg)
	if err != nil {
		s.t.Fatalf("etcdtest: client: %v", err)
	}
	s.mu.Lock()
	s.clients = append(s.clients, c)
	s.mu.Unlock()
	return c
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
