package testbed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"
)

// MetricsPort is the port of tulled's --metrics-addr in the bed.
const MetricsPort = 9285

// DefaultReadyTimeout bounds StartTulled's wait for /readyz.
const DefaultReadyTimeout = 30 * time.Second

// Tulled is one run of the real tulled binary on a host.
type Tulled struct {
	Host        *Host
	Args        []string // tulled's arguments
	MetricsAddr string   // host:port serving /metrics, /healthz and /readyz (in the host's namespace)

	p *proc
}

// TulledArgs returns the arguments the bed gives tulled on h, then extra
// (a later flag wins, so extra may override):
// --etcd-endpoints http://192.0.2.250:2379 (every member, and the TLS
// files with EtcdOptions.TLS) --iface <link>
// --subnet-file <dir>/subnet.env --metrics-addr <addr>:9285.
func (h *Host) TulledArgs(extra ...string) []string {
	args := append(h.bed.etcdTulledArgs(),
		"--iface", h.Link,
		"--subnet-file", h.SubnetFile,
		"--metrics-addr", net.JoinHostPort(h.Addr.String(), fmt.Sprint(MetricsPort)),
	)
	return append(args, extra...)
}

// metricsAddrOf returns the last --metrics-addr value in args.
func metricsAddrOf(args []string) string {
	addr := ""
	for i, a := range args {
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "metrics-addr" {
			continue
		}
		if hasValue {
			addr = value
		} else if i+1 < len(args) {
			addr = args[i+1]
		}
	}
	return addr
}

// LaunchTulled builds tulled (once per process) and starts it on h with
// TulledArgs(extra...), without waiting for it to become ready. Its output
// is appended to h.LogFile. It fails if a tulled already runs on h.
func (h *Host) LaunchTulled(ctx context.Context, extra ...string) (*Tulled, error) {
	h.mu.Lock()
	cur := h.tulled
	h.mu.Unlock()
	if cur != nil && !cur.p.exited() {
		return nil, fmt.Errorf("host %s: tulled (pid %d) is already running", h.Name, cur.Pid())
	}
	bin, err := BuildTulled(ctx)
	if err != nil {
		return nil, err
	}
	args := h.TulledArgs(extra...)
	p, err := h.bed.startProc("tulled on "+h.Name, h.NS, h.LogFile, bin, args...)
	if err != nil {
		return nil, err
	}
	t := &Tulled{Host: h, Args: args, MetricsAddr: metricsAddrOf(args), p: p}
	h.mu.Lock()
	h.tulled = t
	h.mu.Unlock()
	return t, nil
}

// StartTulled launches tulled on h (see LaunchTulled) and waits up to
// DefaultReadyTimeout for GET /readyz to answer 200.
func (h *Host) StartTulled(ctx context.Context, extra ...string) (*Tulled, error) {
	t, err := h.LaunchTulled(ctx, extra...)
	if err != nil {
		return nil, err
	}
	if err := t.WaitReady(ctx, DefaultReadyTimeout); err != nil {
		t.p.terminate(5 * time.Second)
		return nil, err
	}
	return t, nil
}

// Tulled returns the last tulled launched on h (running or not), nil if none.
func (h *Host) Tulled() *Tulled {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.tulled
}

// Pid is the tulled process ID.
func (t *Tulled) Pid() int { return t.p.pid() }

// Exited is closed when the process has exited.
func (t *Tulled) Exited() <-chan struct{} { return t.p.done }

// ExitCode is the exit status once the process has exited: -1 while it runs
// or when a signal ended it.
func (t *Tulled) ExitCode() int {
	if !t.p.exited() || t.p.state == nil {
		return -1
	}
	return t.p.state.ExitCode()
}

// ExitDescription says how the process ended ("exit status 1"), or "running".
func (t *Tulled) ExitDescription() string { return t.p.exitDescription() }

// Signal sends sig to tulled.
func (t *Tulled) Signal(sig syscall.Signal) error { return t.p.signal(sig) }

// Stop sends SIGTERM, waits up to 15 s and requires exit status 0.
func (t *Tulled) Stop() error {
	if err := t.p.stop(15 * time.Second); err != nil {
		return fmt.Errorf("host %s: %w; log:\n%s", t.Host.Name, err, t.LogTail(30))
	}
	return nil
}

// Kill sends SIGKILL (a crash: nothing is cleaned up by tulled) and waits.
func (t *Tulled) Kill() error { return t.p.kill() }

// LogTail returns the last n lines of the host's tulled log (all runs).
func (t *Tulled) LogTail(n int) string { return LogTail(t.Host.LogFile, n) }

// URL returns http://<metrics addr><path>.
func (t *Tulled) URL(path string) string { return "http://" + t.MetricsAddr + path }

// Get fetches path ("/readyz") from tulled's HTTP server, from inside the
// host's namespace.
func (t *Tulled) Get(ctx context.Context, path string) (int, []byte, error) {
	return HTTPGet(ctx, t.Host.NS, t.URL(path))
}

// WaitReady polls /readyz until it answers 200, the process exits or
// timeout passes; the error then carries the last answer and the log tail.
func (t *Tulled) WaitReady(ctx context.Context, timeout time.Duration) error {
	if t.MetricsAddr == "" {
		return fmt.Errorf("host %s: tulled runs without --metrics-addr: no /readyz to wait for", t.Host.Name)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last := "no answer yet"
	for {
		if t.p.exited() {
			return fmt.Errorf("host %s: tulled exited before it was ready (%s); log:\n%s", t.Host.Name, t.p.exitDescription(), t.LogTail(40))
		}
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		code, body, err := t.Get(rctx, "/readyz")
		rcancel()
		switch {
		case err == nil && code == 200:
			return nil
		case err == nil:
			last = fmt.Sprintf("/readyz %d: %s", code, strings.TrimSpace(string(body)))
		default:
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			why := "timed out"
			if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
				why = ctx.Err().Error()
			}
			return fmt.Errorf("host %s: tulled not ready within %v (%s); last: %s; log:\n%s", t.Host.Name, timeout, why, last, t.LogTail(40))
		case <-tick.C:
		}
	}
}
