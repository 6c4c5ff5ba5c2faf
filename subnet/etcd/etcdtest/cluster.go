package etcdtest

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Cluster is several etcd members of one cluster, each on its own ports and
// data directory, all in the test process (or processes, with
// Options.Binary). Members can be stopped, killed and started one by one.
// Clients reach each member through a Proxy (Endpoints), so that Kill can
// drop a member's client connections at once, as a killed process's are.
type Cluster struct {
	t       testing.TB
	opts    Options
	Members []*Server
	mu      sync.Mutex
	authOn  bool
}

// StartCluster starts an n-member cluster with opts and waits until it has
// a leader (and, with opts.Auth, turns authentication on). It is stopped at
// the end of the test.
func StartCluster(t testing.TB, n int, opts Options) *Cluster {
	t.Helper()
	c := &Cluster{t: t, opts: opts}
	var peers []string
	jwt := ""
	if opts.AuthToken == "jwt" {
		jwt = jwtKeys(t) // every member signs and checks with the same key
	}
	for i := range n {
		s := New(t, opts)
		s.name = fmt.Sprintf("m%d", i)
		s.cluster = c
		s.jwtKeys = jwt
		s.proxy = NewProxy(t, s.Addr())
		c.Members = append(c.Members, s)
		peers = append(peers, s.name+"="+s.peer.String())
	}
	for _, s := range c.Members {
		s.initialCluster = strings.Join(peers, ",")
	}
	// A member is ready only with a quorum: launch all, then wait.
	for _, s := range c.Members {
		s.mu.Lock()
		err := s.launch()
		s.mu.Unlock()
		if err != nil {
			t.Fatalf("etcdtest: member %s: %v", s.name, err)
		}
	}
	for _, s := range c.Members {
		s.mu.Lock()
		err := s.waitReady(60 * time.Second)
		s.mu.Unlock()
		if err != nil {
			t.Fatalf("etcdtest: member %s: %v", s.name, err)
		}
	}
	if opts.Auth != nil {
		if err := enableAuth(opts, c.Endpoints()); err != nil {
			t.Fatalf("etcdtest: enable auth: %v", err)
		}
		c.mu.Lock()
		c.authOn = true
		c.mu.Unlock()
		for _, s := range c.Members {
			s.mu.Lock()
			s.authOn = true
			s.mu.Unlock()
		}
	}
	return c
}

// Endpoints are the client URLs of every member, through its proxy.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, s := range c.Members {
		eps = append(eps, s.ProxyEndpoint())
	}
	return eps
}

// ProxyEndpoint is the URL of a cluster member's proxy (its Endpoint for a
// server of its own).
func (s *Server) ProxyEndpoint() string {
	if s.proxy == nil {
		return s.Endpoint()
	}
	return s.client.Scheme + "://" + s.proxy.addr
}

// Client returns a client of every member (closed at the end of the test),
// as root when auth is on.
func (c *Cluster) Client() *clientv3.Client {
	c.t.Helper()
	c.mu.Lock()
	authOn := c.authOn
	c.mu.Unlock()
	cli, err := newClient(c.opts, c.Endpoints(), authOn)
	if err != nil {
		c.t.Fatalf("etcdtest: client: %v", err)
	}
	c.t.Cleanup(func() { cli.Close() })
	return cli
}

// Leader returns the index of the member that leads now, waiting up to
// timeout for one (an election may be running).
func (c *Cluster) Leader(timeout time.Duration) int {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		cli := c.statusClient()
		for i, s := range c.Members {
			s.mu.Lock()
			up := s.running()
			s.mu.Unlock()
			if !up {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, err := cli.Status(ctx, s.Endpoint())
			cancel()
			if err == nil && st.Leader != 0 && st.Leader == st.Header.MemberId {
				cli.Close()
				return i
			}
		}
		cli.Close()
		if time.Now().After(deadline) {
			c.t.Fatalf("etcdtest: no leader within %s", timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// statusClient asks members for their status (Status needs no login).
func (c *Cluster) statusClient() *clientv3.Client {
	cli, err := newClient(c.opts, c.Endpoints(), false)
	if err != nil {
		c.t.Fatalf("etcdtest: client: %v", err)
	}
	return cli
}

// PeerURL is a member's peer URL (for messages).
func (s *Server) PeerURL() url.URL { return s.peer }

// Name is the member's name.
func (s *Server) Name() string { return s.name }

// Kill stops the member at once, as SIGKILL would: its client connections
// drop (with a proxy: a member of a Cluster), no leadership transfer, no
// grace for open streams. The data directory stays for Start.
func (s *Server) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proxy != nil {
		s.proxy.Cut()
	}
	switch {
	case s.e != nil:
		s.e.Server.HardStop() // raft stops here: the others must elect
		s.e.Close()           // listeners and connections
		s.e = nil
	case s.proc != nil:
		p := s.proc
		s.proc = nil
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}
