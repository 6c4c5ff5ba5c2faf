package etcd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"net/url"
	"strings"
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

// diagnose explains err from an etcd that did not answer as expected: a
// *RefusedError when one side refuses the other's TLS (a certificate
// from another CA, a client certificate missing or refused, TLS against
// plain http or the other way round), else an *UnreachableError naming the
// cause (the connect error if no endpoint accepts connections, else what
// the etcd client said).
func (r *Registry) diagnose(ctx context.Context, err error) error {
	if cause, reachable, _ := r.dialEndpoints(ctx); !reachable {
		return &UnreachableError{Endpoints: r.endpoints, Cause: cause, Err: err}
	}
	if re, _ := r.tlsRefusal(ctx, err); re != nil {
		return re
	}
	var ee rpctypes.EtcdError
	cause := ""
	switch s, ok := status.FromError(err); {
	case errors.As(err, &ee): // etcd answered, e.g. "etcdserver: no leader"
		cause = ee.Error()
	case ok && s.Message() != "":
		cause = "no answer within " + r.opTimeout.String() + " (" + s.Message() + ")"
	default:
		cause = "no answer within " + r.opTimeout.String() + " (" + err.Error() + ")"
	}
	return &UnreachableError{Endpoints: r.endpoints, Cause: cause, Err: err}
}

// tlsRefusal shakes hands with every endpoint and returns the first TLS
// problem as a *RefusedError wrapping err (nil if there is none), and
// whether every endpoint has one.
func (r *Registry) tlsRefusal(ctx context.Context, err error) (*RefusedError, bool) {
	var first *RefusedError
	all := true
	for _, ep := range r.cfg.Endpoints {
		reason, terr := r.tlsProblem(ctx, ep)
		if reason == "" {
			all = false
			continue
		}
		if first == nil {
			first = &RefusedError{Reason: reason, Err: errors.Join(terr, err)}
		}
	}
	return first, all && first != nil
}

// refusal explains an error with which etcd refused a request on key ("" if
// not about one key), or returns nil if err is no refusal.
func (r *Registry) refusal(err error, key string) error {
	var re *RefusedError
	if errors.As(err, &re) {
		return re
	}
	on := ""
	if key != "" {
		on = " on " + key
	}
	switch e := rpctypes.Error(err); {
	case errors.Is(e, rpctypes.ErrPermissionDenied):
		return &RefusedError{Reason: "permission denied for " + r.who() + on, Err: err}
	case errors.Is(e, rpctypes.ErrUserEmpty) && r.cfg.Username == "":
		return &RefusedError{Reason: "etcd requires authentication and no user was given (--etcd-username and --etcd-password, or a client certificate naming a user)", Err: err}
	case errors.Is(e, rpctypes.ErrAuthFailed):
		return &RefusedError{Reason: "etcd refused the password for user " + r.cfg.Username, Err: err}
	}
	return nil
}

// who names the etcd user requests run as, for messages.
func (r *Registry) who() string {
	switch {
	case r.cfg.Username != "":
		return "user " + r.cfg.Username
	case r.tls != nil && len(r.tls.Certificates) > 0 && r.tls.Certificates[0].Leaf != nil:
		return "user " + r.tls.Certificates[0].Leaf.Subject.CommonName + " (the common name of " + r.cfg.CertFile + ")"
	}
	return "a client without user"
}

// tlsProblem shakes hands with an endpoint as the client would and says
// what one side refuses ("" if nothing): a server certificate we do not
// trust, a client certificate the server wants and we lack or it does not
// accept, TLS against a plain server or plain http against a TLS server.
func (r *Registry) tlsProblem(ctx context.Context, ep string) (string, error) {
	network, addr, err := dialTarget(ep)
	if err != nil {
		return "", nil
	}
	useTLS := r.tls != nil
	if u, err := url.Parse(ep); err == nil && strings.Contains(ep, "://") {
		useTLS = u.Scheme == "https" || u.Scheme == "unixs"
	}
	host, _, _ := net.SplitHostPort(addr)
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if r.tls != nil {
		tc = r.tls.Clone()
	}
	tc.ServerName = host
	tc.NextProtos = []string{"h2"}
	d := &net.Dialer{Timeout: min(r.cfg.DialTimeout, 2*time.Second)}
	if !useTLS {
		// Plain http to a server that wants TLS: it answers a TLS hello.
		probe := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}
		c, err := (&tls.Dialer{NetDialer: d, Config: probe}).DialContext(ctx, network, addr)
		if err == nil || isRemoteAlert(err) {
			if c != nil {
				c.Close()
			}
			return "etcd at " + ep + " speaks TLS: use https:// (with --etcd-cafile)", err
		}
		return "", nil
	}
	c, err := (&tls.Dialer{NetDialer: d, Config: tc}).DialContext(ctx, network, addr)
	if err == nil {
		defer c.Close()
		// A refused client certificate shows after the handshake (TLS 1.3).
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		var b [1]byte
		_, err = c.Read(b[:])
		var ne net.Error
		if err == nil || errors.As(err, &ne) && ne.Timeout() {
			return "", nil
		}
	}
	var unknownCA x509.UnknownAuthorityError
	var badHost x509.HostnameError
	var invalid x509.CertificateInvalidError
	trusted := "the system's CAs (give --etcd-cafile)"
	if r.cfg.CAFile != "" {
		trusted = r.cfg.CAFile
	}
	switch {
	case errors.As(err, &unknownCA):
		return "TLS with " + addr + ": etcd's certificate is not signed by a CA in " + trusted + " (" + unknownCA.Error() + ")", err
	case errors.As(err, &badHost):
		return "TLS with " + addr + ": etcd's certificate is not valid for " + host + ": " + badHost.Error(), err
	case errors.As(err, &invalid):
		return "TLS with " + addr + ": etcd's certificate is not valid: " + invalid.Error(), err
	case isRemoteAlert(err) && (r.tls == nil || len(r.tls.Certificates) == 0):
		return "TLS with " + addr + ": etcd requires a client certificate and none was given (--etcd-certfile and --etcd-keyfile): " + err.Error(), err
	case isRemoteAlert(err):
		return "TLS with " + addr + ": etcd refused the client certificate " + r.cfg.CertFile + ": " + err.Error(), err
	case err != nil && (strings.Contains(err.Error(), "first record does not look like a TLS handshake") || speaksPlainHTTP(ctx, network, addr)):
		return "etcd at " + ep + " does not speak TLS: use http://, or turn on TLS in etcd", err
	}
	return "", nil
}

// speaksPlainHTTP reports whether a plain HTTP request to addr is answered
// (etcd answers /version on its client port), that is, whether a TLS
// handshake there failed because the server does not speak TLS.
func speaksPlainHTTP(ctx context.Context, network, addr string) bool {
	if network != "tcp" {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/version", nil)
	if err != nil {
		return false
	}
	c := &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return true
}

// isRemoteAlert: the other side ended the TLS handshake with an alert
// ("remote error: tls: certificate required").
func isRemoteAlert(err error) bool {
	return err != nil && strings.Contains(err.Error(), "remote error: tls: ")
}
