// Package health serves tulled's HTTP endpoints: /metrics (Prometheus),
// /healthz (the process is alive and its main loop turns) and /readyz
// (ready to carry traffic, or 503 with the reason).
//
// The daemon's main loop owns the state: it publishes a Status and ticks;
// handlers only read what was published, so a stuck control plane can not
// hang the endpoints that report it.
package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Status is what readiness is judged on; the daemon publishes a new one on
// every change and every tick.
type Status struct {
	// Phase is the start-up or run phase, for logs and STATUS= lines:
	// "starting", "waiting for etcd", "running", "stopping".
	Phase string
	// EtcdDetail is the registry's own words while it is not connected,
	// e.g. "waiting for etcd at http://192.0.2.250:2379: connection refused".
	EtcdConnected bool
	EtcdDetail    string
	LeaseHeld     bool
	// LeasePhase is the lease manager's phase while no lease is held,
	// e.g. "waiting for network config"; it is appended to "no lease yet".
	LeasePhase string
	// LeaseProblem says why the held lease can not be trusted: expired in
	// etcd, or due for renewal and not renewed ("" when it is fine).
	LeaseProblem string
	// WatchProblem says that the lease watch has been down too long, so
	// changes of other hosts' leases are not seen ("" when it is fine).
	WatchProblem string
	// DataPlaneRunning: the TUN device is up and every worker runs.
	DataPlaneRunning bool
	SubnetEnvWritten bool
	SubnetFile       string
	IPMasqWanted     bool // --ip-masq
	IPMasqInstalled  bool
	IPMasqError      string
	Stopping         bool
}

// check is one readiness condition, in the order a start-up meets them.
type check struct {
	name   string
	ok     bool
	reason string
}

func (s Status) checks() []check {
	etcdReason := s.EtcdDetail
	if etcdReason == "" {
		etcdReason = "waiting for etcd"
	}
	leaseReason := "no lease yet"
	if s.LeasePhase != "" {
		leaseReason += " (" + s.LeasePhase + ")"
	}
	if !s.EtcdConnected {
		leaseReason = etcdReason
	}
	envReason := "subnet.env not written"
	if s.SubnetFile != "" {
		envReason = fmt.Sprintf("subnet.env not written (%s)", s.SubnetFile)
	}
	masqReason := "ip-masq rules not installed"
	if s.IPMasqError != "" {
		masqReason += ": " + s.IPMasqError
	}
	return []check{
		{"running", !s.Stopping, "shutting down"},
		{"lease", s.LeaseHeld, leaseReason},
		{"data-plane", s.DataPlaneRunning, "data plane not running"},
		{"subnet-env", s.SubnetEnvWritten, envReason},
		{"ip-masq", !s.IPMasqWanted || s.IPMasqInstalled, masqReason},
		{"lease-renewal", s.LeaseProblem == "", s.LeaseProblem},
		{"lease-watch", s.WatchProblem == "", s.WatchProblem},
	}
}

// NotReadyReason is why tulled is not ready, or "" when it is: lease held,
// data plane running, subnet.env written, ip-masq rules in place (when
// wanted), the lease renewed in time and the lease watch working (or down
// only briefly), and not shutting down. While the lease is not held and
// etcd is not reachable, the reason is the registry's own detail. Not
// ready is a report, not a switch: the data plane keeps forwarding.
func (s Status) NotReadyReason() string {
	for _, c := range s.checks() {
		if !c.ok {
			return c.reason
		}
	}
	return ""
}

// Ready reports NotReadyReason() == "".
func (s Status) Ready() bool { return s.NotReadyReason() == "" }

// State is shared between the daemon's main loop (writer) and the HTTP
// handlers (readers).
type State struct {
	status   atomic.Pointer[Status]
	lastTick atomic.Int64 // unix nanoseconds
	maxStall time.Duration
	now      func() time.Time
}

// NewState returns a State that calls the main loop stalled when it has not
// ticked for maxStall.
func NewState(maxStall time.Duration) *State {
	s := &State{maxStall: maxStall, now: time.Now}
	s.status.Store(&Status{Phase: "starting"})
	s.Tick()
	return s
}

// Publish makes st the status the endpoints report.
func (s *State) Publish(st Status) { s.status.Store(&st) }

// Status is the last published status.
func (s *State) Status() Status { return *s.status.Load() }

// Tick records that the main loop turned.
func (s *State) Tick() { s.lastTick.Store(s.now().UnixNano()) }

// Stalled says how long the main loop has not turned, if longer than
// maxStall; 0 otherwise.
func (s *State) Stalled() time.Duration {
	since := s.now().Sub(time.Unix(0, s.lastTick.Load()))
	if since > s.maxStall {
		return since
	}
	return 0
}

// Handler serves /metrics from g, /healthz and /readyz from s.
func Handler(s *State, g prometheus.Gatherer, logger *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorLog:      slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		ErrorHandling: promhttp.ContinueOnError,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if d := s.Stalled(); d > 0 {
			text(w, http.StatusServiceUnavailable, fmt.Sprintf("main loop has not turned for %s", d.Round(time.Second)))
			return
		}
		text(w, http.StatusOK, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		st := s.Status()
		reason := st.NotReadyReason()
		if _, verbose := r.URL.Query()["verbose"]; verbose {
			var b strings.Builder
			for _, c := range st.checks() {
				if c.ok {
					fmt.Fprintf(&b, "[+]%s ok\n", c.name)
				} else {
					fmt.Fprintf(&b, "[-]%s: %s\n", c.name, c.reason)
				}
			}
			if reason == "" {
				b.WriteString("ok")
			} else {
				b.WriteString("not ready: " + reason)
			}
			code := http.StatusOK
			if reason != "" {
				code = http.StatusServiceUnavailable
			}
			text(w, code, b.String())
			return
		}
		if reason != "" {
			text(w, http.StatusServiceUnavailable, reason)
			return
		}
		text(w, http.StatusOK, "ok")
	})
	return mux
}

func text(w http.ResponseWriter, code int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	fmt.Fprintln(w, body)
}

// Listen binds addr ("host:port") for Serve, so a busy port is an error at
// start-up, not a log line later.
func Listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for HTTP on %s: %w", addr, err)
	}
	return ln, nil
}

// Serve serves h on ln until ctx is done, then shuts down, giving requests
// in flight up to two seconds. It returns nil after a shutdown, or the
// error that stopped it.
func Serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	select {
	case err := <-done:
		return fmt.Errorf("HTTP server on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	if err := <-done; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("HTTP server on %s: %w", ln.Addr(), err)
	}
	return nil
}

// Pprof serves Go's profiler (/debug/pprof/...), for --debug-pprof, on a
// listener of its own. /debug/pprof/cmdline shows cmdline (the daemon's
// command line with secrets redacted), not os.Args.
func Pprof(cmdline []string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprint(w, strings.Join(cmdline, "\x00"))
	})
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
