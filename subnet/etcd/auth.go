package etcd

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc"
)

// tokenAuth logs in to etcd with username and password and attaches the
// token to every request, instead of leaving that to clientv3.
//
// Why: etcd forgets simple tokens when it restarts and after
// --auth-token-ttl of idleness, and JWTs run out. clientv3 re-authenticates
// with the stale token still attached to the Authenticate request; etcd 3.4
// refuses that ("invalid auth token"), and clientv3 retries it recursively
// until the call's deadline, forever (etcd issues 8914, 11954, 12385, 13413).
// Here the login is sent without a token, every unary call that etcd answers
// with a rejected token logs in again and is retried once, and the watch
// and keep-alive streams do the same (see tokenRejected).
type tokenAuth struct {
	user, password string

	mu       sync.Mutex // serialises logins; guards the fields below
	token    string
	loggedIn bool // a login succeeded (token may be "" if auth is off)
	lastAt   time.Time
}

// minRelogin: a token rejected within this time of its login is not
// replaced at once, so an etcd that rejects every token costs one login per
// interval, not one per call.
const minRelogin = time.Second

// noTokenKey marks the context of the login itself, which carries no token.
type noTokenKey struct{}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (a *tokenAuth) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	if ctx.Value(noTokenKey{}) != nil {
		return nil, nil
	}
	a.mu.Lock()
	t := a.token
	a.mu.Unlock()
	if t == "" {
		return nil, nil
	}
	return map[string]string{rpctypes.TokenFieldNameGRPC: t}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials: etcd
// takes tokens over plain http too (as etcdctl sends them).
func (a *tokenAuth) RequireTransportSecurity() bool { return false }

// current returns the token in use, logging in first if that never
// succeeded.
func (a *tokenAuth) current(ctx context.Context, cc *grpc.ClientConn) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.loggedIn {
		return a.token, nil
	}
	return a.token, a.loginLocked(ctx, cc)
}

// refresh replaces stale, a token etcd rejected, with a new one, unless
// another call did so meanwhile.
func (a *tokenAuth) refresh(ctx context.Context, cc *grpc.ClientConn, stale string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.loggedIn && a.token != stale {
		return nil
	}
	if a.loggedIn && time.Since(a.lastAt) < minRelogin {
		return fmt.Errorf("etcd rejected the token of user %s %s after it was issued", a.user, time.Since(a.lastAt).Round(time.Millisecond))
	}
	return a.loginLocked(ctx, cc)
}

func (a *tokenAuth) loginLocked(ctx context.Context, cc *grpc.ClientConn) error {
	resp, err := pb.NewAuthClient(cc).Authenticate(context.WithValue(ctx, noTokenKey{}, true),
		&pb.AuthenticateRequest{Name: a.user, Password: a.password})
	switch err := rpctypes.Error(err); {
	case errors.Is(err, rpctypes.ErrAuthNotEnabled):
		a.token = ""
	case errors.Is(err, rpctypes.ErrAuthFailed):
		return &RefusedError{Reason: "etcd refused the password for user " + a.user, Err: err}
	case err != nil:
		return err // keeps its gRPC status: clientv3 retries Unavailable
	default:
		a.token = resp.Token
	}
	a.loggedIn, a.lastAt = true, time.Now()
	return nil
}

// unary logs in before the first call and, when etcd rejects the token,
// logs in again and retries the call once. It runs inside clientv3's own
// retrying interceptor, so that one sees only what is left.
func (a *tokenAuth) unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if ctx.Value(noTokenKey{}) != nil {
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	tok, err := a.current(ctx, cc)
	if err != nil {
		return err
	}
	err = invoker(ctx, method, req, reply, cc, opts...)
	if !tokenRejected(err) {
		return err
	}
	if rerr := a.refresh(ctx, cc, tok); rerr != nil {
		return errors.Join(err, rerr)
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// stream logs in before the first stream; a stream whose token etcd
// rejects is re-made by its owner (watch session, RenewLease) after
// refresh.
func (a *tokenAuth) stream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	if _, err := a.current(ctx, cc); err != nil {
		return nil, err
	}
	return streamer(ctx, desc, cc, method, opts...)
}

// tokenRejected reports whether etcd refused a request because of its
// token: expired, unknown to this server (restarted, another member with
// simple tokens), issued before an auth change, or missing.
func tokenRejected(err error) bool {
	if err == nil {
		return false
	}
	e := rpctypes.Error(err)
	return errors.Is(e, rpctypes.ErrInvalidAuthToken) || errors.Is(e, rpctypes.ErrAuthOldRevision) ||
		errors.Is(e, rpctypes.ErrUserEmpty) || strings.Contains(err.Error(), "invalid auth token")
}

// refreshAuth replaces the token after a stream saw err, if err says the
// token was rejected. etcd 3.4 cancels a watch whose token it does not know
// with "permission denied", so that counts too when a token is in use (a
// real denial fails again after the new login). It reports whether a new
// token is in place and the stream should be re-made at once.
func (r *Registry) refreshAuth(ctx context.Context, cc *grpc.ClientConn, used string, err error) bool {
	if r.auth == nil {
		return false
	}
	denied := errors.Is(rpctypes.Error(err), rpctypes.ErrPermissionDenied)
	if !tokenRejected(err) && !(denied && used != "") {
		return false
	}
	if rerr := r.auth.refresh(ctx, cc, used); rerr != nil {
		r.log.Warn("etcd rejected the auth token; logging in again failed", "user", r.cfg.Username, "error", rerr)
		return false
	}
	r.log.Info("etcd rejected the auth token; logged in again", "user", r.cfg.Username, "error", err)
	return true
}

// tokenInUse is the token requests carry now ("" without username).
func (r *Registry) tokenInUse() string {
	if r.auth == nil {
		return ""
	}
	r.auth.mu.Lock()
	defer r.auth.mu.Unlock()
	return r.auth.token
}
