package main

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/tests/tools"
)

// nsCommand returns a command that runs args inside network namespace ns
// (`ip netns exec ns args...`; ip execs args[0], so the PID is the
// program's). It runs in its own process group, so a Ctrl-C on the terminal
// reaches only the benchmark, which then stops it in order, and it is killed
// if the benchmark dies.
func nsCommand(ctx context.Context, ns string, args ...string) *exec.Cmd {
	cmd := tools.Command(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// nsOutput runs args in namespace ns and returns its standard output; the
// error names the namespace and the command and carries standard error.
func nsOutput(ctx context.Context, ns string, args ...string) (string, error) {
	cmd := nsCommand(ctx, ns, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("netns %s: %s: %w: %s", ns, strings.Join(args, " "), err, firstLines(stderr.String()+stdout.String(), 5))
	}
	return stdout.String(), nil
}

// ip runs the ip program (or bridge, with args[0] == "bridge") with args in
// the root namespace; "-n ns" among args selects a namespace.
func ip(ctx context.Context, args ...string) error {
	bin := "ip"
	if len(args) > 0 && args[0] == "bridge" {
		bin, args = "bridge", args[1:]
	}
	cmd := tools.Command(ctx, bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// firstLines returns at most n non-empty lines of s, joined by " | ".
func firstLines(s string, n int) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
			if len(out) == n {
				break
			}
		}
	}
	return strings.Join(out, " | ")
}

// sleepCtx waits d or until ctx is done.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
