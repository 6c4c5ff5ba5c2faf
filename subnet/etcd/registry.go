package etcd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tulle-net/tulle/subnet"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// DefaultEndpoint is flanneld's default --etcd-endpoints.
const DefaultEndpoint = "http://127.0.0.1:2379"

// DefaultDialTimeout bounds one attempt to reach etcd.
const DefaultDialTimeout = 5 * time.Second

// Config says how to reach etcd; the fields match flanneld's --etcd-* flags.
type Config struct {
	Endpoints []string // default DefaultEndpoint; http://, https://, unix:// or host:port
	Prefix    string   // default subnet.DefaultPrefix
	// CAFile verifies the server; CertFile and KeyFile (both or neither)
	// authenticate the client. https endpoints without CAFile use the
	// system roots.
	CAFile, CertFile, KeyFile string
	Username, Password        string
	// DialTimeout bounds one attempt to reach etcd (default
	// DefaultDialTimeout). One call waits at most twice that; a silent
	// watch is noticed after about twice that.
	DialTimeout time.Duration
}

// Registry is the etcd v3 implementation of subnet.Registry. Its methods
// are safe for concurrent use.
type Registry struct {
	cfg           Config
	log           *slog.Logger
	tls           *tls.Config
	configKey     string     // <prefix>/config
	subnetsPrefix string     // <prefix>/subnets/
	endpoints     string     // for messages
	auth          *tokenAuth // nil without username

	// Timing; New sets them from DialTimeout, tests in this package shorten them.
	opTimeout     time.Duration // one RPC
	probeInterval time.Duration // a watch silent this long is asked for progress
	backoffMin    time.Duration
	backoffMax    time.Duration
	acquireTries  int

	dialMu    sync.Mutex     // serialises creating the client
	monitorWG sync.WaitGroup // the connection monitor
	mu        sync.Mutex     // guards the fields below
	cli       *clientv3.Client
	closed    bool
	st        subnet.RegistryStatus
	downSince time.Time // when etcd became unreachable after answering; zero while it answers

	watchRev   atomic.Int64 // of the lease watch
	attempts   atomic.Uint64
	leaseCount atomic.Int64  // leases the lease watch knows
	sessions   atomic.Uint64 // watch sessions started, each on its own stream
	watchDown  atomic.Int64  // unix nanoseconds since the lease watch is down; 0 while up
	malformed  atomic.Uint64
	malMu      sync.Mutex
	malSeen    map[string]int64 // key -> ModRevision already reported malformed
}

var _ subnet.Registry = (*Registry)(nil)

// New checks cfg (endpoints, TLS files) and returns a Registry. It does not
// contact etcd: the connection is made on first use and re-made as needed,
// so New succeeds while etcd is down.
func New(cfg Config, logger *slog.Logger) (*Registry, error) {
	if logger == nil {
		logger = slog.Default()
	}
	if len(cfg.Endpoints) == 0 {
		cfg.Endpoints = []string{DefaultEndpoint}
	}
	for _, ep := range cfg.Endpoints {
		if _, _, err := dialTarget(ep); err != nil {
			return nil, fmt.Errorf("etcd endpoint %q: %w", ep, err)
		}
	}
	if cfg.Prefix == "" {
		cfg.Prefix = subnet.DefaultPrefix
	}
	cfg.Prefix = strings.TrimRight(cfg.Prefix, "/")
	if cfg.Prefix == "" || cfg.Prefix[0] != '/' {
		return nil, fmt.Errorf("etcd prefix %q: must start with / and not be /", cfg.Prefix)
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if (cfg.Username == "") != (cfg.Password == "") {
		return nil, errors.New("etcd username and password: give both or neither")
	}
	tc, err := tlsConfig(cfg)
	if err != nil {
		return nil, err
	}
	if tc != nil {
		// clientv3 would speak plain text to these and ignore the files.
		for _, ep := range cfg.Endpoints {
			if strings.HasPrefix(ep, "http://") || strings.HasPrefix(ep, "unix://") {
				return nil, fmt.Errorf("etcd endpoint %s is plain text, but TLS files are given (CA, cert or key file): use https:// (or unixs://)", ep)
			}
		}
	}
	r := &Registry{
		cfg:           cfg,
		log:           logger,
		tls:           tc,
		configKey:     cfg.Prefix + "/config",
		subnetsPrefix: cfg.Prefix + "/subnets/",
		endpoints:     strings.Join(cfg.Endpoints, ","),
		opTimeout:     2 * cfg.DialTimeout,
		probeInterval: cfg.DialTimeout,
		backoffMin:    100 * time.Millisecond,
		backoffMax:    10 * time.Second,
		acquireTries:  20,
		malSeen:       map[string]int64{},
	}
	if cfg.Username != "" {
		r.auth = &tokenAuth{user: cfg.Username, password: cfg.Password}
	}
	r.st.Detail = "not connected yet to etcd at " + r.endpoints
	return r, nil
}

func tlsConfig(cfg Config) (*tls.Config, error) {
	if cfg.CAFile == "" && cfg.CertFile == "" && cfg.KeyFile == "" {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("etcd CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcd CA file %s: no PEM certificate in it", cfg.CAFile)
		}
		tc.RootCAs = pool
	}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, errors.New("etcd cert file and key file: give both or neither")
	}
	if cfg.CertFile != "" {
		kp, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("etcd cert file %s / key file %s: %w", cfg.CertFile, cfg.KeyFile, err)
		}
		tc.Certificates = []tls.Certificate{kp}
	}
	return tc, nil
}

// dialTarget returns what net.Dial needs to reach an endpoint.
func dialTarget(ep string) (network, addr string, err error) {
	if !strings.Contains(ep, "://") {
		if _, _, err := net.SplitHostPort(ep); err != nil {
			return "", "", err
		}
		return "tcp", ep, nil
	}
	u, err := url.Parse(ep)
	if err != nil {
		return "", "", err
	}
	switch u.Scheme {
	case "http", "https":
		if u.Port() == "" {
			return "", "", errors.New("missing port")
		}
		return "tcp", u.Host, nil
	case "unix", "unixs":
		return "unix", u.Host + u.Path, nil
	}
	return "", "", fmt.Errorf("scheme %q: want http, https, unix or unixs", u.Scheme)
}

// client returns the etcd client, creating it on first use. Creating it
// does not wait for a connection (the login, with username and password,
// happens with the first request).
func (r *Registry) client(ctx context.Context) (*clientv3.Client, error) {
	r.mu.Lock()
	cli, closed := r.cli, r.closed
	r.mu.Unlock()
	if closed {
		return nil, errors.New("etcd registry closed")
	}
	if cli != nil {
		return cli, r.precheck(ctx, cli)
	}
	r.dialMu.Lock()
	defer r.dialMu.Unlock()
	r.mu.Lock()
	cli = r.cli
	r.mu.Unlock()
	if cli != nil {
		return cli, r.precheck(ctx, cli)
	}
	if err := r.precheck(ctx, nil); err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   r.cfg.Endpoints,
		DialTimeout: r.cfg.DialTimeout,
		// A connection that goes silent (a partition, a frozen host) is
		// given up after these; 10s is gRPC's minimum ping interval.
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: min(r.cfg.DialTimeout, 2*time.Second),
		TLS:                  r.tls,
		Logger:               zap.NewNop(),
		DialOptions:          r.dialOptions(),
	})
	if err != nil {
		return nil, r.fail(ctx, fmt.Errorf("connect: %w", err))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		cli.Close()
		return nil, errors.New("etcd registry closed")
	}
	r.cli = cli
	r.monitorWG.Go(func() { r.monitor(cli) })
	return cli, nil
}

func (r *Registry) dialOptions() []grpc.DialOption {
	opts := []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
		MinConnectTimeout: r.cfg.DialTimeout,
	})}
	if r.auth != nil {
		// Username and password are not given to clientv3: tokenAuth logs
		// in and renews the token itself.
		opts = append(opts, grpc.WithPerRPCCredentials(r.auth),
			grpc.WithChainUnaryInterceptor(r.auth.unary), grpc.WithChainStreamInterceptor(r.auth.stream))
	}
	return opts
}

// op returns a context for one RPC, bounded by opTimeout.
func (r *Registry) op(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, r.opTimeout)
}

// Status implements subnet.Registry.
func (r *Registry) Status() subnet.RegistryStatus {
	r.mu.Lock()
	st := r.st
	down := r.downSince
	r.mu.Unlock()
	st.WatchRevision = r.watchRev.Load()
	st.MalformedLeases = r.malformed.Load()
	st.WatchAttempts = r.attempts.Load()
	if v := r.watchDown.Load(); v != 0 {
		st.WatchDownSince = time.Unix(0, v)
	}
	// The watch goes with the connection, even before its probe notices.
	if !down.IsZero() && (st.WatchDownSince.IsZero() || down.Before(st.WatchDownSince)) {
		st.WatchDownSince = down
	}
	return st
}

// Close implements subnet.Registry. Calls in flight fail; a running
// WatchLeases keeps retrying (slowly) until its ctx is done.
func (r *Registry) Close() error {
	r.mu.Lock()
	cli := r.cli
	r.cli, r.closed = nil, true
	r.st.Connected = false
	r.st.Detail = "closed"
	r.mu.Unlock()
	var err error
	if cli != nil {
		err = cli.Close()
	}
	r.monitorWG.Wait()
	return err
}

// noteMalformed logs and counts a key or value that could not be parsed,
// once per version of the key.
func (r *Registry) noteMalformed(key string, modRev int64, err error) {
	r.malMu.Lock()
	seen, ok := r.malSeen[key]
	if ok && seen == modRev {
		r.malMu.Unlock()
		return
	}
	r.malSeen[key] = modRev
	r.malMu.Unlock()
	r.malformed.Add(1)
	r.log.Warn("skipping malformed lease in etcd", "key", key, "revision", modRev, "error", err)
}
