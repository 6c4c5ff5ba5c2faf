package etcd

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/url"
	"time"

	"github.com/tulle-net/tulle/subnet"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

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

// RefusedError says that etcd answered but refused us, and why: "etcd
// refused the password for user tulle", "permission denied for user tulle
// on /coreos.com/network/config", a TLS certificate that one side does not
// accept. Retrying does not help. errors.Is(err, subnet.ErrRefused) holds.
type RefusedError struct {
	Reason string
	Err    error // what etcd or the TLS handshake said
}

func (e *RefusedError) Error() string { return e.Reason }

func (e *RefusedError) Unwrap() []error { return []error{subnet.ErrRefused, e.Err} }

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
