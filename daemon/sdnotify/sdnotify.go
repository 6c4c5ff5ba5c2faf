// Package sdnotify tells systemd how tulled is doing (sd_notify through
// github.com/coreos/go-systemd/v22/daemon): READY=1 once ready, STATUS=
// with the current phase, WATCHDOG=1 pings, STOPPING=1 on shutdown.
// Without NOTIFY_SOCKET (not run by systemd) every call does nothing.
package sdnotify

import (
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Notifier sends state changes to systemd. Its methods are safe for
// concurrent use; a failed send is logged once, not returned, since the
// daemon works the same without systemd.
type Notifier struct {
	logger   *slog.Logger
	watchdog time.Duration

	mu         sync.Mutex
	lastStatus string
	failed     bool
}

// New reads NOTIFY_SOCKET and the watchdog settings (WATCHDOG_USEC,
// WATCHDOG_PID) from the environment.
func New(logger *slog.Logger) *Notifier {
	n := &Notifier{logger: logger}
	wd, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		logger.Warn("systemd watchdog settings unreadable; not pinging", "error", err)
	}
	n.watchdog = wd
	return n
}

// WatchdogInterval is systemd's WatchdogSec for this process, 0 if off.
// Ping at most every half of it.
func (n *Notifier) WatchdogInterval() time.Duration { return n.watchdog }

// Ready sends READY=1 with a status line.
func (n *Notifier) Ready(status string) {
	n.send(daemon.SdNotifyReady + "\nSTATUS=" + status)
}

// Status sends STATUS=status if it differs from the last one sent.
func (n *Notifier) Status(status string) {
	n.mu.Lock()
	same := status == n.lastStatus
	n.lastStatus = status
	n.mu.Unlock()
	if !same {
		n.send("STATUS=" + status)
	}
}

// Watchdog sends WATCHDOG=1 when systemd's watchdog is on.
func (n *Notifier) Watchdog() {
	if n.watchdog > 0 {
		n.send(daemon.SdNotifyWatchdog)
	}
}

// Stopping sends STOPPING=1 with a status line.
func (n *Notifier) Stopping(status string) {
	n.send(daemon.SdNotifyStopping + "\nSTATUS=" + status)
}

func (n *Notifier) send(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.mu.Lock()
		first := !n.failed
		n.failed = true
		n.mu.Unlock()
		if first {
			n.logger.Warn("sd_notify failed; systemd will not hear from tulled", "error", err)
		}
		return
	}
	if status, ok := cutStatus(state); ok {
		n.mu.Lock()
		n.lastStatus = status
		n.mu.Unlock()
	}
}

// cutStatus returns what follows "STATUS=" at the start of a line of state.
func cutStatus(state string) (string, bool) {
	if status, ok := strings.CutPrefix(state, "STATUS="); ok {
		return status, true
	}
	_, status, ok := strings.Cut(state, "\nSTATUS=")
	return status, ok
}
