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

// fail is failOn without a key.
func (r *Registry) fail(ctx context.Context, err error) error { return r.failOn(ctx, "", err) }

// failOn explains err from a request about key: an unreachable etcd
// becomes "waiting for etcd at <endpoints>: <cause>" (*UnreachableError), a
// refusal says what was refused and why (*RefusedError, e.g. "permission
// denied for user tulle on <key>"). It records it in the status and
// returns it. An error from the caller's own cancellation is returned as it
// is.
func (r *Registry) failOn(ctx context.Context, key string, err error) error {
	if err == nil || ctx.Err() != nil {
		return err
	}
	var ue *UnreachableError
	var re *RefusedError
	if refused := r.refusal(err, key); refused != nil {
		err = refused
	} else if unreachable(err) && !errors.As(err, &ue) {
		err = r.diagnose(ctx, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return err
	}
	switch {
	case errors.As(err, &ue):
		if r.st.Connected {
			r.downSince = time.Now()
			r.log.Warn("etcd unreachable", "endpoints", r.endpoints, "cause", ue.Cause)
		}
		r.st.Detail = ue.Error()
	case errors.As(err, &re):
		r.st.Detail = "etcd at " + r.endpoints + " refused: " + re.Reason
	default:
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
	cause, reachable, certain := r.dialEndpoints(ctx)
	switch {
	case reachable:
		// gRPC would wait for its whole timeout on a TLS handshake that
		// fails; a refusal by every endpoint is told at once.
		if re, all := r.tlsRefusal(ctx, errTLSRefused); all {
			return r.fail(ctx, re)
		}
		if cli != nil {
			cli.ActiveConnection().ResetConnectBackoff()
		}
		return nil
	case !certain:
		// A connect that timed out: the call itself will tell; meanwhile
		// the status says what is known.
		r.mu.Lock()
		if !r.st.Connected && !r.closed {
			r.st.Detail = (&UnreachableError{Endpoints: r.endpoints, Cause: cause}).Error()
		}
		r.mu.Unlock()
		return nil
	}
	return r.fail(ctx, &UnreachableError{Endpoints: r.endpoints, Cause: cause, Err: errNoEndpoint})
}

var (
	errNoEndpoint = errors.New("no etcd endpoint accepts connections")
	errTLSRefused = errors.New("every etcd endpoint refuses TLS with us")
)

// dialEndpoints dials every endpoint at once, each for at most DialTimeout
// and never past ctx's deadline; reachable if one accepts. cause names why
// the first failing one (in the order given) did not ("connection refused");
// certain is true when every endpoint was refused outright (no timeout).
func (r *Registry) dialEndpoints(ctx context.Context) (cause string, reachable, certain bool) {
	dctx, cancel := context.WithTimeout(ctx, r.cfg.DialTimeout)
	defer cancel()
	timeout := r.cfg.DialTimeout
	if dl, ok := dctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	type result struct {
		i   int
		err error
	}
	results := make(chan result, len(r.cfg.Endpoints))
	n := 0
	for i, ep := range r.cfg.Endpoints {
		network, addr, err := dialTarget(ep)
		if err != nil {
			continue
		}
		n++
		go func() {
			var d net.Dialer
			c, err := d.DialContext(dctx, network, addr)
			if err == nil {
				c.Close()
			}
			results <- result{i, err}
		}()
	}
	causes := make([]string, len(r.cfg.Endpoints))
	certain = true
	for ; n > 0; n-- {
		res := <-results
		if res.err == nil && !reachable {
			reachable = true
			cancel() // the others need not finish; they are waited for
			continue
		}
		if res.err == nil {
			continue
		}
		var errno syscall.Errno
		var ne net.Error
		switch {
		case errors.As(res.err, &errno):
			causes[res.i] = errno.Error()
		case errors.As(res.err, &ne) && ne.Timeout(), errors.Is(res.err, context.DeadlineExceeded):
			causes[res.i] = "no answer to TCP connect within " + timeout.Round(time.Millisecond).String()
			certain = false
		default:
			causes[res.i] = res.err.Error()
			certain = false
		}
	}
	if reachable {
		return "", true, false
	}
	for _, c := range causes {
		if c != "" {
			return c, false, certain
		}
	}
	return "no usable endpoint", false, true
}
