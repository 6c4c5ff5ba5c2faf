package testbed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/tulle-net/tulle/tests/tools"
)

// proc is a long-running process the bed started inside a namespace
// (`ip netns exec ns bin args...`; ip execs bin, so the PID is bin's).
type proc struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
	state   *os.ProcessState
	waitErr error
}

// startProc starts bin in namespace ns with stdout and stderr appended to
// logPath. The process has its own process group (a Ctrl-C on the terminal
// reaches only the test program, which then stops it in order) and is
// killed if the test program dies.
func (b *Bed) startProc(name, ns, logPath, bin string, args ...string) (*proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	defer logf.Close() // the child has its own copy
	fmt.Fprintf(logf, "=== %s: %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := tools.Command(context.Background(), "ip", append([]string{"netns", "exec", ns, bin}, args...)...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// Start under the lock, so that Close either sees the process or
	// refuses to start it.
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, fmt.Errorf("testbed %s: start %s: the bed is closed", b.Prefix, name)
	}
	if err := cmd.Start(); err != nil {
		b.mu.Unlock()
		return nil, fmt.Errorf("start %s in netns %s: %w", name, ns, err)
	}
	p := &proc{name: name, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	b.procs[p] = struct{}{}
	b.wg.Add(1)
	b.mu.Unlock()
	go func() {
		defer b.wg.Done()
		p.waitErr = cmd.Wait()
		p.state = cmd.ProcessState
		close(p.done)
		b.mu.Lock()
		delete(b.procs, p)
		b.mu.Unlock()
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitDescription says how the process ended ("exit status 1",
// "signal: killed"); "running" while it runs.
func (p *proc) exitDescription() string {
	if !p.exited() {
		return "running"
	}
	if p.state != nil {
		return p.state.String()
	}
	return fmt.Sprint(p.waitErr)
}

// signal sends sig to the process (not its group: it is the only member).
func (p *proc) signal(sig syscall.Signal) error {
	if p.exited() {
		return nil
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("%s (pid %d): send %v: %w", p.name, p.pid(), sig, err)
	}
	return nil
}

// stop sends SIGTERM and waits up to timeout for the exit; then it sends
// SIGKILL and reports that the process did not stop in time. A process that
// exited non-zero is an error naming the status.
func (p *proc) stop(timeout time.Duration) error {
	if err := p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-p.done:
	case <-time.After(timeout):
		_ = p.signal(syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("%s (pid %d) did not exit within %v of SIGTERM; killed", p.name, p.pid(), timeout)
	}
	if p.state == nil || !p.state.Success() {
		return fmt.Errorf("%s (pid %d) stopped with %s, want exit status 0", p.name, p.pid(), p.exitDescription())
	}
	return nil
}

// terminate stops the process without reporting: SIGTERM, then SIGKILL.
func (p *proc) terminate(timeout time.Duration) {
	_ = p.signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(timeout):
		_ = p.signal(syscall.SIGKILL)
		<-p.done
	}
}

// kill sends SIGKILL and waits for the exit.
func (p *proc) kill() error {
	if err := p.signal(syscall.SIGKILL); err != nil {
		return err
	}
	<-p.done
	return nil
}

// LogTail returns the last n lines of the file at path ("" if it can not be
// read).
func LogTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	data = bytes.TrimRight(data, "\n")
	lines := bytes.Split(data, []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
