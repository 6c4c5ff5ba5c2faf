package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/tests/tools"
)

// iperfPort is the iperf3 server port in the server namespace (each
// namespace is the benchmark's own, so there is nothing to collide with).
const iperfPort = 5201

// iperfServer is an iperf3 server the benchmark started in a namespace; it
// serves one test after another until stop.
type iperfServer struct {
	ns   string
	cmd  *exec.Cmd
	out  *lockedBuffer
	done chan struct{}
	err  error // Wait's result, set before done is closed
}

// lockedBuffer collects a process's output while it runs.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf.Len() > 64<<10 { // keep the start, which says why it failed
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startIperfServer starts `iperf3 -s` in namespace ns and waits until it
// listens (at most 5 s). The caller must stop it.
func startIperfServer(ctx context.Context, ns string) (*iperfServer, error) {
	// Not tied to ctx: stop ends it by PID, also after ctx is cancelled.
	cmd := nsCommand(context.Background(), ns, "iperf3", "-s", "-p", strconv.Itoa(iperfPort))
	s := &iperfServer{ns: ns, cmd: cmd, out: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = s.out, s.out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start iperf3 server in netns %s: %w", ns, err)
	}
	go func() {
		s.err = cmd.Wait()
		close(s.done)
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := nsOutput(ctx, ns, "ss", "-Htln", fmt.Sprintf("sport = :%d", iperfPort))
		if err == nil && strings.TrimSpace(out) != "" {
			return s, nil
		}
		select {
		case <-s.done:
			return nil, fmt.Errorf("iperf3 server in netns %s exited before it listened (%v): %s", ns, s.err, firstLines(s.out.String(), 5))
		default:
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			s.stop()
			if ctx.Err() != nil {
				return nil, fmt.Errorf("iperf3 server in netns %s: %w", ns, ctx.Err())
			}
			return nil, fmt.Errorf("iperf3 server in netns %s does not listen on port %d after 5s: %s", ns, iperfPort, firstLines(s.out.String(), 5))
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			continue // the next round reports it after stopping the server
		}
	}
}

// pid is the server's process (ip netns exec execs iperf3).
func (s *iperfServer) pid() int { return s.cmd.Process.Pid }

// stop ends the server by its PID: SIGTERM, then SIGKILL after 2 s.
func (s *iperfServer) stop() {
	select {
	case <-s.done:
		return
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(2 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

// iperfSpec is one iperf3 client run.
type iperfSpec struct {
	ClientNS string
	Server   netip.Addr
	Streams  int
	Duration int // seconds (-t)
	Omit     int // seconds (-O)
}

// iperfResult is what the benchmark keeps of one iperf3 run.
type iperfResult struct {
	Streams       int     `json:"streams"`
	BitsPerSecond float64 `json:"bits_per_second"` // receiver's goodput over the measured (not omitted) time
	Bytes         int64   `json:"bytes"`           // received in the measured time
	Seconds       float64 `json:"seconds"`         // the measured time
	// AllBytes is what the sender sent including the omitted ramp-up: the
	// data moved while the daemons' CPU time was sampled.
	AllBytes    int64   `json:"all_bytes"`
	Retransmits int     `json:"retransmits"`
	SenderCPU   float64 `json:"sender_cpu_percent"`   // iperf3's own, of one core
	ReceiverCPU float64 `json:"receiver_cpu_percent"` // iperf3's own, of one core
	// ClientCPUSeconds is the client process's CPU time (its rusage).
	ClientCPUSeconds float64 `json:"client_cpu_seconds"`
}

// Gbps is the goodput in Gbit/s.
func (r iperfResult) Gbps() float64 { return r.BitsPerSecond / 1e9 }

// iperfReport is the part of `iperf3 -J` output the benchmark reads.
type iperfReport struct {
	Error string `json:"error"`
	Start struct {
		TestStart struct {
			NumStreams int `json:"num_streams"`
		} `json:"test_start"`
	} `json:"start"`
	Intervals []struct {
		Sum struct {
			Bytes   int64 `json:"bytes"`
			Omitted bool  `json:"omitted"`
		} `json:"sum"`
	} `json:"intervals"`
	End struct {
		SumSent struct {
			Bytes       int64   `json:"bytes"`
			Retransmits int     `json:"retransmits"`
			Seconds     float64 `json:"seconds"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes         int64   `json:"bytes"`
			Seconds       float64 `json:"seconds"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
		CPU struct {
			HostTotal   float64 `json:"host_total"`
			RemoteTotal float64 `json:"remote_total"`
		} `json:"cpu_utilization_percent"`
	} `json:"end"`
}

// parseIperf reads `iperf3 -c ... -J` output. An "error" in the report, or
// a report with no received data, is an error.
func parseIperf(data []byte) (iperfResult, error) {
	var rep iperfReport
	if err := json.Unmarshal(data, &rep); err != nil {
		return iperfResult{}, fmt.Errorf("iperf3 JSON: %w (output starts %q)", err, firstLines(string(data), 3))
	}
	if rep.Error != "" {
		return iperfResult{}, fmt.Errorf("iperf3: %s", rep.Error)
	}
	r := iperfResult{
		Streams:       rep.Start.TestStart.NumStreams,
		BitsPerSecond: rep.End.SumReceived.BitsPerSecond,
		Bytes:         rep.End.SumReceived.Bytes,
		Seconds:       rep.End.SumReceived.Seconds,
		Retransmits:   rep.End.SumSent.Retransmits,
		SenderCPU:     rep.End.CPU.HostTotal,
		ReceiverCPU:   rep.End.CPU.RemoteTotal,
	}
	for _, iv := range rep.Intervals {
		r.AllBytes += iv.Sum.Bytes
	}
	if r.AllBytes < rep.End.SumSent.Bytes {
		r.AllBytes = rep.End.SumSent.Bytes
	}
	if r.Bytes <= 0 || r.Seconds <= 0 || r.BitsPerSecond <= 0 {
		return r, fmt.Errorf("iperf3: no data received (%d bytes in %.2fs)", r.Bytes, r.Seconds)
	}
	return r, nil
}

// runIperf runs one iperf3 TCP client test against the server at
// spec.Server (an iperfServer must be listening there) and returns its
// result. A server still busy with an aborted test is retried once.
func runIperf(ctx context.Context, spec iperfSpec) (iperfResult, []byte, error) {
	bound := time.Duration(spec.Duration+spec.Omit)*time.Second + 30*time.Second
	args := []string{"iperf3", "-c", spec.Server.String(), "-p", strconv.Itoa(iperfPort),
		"-t", strconv.Itoa(spec.Duration), "-O", strconv.Itoa(spec.Omit), "-P", strconv.Itoa(spec.Streams),
		"-J", "--connect-timeout", "5000"}
	var lastErr error
	for try := 0; try < 2; try++ {
		rctx, cancel := context.WithTimeout(ctx, bound)
		cmd := nsCommand(rctx, spec.ClientNS, args...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		runErr := cmd.Run()
		cancel()
		if ctx.Err() != nil {
			return iperfResult{}, nil, ctx.Err()
		}
		res, err := parseIperf(stdout.Bytes())
		if err == nil && runErr == nil {
			ps := cmd.ProcessState // ip netns exec execs iperf3: the same process
			res.ClientCPUSeconds = (ps.UserTime() + ps.SystemTime()).Seconds()
			return res, stdout.Bytes(), nil
		}
		if err == nil {
			err = fmt.Errorf("iperf3: %w: %s", runErr, firstLines(stderr.String(), 3))
		} else if runErr != nil && rctx.Err() != nil {
			err = fmt.Errorf("iperf3 did not finish within %v: %w", bound, err)
		}
		lastErr = fmt.Errorf("iperf3 %d stream(s) from netns %s to %s: %w", spec.Streams, spec.ClientNS, spec.Server, err)
		if !strings.Contains(err.Error(), "busy") {
			break
		}
		if err := sleepCtx(ctx, 2*time.Second); err != nil {
			return iperfResult{}, nil, err
		}
	}
	return iperfResult{}, nil, lastErr
}

// iperfVersion returns the first line of `iperf3 --version`.
func iperfVersion() string {
	out, err := tools.Command(context.Background(), "iperf3", "--version").CombinedOutput()
	if err != nil && len(out) == 0 {
		return "unknown: " + err.Error()
	}
	return firstLines(string(out), 1)
}
