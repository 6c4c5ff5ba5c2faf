package sdnotify

import (
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// listen is a stand-in for systemd's notify socket.
func listen(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return c
}

func read(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("read notify socket: %v", err)
	}
	return string(buf[:n])
}

func TestNotifierSendsReadyStatusWatchdogStopping(t *testing.T) {
	c := listen(t)
	t.Setenv("WATCHDOG_USEC", "4000000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	n := New(slog.New(slog.DiscardHandler))
	if n.WatchdogInterval() != 4*time.Second {
		t.Errorf("watchdog interval %v", n.WatchdogInterval())
	}
	n.Status("waiting for etcd")
	n.Status("waiting for etcd") // not repeated
	n.Ready("running")
	n.Watchdog()
	n.Stopping("stopping")
	for _, want := range []string{"STATUS=waiting for etcd", "READY=1\nSTATUS=running", "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping"} {
		if got := read(t, c); got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
}

func TestWatchdogIsQuietWhenSystemdDidNotAskForIt(t *testing.T) {
	c := listen(t)
	t.Setenv("WATCHDOG_USEC", "")
	n := New(slog.New(slog.DiscardHandler))
	n.Watchdog()
	n.Status("x")
	if got := read(t, c); got != "STATUS=x" {
		t.Errorf("got %q, want only the status", got)
	}
}

func TestWithoutNotifySocketNothingHappens(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := New(slog.New(slog.DiscardHandler))
	n.Ready("running")
	n.Stopping("stopping")
}
