package main

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"time"
)

// pingResult is one RTT measurement: per-reply times summarised.
type pingResult struct {
	Sent     int     `json:"sent"`
	Received int     `json:"received"`
	MedianUs float64 `json:"median_us"`
	MeanUs   float64 `json:"mean_us"`
	MinUs    float64 `json:"min_us"`
	MaxUs    float64 `json:"max_us"`
}

var (
	pingReplyRE   = regexp.MustCompile(`icmp_seq=\d+ .*time=([0-9.]+) ms`)
	pingSummaryRE = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)
)

// parsePing reads ping's output (without -q): the time of every reply and
// the transmitted/received summary. It fails if no reply came back.
func parsePing(out string) (pingResult, error) {
	var r pingResult
	var rtts []float64
	for _, m := range pingReplyRE.FindAllStringSubmatch(out, -1) {
		ms, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			return r, fmt.Errorf("ping: reply time %q: %w", m[1], err)
		}
		rtts = append(rtts, ms*1000)
	}
	if m := pingSummaryRE.FindStringSubmatch(out); m != nil {
		r.Sent, _ = strconv.Atoi(m[1])
		r.Received, _ = strconv.Atoi(m[2])
	} else {
		r.Sent, r.Received = len(rtts), len(rtts)
	}
	if len(rtts) == 0 {
		return r, fmt.Errorf("ping: no reply (%d sent): %s", r.Sent, firstLines(out, 4))
	}
	s := summarize(rtts)
	r.MedianUs, r.MeanUs, r.MinUs, r.MaxUs = s.Median, mean(rtts), s.Min, s.Max
	return r, nil
}

// runPing sends count echo requests interval apart from namespace ns to dst
// (each waited for at most 1 s) and summarises the replies.
func runPing(ctx context.Context, ns string, dst netip.Addr, count int, interval time.Duration) (pingResult, error) {
	secs := fmt.Sprintf("%.3f", interval.Seconds())
	deadline := int((time.Duration(count)*interval + 2*time.Second).Seconds()) + 1
	out, runErr := nsOutput(ctx, ns, "ping", "-n", "-c", strconv.Itoa(count), "-i", secs, "-W", "1", "-w", strconv.Itoa(deadline), dst.String())
	r, err := parsePing(out)
	if err != nil {
		if runErr != nil {
			return r, fmt.Errorf("ping %s from netns %s: %w", dst, ns, runErr)
		}
		return r, fmt.Errorf("ping %s from netns %s: %w", dst, ns, err)
	}
	return r, nil // some loss is a result (Received < Sent), not an error
}

// waitReachable pings dst from namespace ns until a reply comes back or
// timeout passes (routes of a freshly started overlay take a moment).
func waitReachable(ctx context.Context, ns string, dst netip.Addr, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := nsOutput(ctx, ns, "ping", "-n", "-q", "-c", "3", "-i", "0.01", "-W", "1", "-w", "2", dst.String())
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not reachable from netns %s within %v: %w", dst, ns, timeout, err)
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
}
