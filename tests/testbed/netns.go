package testbed

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/tools"
)

// InNetns runs fn on an OS thread that is inside the named network namespace
// (a name under /run/netns) and returns fn's error. Sockets that fn creates
// (net.Dial, net.Listen, unix.Socket) belong to that namespace for their whole
// life, so they can be used afterwards from any goroutine. fn must not start
// goroutines that create sockets: those run on other threads, in the caller's
// namespace.
func InNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	// A fresh goroutine, so the caller's thread never changes namespace.
	go func() { errc <- nstest.Do(ns, fn) }()
	return <-errc
}

// Dial connects to addr ("192.0.2.2:9285") from inside namespace ns.
func Dial(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := InNetns(ns, func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s %s in netns %s: %w", network, addr, ns, err)
	}
	return c, nil
}

// Listen listens on addr inside namespace ns.
func Listen(ns, network, addr string) (net.Listener, error) {
	var l net.Listener
	err := InNetns(ns, func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in netns %s: %w", network, addr, ns, err)
	}
	return l, nil
}

// ListenUDP opens a UDP socket bound to addr (IPv4 or IPv6) inside
// namespace ns.
func ListenUDP(ns string, addr netip.AddrPort) (*net.UDPConn, error) {
	var c *net.UDPConn
	network := "udp4"
	if addr.Addr().Is6() && !addr.Addr().Is4In6() {
		network = "udp6"
	}
	err := InNetns(ns, func() error {
		var err error
		c, err = net.ListenUDP(network, net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen udp %s in netns %s: %w", addr, ns, err)
	}
	return c, nil
}

// HTTPGet fetches url from inside namespace ns (the request goes over a
// connection created in ns) and returns the status code and body (at most
// 16 MiB).
func HTTPGet(ctx context.Context, ns, url string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, fmt.Errorf("GET %s: %w", url, err)
	}
	req.Close = true
	host := req.URL.Host
	if req.URL.Port() == "" {
		host = net.JoinHostPort(req.URL.Hostname(), "80")
	}
	conn, err := Dial(ctx, ns, "tcp", host)
	if err != nil {
		return 0, nil, fmt.Errorf("GET %s: %w", url, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	} else {
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	}
	if err := req.Write(conn); err != nil {
		return 0, nil, fmt.Errorf("GET %s in netns %s: write request: %w", url, ns, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return 0, nil, fmt.Errorf("GET %s in netns %s: read response: %w", url, ns, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return resp.StatusCode, body, fmt.Errorf("GET %s in netns %s: read body: %w", url, ns, err)
	}
	return resp.StatusCode, body, nil
}

// Exec runs a command inside namespace ns (`ip netns exec ns args...`) and
// returns its combined output. The error names the command and carries the
// output.
func Exec(ctx context.Context, ns string, args ...string) (string, error) {
	full := append([]string{"netns", "exec", ns}, args...)
	out, err := tools.Command(ctx, "ip", full...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("netns %s: %s: %w: %s", ns, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// ipCmd runs `ip args...` (in the root namespace, or in one with "-n ns"
// among args) and returns an error with the output.
func ipCmd(ctx context.Context, args ...string) error {
	out, err := tools.Command(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// setSysctl writes value to /proc/sys/<path> inside namespace ns.
func setSysctl(ctx context.Context, ns, path, value string) error {
	_, err := Exec(ctx, ns, "sh", "-c", fmt.Sprintf("echo %s > /proc/sys/%s", value, path))
	return err
}
