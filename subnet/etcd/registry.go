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
	"syscall"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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
	configKey     string // <prefix>/config
	subnetsPrefix string // <prefix>/subnets/
	endpoints     string // for messages

	// Timing; New sets them from DialTimeout, tests in this package shorten them.
	opTimeout     time.Duration // one RPC
	probeInterval time.Duration // a watch silent this long is asked for progress
	backoffMin    time.Duration
	backoffMax    time.Duration
	acquireTries  int

	dialMu sync.Mutex // serialises creating the client
	mu     sync.Mutex // guards the fields below
	cli    *clientv3.Client
	closed bool
	st     subnet.RegistryStatus

	watchRev   atomic.Int64 // of the lease watch
	attempts   atomic.Uint64
	leaseCount atomic.Int64 // leases the lease watch knows
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
// does not wait for a connection unless username/password are set (etcd's
// client then fetches a token, bounded by DialTimeout).
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
		Endpoints:            r.cfg.Endpoints,
		DialTimeout:          r.cfg.DialTimeout,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: r.cfg.DialTimeout,
		TLS:                  r.tls,
		Username:             r.cfg.Username,
		Password:             r.cfg.Password,
		Logger:               zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: r.cfg.DialTimeout,
		})},
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
	return cli, nil
}

// op returns a context for one RPC, bounded by opTimeout.
func (r *Registry) op(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, r.opTimeout)
}

// Status implements subnet.Registry.
func (r *Registry) Status() subnet.RegistryStatus {
	r.mu.Lock()
	st := r.st
	r.mu.Unlock()
	st.WatchRevision = r.watchRev.Load()
	st.MalformedLeases = r.malformed.Load()
	st.WatchAttempts = r.attempts.Load()
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
	if cli != nil {
		return cli.Close()
	}
	return nil
}

// ok records a successful exchange with etcd.
func (r *Registry) ok() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.st.Connected && !r.closed {
		r.st.Connected = true
		r.st.LastError = nil
		r.st.Detail = "connected to etcd at " + r.endpoints
	}
}

// okDetail records a successful exchange and what the registry is doing.
func (r *Registry) okDetail(detail string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.closed {
		r.st.Connected = true
		r.st.LastError = nil
		r.st.Detail = detail
	}
}

// fail explains err (an unreachable etcd becomes "waiting for etcd at
// <endpoints>: <cause>"), records it in the status, and returns it. An
// error from the caller's own cancellation is returned as it is.
func (r *Registry) fail(ctx context.Context, err error) error {
	if err == nil || ctx.Err() != nil {
		return err
	}
	var ue *UnreachableError
	if unreachable(err) && !errors.As(err, &ue) {
		err = &UnreachableError{Endpoints: r.endpoints, Cause: r.diagnose(err), Err: err}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.closed {
		r.st.Connected = false
		r.st.LastError = err
		if errors.As(err, &ue) {
			r.st.Detail = ue.Error()
		} else {
			r.st.Detail = "etcd at " + r.endpoints + ": " + err.Error()
		}
	}
	return err
}

// UnreachableError says that etcd did not answer, and the likely cause:
// "waiting for etcd at http://127.0.0.1:2379: connection refused".
type UnreachableError struct {
	Endpoints string
	Cause     string
	Err       error // what the etcd client said
}

func (e *UnreachableError) Error() string {
	return "waiting for etcd at " + e.Endpoints + ": " + e.Cause
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// unreachable reports whether err means that no etcd server answered.
func unreachable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	if errors.Is(err, rpctypes.ErrNoLeader) || errors.Is(err, rpctypes.ErrTimeout) ||
		errors.Is(err, rpctypes.ErrTimeoutDueToConnectionLost) || errors.Is(err, rpctypes.ErrTimeoutDueToLeaderFail) {
		return true
	}
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		switch se.GRPCStatus().Code() {
		case codes.Unavailable, codes.DeadlineExceeded:
			return true
		}
	}
	return false
}

// precheck fails fast, with the cause, while no endpoint accepts a
// connection, instead of letting a call wait for its whole timeout. Once an
// endpoint accepts again, it has gRPC reconnect now rather than after its
// own backoff (up to seconds after an outage). It only dials while the
// registry is not known to be connected.
func (r *Registry) precheck(ctx context.Context, cli *clientv3.Client) error {
	r.mu.Lock()
	connected := r.st.Connected
	r.mu.Unlock()
	if connected {
		return nil
	}
	cause, reachable := r.dialEndpoints()
	if reachable {
		if cli != nil {
			cli.ActiveConnection().ResetConnectBackoff()
		}
		return nil
	}
	return r.fail(ctx, &UnreachableError{Endpoints: r.endpoints, Cause: cause, Err: errNoEndpoint})
}

var errNoEndpoint = errors.New("no etcd endpoint accepts connections")

// dialEndpoints dials each endpoint; reachable if one accepts. cause names
// why the first failing one did not ("connection refused").
func (r *Registry) dialEndpoints() (cause string, reachable bool) {
	timeout := min(r.cfg.DialTimeout, 2*time.Second)
	for _, ep := range r.cfg.Endpoints {
		network, addr, perr := dialTarget(ep)
		if perr != nil {
			continue
		}
		c, err := net.DialTimeout(network, addr, timeout)
		if err == nil {
			c.Close()
			return "", true
		}
		if cause != "" {
			continue
		}
		var errno syscall.Errno
		var ne net.Error
		switch {
		case errors.As(err, &errno):
			cause = errno.Error()
		case errors.As(err, &ne) && ne.Timeout():
			cause = "no answer to TCP connect within " + timeout.String()
		default:
			cause = err.Error()
		}
	}
	return cause, false
}

// diagnose names why etcd does not answer: the connect error if no
// endpoint accepts connections, else what the etcd client said.
func (r *Registry) diagnose(err error) string {
	if cause, reachable := r.dialEndpoints(); !reachable {
		return cause
	}
	for _, ep := range r.cfg.Endpoints {
		if p := r.tlsProblem(ep); p != "" {
			return p
		}
	}
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) { // etcd answered, e.g. "etcdserver: no leader"
		return ee.Error()
	}
	if s, ok := status.FromError(err); ok && s.Message() != "" {
		return "no answer within " + r.opTimeout.String() + " (" + s.Message() + ")"
	}
	return "no answer within " + r.opTimeout.String() + " (" + err.Error() + ")"
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

// tlsProblem shakes hands with an https endpoint as the client would and
// returns what went wrong ("" if nothing did): a wrong CA, a missing or
// refused client certificate.
func (r *Registry) tlsProblem(ep string) string {
	u, err := url.Parse(ep)
	if err != nil || u.Scheme != "https" {
		return ""
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if r.tls != nil {
		tc = r.tls.Clone()
	}
	tc.ServerName = u.Hostname()
	tc.NextProtos = []string{"h2"}
	timeout := min(r.cfg.DialTimeout, 2*time.Second)
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: timeout}, "tcp", u.Host, tc)
	if err != nil {
		return "TLS handshake with " + u.Host + ": " + err.Error()
	}
	defer c.Close()
	// A refused client certificate shows up after the handshake (TLS 1.3).
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var b [1]byte
	if _, err := c.Read(b[:]); err != nil {
		var ne net.Error
		if !(errors.As(err, &ne) && ne.Timeout()) {
			return "TLS with " + u.Host + ": " + err.Error()
		}
	}
	return ""
}
