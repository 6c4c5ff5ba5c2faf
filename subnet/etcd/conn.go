package etcd

import (
	"context"
	"errors"
	"net"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
)

// ok records a successful exchange with etcd.
func (r *Registry) ok() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.st.Connected {
		r.connectedLocked("connected to etcd at " + r.endpoints)
	}
}

// okDetail records a successful exchange and what the registry is doing.
func (r *Registry) okDetail(detail string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.connectedLocked(detail)
}

// connectedLocked records that etcd answers; after an outage it logs, once,
// how long etcd was gone (r.mu held).
func (r *Registry) connectedLocked(detail string) {
	if r.closed {
		return
	}
	if !r.st.Connected && !r.downSince.IsZero() {
		r.log.Info("etcd reachable again", "endpoints", r.endpoints, "down_for", time.Since(r.downSince).Round(time.Millisecond))
		r.downSince = time.Time{}
	}
	r.st.Connected, r.st.LastError, r.st.Detail = true, nil, detail
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
	if r.closed {
		return err
	}
	if errors.As(err, &ue) {
		if r.st.Connected {
			r.downSince = time.Now()
			r.log.Warn("etcd unreachable", "endpoints", r.endpoints, "cause", ue.Cause)
		}
		r.st.Detail = ue.Error()
	} else {
		r.st.Detail = "etcd at " + r.endpoints + ": " + err.Error()
	}
	r.st.Connected = false
	r.st.LastError = err
	return err
}

// errConnectionLost: the client's gRPC connection to etcd failed.
var errConnectionLost = status.Error(codes.Unavailable, "connection to etcd failed")

// monitor follows the state of cli's gRPC connection until cli is closed,
// so that a connection etcd closed (it stopped, restarted, crashed) shows at
// once instead of at the next call or watch probe, and its return is logged
// as soon as it connects. A silent death (a partition) shows when the
// connection's keepalive pings go unanswered (DialKeepAliveTime/Timeout).
func (r *Registry) monitor(cli *clientv3.Client) {
	conn := cli.ActiveConnection()
	st := conn.GetState()
	for conn.WaitForStateChange(cli.Ctx(), st) {
		st = conn.GetState()
		switch st {
		case connectivity.Ready:
			r.ok()
		case connectivity.TransientFailure:
			_ = r.fail(cli.Ctx(), errConnectionLost)
		}
	}
}

// watchUp records whether the lease watch works, for Status.
func (r *Registry) watchUp(up bool) {
	if up {
		r.watchDown.Store(0)
		return
	}
	r.watchDown.CompareAndSwap(0, time.Now().UnixNano())
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
