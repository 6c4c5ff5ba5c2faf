package testbed

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tulle-net/tulle/tests/tools"
)

// Exec runs a command inside the node's namespace and returns its combined
// output; the error carries the command and the output.
func (n *Node) Exec(ctx context.Context, args ...string) (string, error) {
	return Exec(ctx, n.NS, args...)
}

// Command returns a command that runs args inside the node's namespace, for
// processes the caller manages itself (the caller waits for it).
func (n *Node) Command(ctx context.Context, args ...string) *exec.Cmd {
	return tools.Command(ctx, "ip", append([]string{"netns", "exec", n.NS}, args...)...)
}

// Dial connects from inside the node's namespace.
func (n *Node) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return Dial(ctx, n.NS, network, addr)
}

// Listen listens inside the node's namespace.
func (n *Node) Listen(network, addr string) (net.Listener, error) {
	return Listen(n.NS, network, addr)
}

// ListenUDP opens a UDP socket inside the node's namespace.
func (n *Node) ListenUDP(addr netip.AddrPort) (*net.UDPConn, error) {
	return ListenUDP(n.NS, addr)
}

// HTTPGet fetches url from inside the node's namespace.
func (n *Node) HTTPGet(ctx context.Context, url string) (int, []byte, error) {
	return HTTPGet(ctx, n.NS, url)
}

// PingResult is the summary line of a ping run.
type PingResult struct {
	Sent, Received int
	AvgRTT         time.Duration
	Output         string
}

var (
	pingSummary = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)
	pingRTT     = regexp.MustCompile(`= [0-9.]+/([0-9.]+)/`)
)

// Ping sends count echo requests from the node to dst, 0.2 s apart, each
// waited for at most 2 s, with extra ping flags (e.g. "-s", "1400").
// It fails unless every request is answered.
func (n *Node) Ping(ctx context.Context, dst netip.Addr, count int, extra ...string) (PingResult, error) {
	args := append([]string{"ping", "-n", "-c", strconv.Itoa(count), "-i", "0.2", "-W", "2"}, extra...)
	out, err := n.Exec(ctx, append(args, dst.String())...)
	r := PingResult{Output: out}
	if m := pingSummary.FindStringSubmatch(out); m != nil {
		r.Sent, _ = strconv.Atoi(m[1])
		r.Received, _ = strconv.Atoi(m[2])
	}
	if m := pingRTT.FindStringSubmatch(out); m != nil {
		if ms, perr := strconv.ParseFloat(m[1], 64); perr == nil {
			r.AvgRTT = time.Duration(ms * float64(time.Millisecond))
		}
	}
	if err == nil && r.Received < count {
		err = fmt.Errorf("netns %s: ping %s: %d of %d answered:\n%s", n.NS, dst, r.Received, count, out)
	}
	if err != nil {
		return r, fmt.Errorf("%s -> %s: %w", n.Name, dst, err)
	}
	return r, nil
}

// WaitReachable pings dst from the node every 0.1 s until one echo is
// answered or timeout passes, and returns how long it took. An answer
// counts only within timeout: ping's own deadline is whole seconds, so
// ping is killed at the deadline and a late answer is an error.
func (n *Node) WaitReachable(ctx context.Context, dst netip.Addr, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	deadline := start.Add(timeout)
	var last error
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return time.Since(start), fmt.Errorf("%s -> %s: no echo reply within %v: %w", n.Name, dst, timeout, last)
		}
		secs := strconv.Itoa(int(math.Max(1, math.Ceil(left.Seconds()))))
		pctx, cancel := context.WithDeadline(ctx, deadline)
		_, err := n.Exec(pctx, "ping", "-n", "-q", "-c", "1", "-i", "0.1", "-w", secs, dst.String())
		cancel()
		if took := time.Since(start); err == nil && took <= timeout {
			return took, nil
		} else if err == nil {
			return took, fmt.Errorf("%s -> %s: first echo reply after %v, later than %v", n.Name, dst, took.Round(time.Millisecond), timeout)
		}
		last = err
		if ctx.Err() != nil {
			return time.Since(start), fmt.Errorf("%s -> %s: %w", n.Name, dst, ctx.Err())
		}
		// ping fails at once while there is no route yet: try again shortly.
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Transfer is the outcome of a TCP transfer.
type Transfer struct {
	Bytes   int64
	Elapsed time.Duration
	SHA256  [32]byte // of the bytes sent, equal to the bytes received
}

// BitsPerSecond is the goodput of the transfer.
func (t Transfer) BitsPerSecond() float64 {
	if t.Elapsed <= 0 {
		return 0
	}
	return float64(t.Bytes) * 8 / t.Elapsed.Seconds()
}

// TransferTCP sends size pseudo-random bytes over one TCP connection from
// node from to node to (at to.Addr, an ephemeral port) and verifies that
// the receiver got exactly those bytes (count and SHA-256). Both ends are
// sockets of the calling program inside the nodes' namespaces. The transfer
// is bounded by ctx, or by 2 minutes if ctx has no deadline.
func TransferTCP(ctx context.Context, from, to *Node, size int64) (Transfer, error) {
	return TransferTCPTo(ctx, from, to, to.Addr, size)
}

// TransferTCPTo is TransferTCP to the address dst of node to (IPv4 or
// IPv6, e.g. to.Addr6).
func TransferTCPTo(ctx context.Context, from, to *Node, dst netip.Addr, size int64) (Transfer, error) {
	network := "tcp4"
	if dst.Is6() && !dst.Is4In6() {
		network = "tcp6"
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
	}
	deadline, _ := ctx.Deadline()
	ln, err := to.Listen(network, netip.AddrPortFrom(dst, 0).String())
	if err != nil {
		return Transfer{}, err
	}
	defer ln.Close()
	stopOnCancel := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopOnCancel()

	type received struct {
		n   int64
		sum [32]byte
		err error
	}
	recvc := make(chan received, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		conn, err := ln.Accept()
		if err != nil {
			recvc <- received{err: fmt.Errorf("accept on %s: %w", ln.Addr(), err)}
			return
		}
		defer conn.Close()
		_ = conn.SetDeadline(deadline)
		h := sha256.New()
		n, err := io.Copy(h, conn)
		var r received
		r.n, r.err = n, err
		copy(r.sum[:], h.Sum(nil))
		recvc <- r
	}()
	defer wg.Wait()

	start := time.Now()
	conn, err := from.Dial(ctx, network, ln.Addr().String())
	if err != nil {
		ln.Close()
		return Transfer{}, err
	}
	_ = conn.SetDeadline(deadline)
	h := sha256.New()
	src := rand.NewChaCha8([32]byte{byte(size), byte(size >> 8), 'T', 'u', 'l', 'l', 'e'})
	buf := make([]byte, 256<<10)
	var sent int64
	var sendErr error
	for sent < size {
		chunk := buf[:min(int64(len(buf)), size-sent)]
		_, _ = src.Read(chunk)
		h.Write(chunk)
		n, err := conn.Write(chunk)
		sent += int64(n)
		if err != nil {
			sendErr = fmt.Errorf("send to %s after %d bytes: %w", ln.Addr(), sent, err)
			break
		}
	}
	if cw, ok := conn.(*net.TCPConn); ok && sendErr == nil {
		_ = cw.CloseWrite()
	}
	r := <-recvc
	elapsed := time.Since(start)
	conn.Close()
	t := Transfer{Bytes: r.n, Elapsed: elapsed}
	copy(t.SHA256[:], h.Sum(nil))
	what := fmt.Sprintf("TCP %s (%s) -> %s (%s)", from.Name, from.Addr, to.Name, ln.Addr())
	switch {
	case sendErr != nil:
		return t, fmt.Errorf("%s: %w", what, sendErr)
	case r.err != nil:
		return t, fmt.Errorf("%s: receive after %d of %d bytes: %w", what, r.n, size, r.err)
	case r.n != size:
		return t, fmt.Errorf("%s: received %d bytes, sent %d", what, r.n, size)
	case r.sum != t.SHA256:
		return t, fmt.Errorf("%s: SHA-256 of the received bytes %x differs from the sent %x", what, r.sum, t.SHA256)
	}
	return t, nil
}

// IPerfResult is what iperf3 measured.
type IPerfResult struct {
	BitsPerSecond float64 // received goodput, all streams
	Retransmits   int
}

// IPerf3 runs an iperf3 TCP test of the given length and stream count from
// client to server (at server.Addr) and returns the receiver's goodput.
// It needs the iperf3 program (Debian package iperf3).
func IPerf3(ctx context.Context, client, server *Node, seconds, streams int) (IPerfResult, error) {
	if _, err := tools.LookPath("iperf3"); err != nil {
		return IPerfResult{}, fmt.Errorf("iperf3: %w (apt-get install iperf3)", err)
	}
	if seconds < 1 || seconds > 60 || streams < 1 || streams > 16 {
		return IPerfResult{}, fmt.Errorf("iperf3: %d s with %d streams: want 1..60 s and 1..16 streams", seconds, streams)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(seconds+20)*time.Second)
	defer cancel()
	const port = "5201"
	srv := server.Command(ctx, "iperf3", "-s", "-1", "-B", server.Addr.String(), "-p", port, "--forceflush")
	pipe, err := srv.StdoutPipe()
	if err != nil {
		return IPerfResult{}, fmt.Errorf("iperf3 server in %s: %w", server.NS, err)
	}
	srv.Stderr = srv.Stdout
	if err := srv.Start(); err != nil {
		return IPerfResult{}, fmt.Errorf("iperf3 server in %s: %w", server.NS, err)
	}
	// The server says when it listens; its output is kept for errors.
	var srvOut strings.Builder
	listening := make(chan struct{})
	srvDone := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(pipe)
		said := false
		for sc.Scan() {
			srvOut.WriteString(sc.Text() + "\n")
			if !said && strings.Contains(sc.Text(), "Server listening") {
				said = true
				close(listening)
			}
		}
		srvDone <- srv.Wait()
	}()
	defer func() {
		cancel() // kills the server if the client never reached it
		<-srvDone
	}()
	select {
	case <-listening:
	case <-ctx.Done():
		return IPerfResult{}, fmt.Errorf("iperf3 server in %s did not listen: %w", server.NS, ctx.Err())
	case err := <-srvDone:
		srvDone <- err
		return IPerfResult{}, fmt.Errorf("iperf3 server in %s exited (%v): %s", server.NS, err, strings.TrimSpace(srvOut.String()))
	}

	out, err := client.Exec(ctx, "iperf3", "-c", server.Addr.String(), "-p", port,
		"-t", strconv.Itoa(seconds), "-P", strconv.Itoa(streams), "-J")
	var report struct {
		Error string
		End   struct {
			SumSent struct {
				Retransmits int
			} `json:"sum_sent"`
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		}
	}
	if jerr := json.Unmarshal([]byte(out), &report); jerr != nil {
		return IPerfResult{}, errors.Join(fmt.Errorf("iperf3 %s -> %s: %w", client.Name, server.Addr, err), jerr)
	}
	if report.Error != "" {
		return IPerfResult{}, fmt.Errorf("iperf3 %s -> %s: %s", client.Name, server.Addr, report.Error)
	}
	if err != nil {
		return IPerfResult{}, fmt.Errorf("iperf3 %s -> %s: %w", client.Name, server.Addr, err)
	}
	return IPerfResult{BitsPerSecond: report.End.SumReceived.BitsPerSecond, Retransmits: report.End.SumSent.Retransmits}, nil
}

// FormatBits formats a rate as "1.23 Gbit/s".
func FormatBits(bps float64) string {
	switch {
	case bps >= 1e9:
		return fmt.Sprintf("%.2f Gbit/s", bps/1e9)
	case bps >= 1e6:
		return fmt.Sprintf("%.1f Mbit/s", bps/1e6)
	default:
		return fmt.Sprintf("%.0f kbit/s", bps/1e3)
	}
}
