package etcdtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/tools"
)

// Executable returns the etcd executable on PATH: Debian's etcd-server
// (3.4, as the operators who found the token bugs ran it), which
// scripts/deps.sh installs from tests/tools/tools.list. Without it the test
// is skipped, which TULLE_REQUIRE_ROOT_TESTS=1 turns into a failure.
func Executable(t testing.TB) string {
	t.Helper()
	p, err := tools.LookPath("etcd")
	if err != nil {
		nstest.SkipMissing(t, "needs the etcd executable: "+err.Error())
	}
	out, err := tools.Command(context.Background(), "etcd", "--version").Output()
	if err != nil {
		t.Fatalf("%s --version: %v", p, err)
	}
	t.Logf("%s: %s", p, strings.SplitN(string(out), "\n", 2)[0])
	return p
}

// process is an etcd executable run for Options.Binary.
type process struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when it exited
	err  error         // how it exited, after done
	log  string        // its output (appended across restarts)
}

// launchProcess starts the etcd executable (s.mu held).
func (s *Server) launchProcess() error {
	tick, election := s.timing()
	token, ttl, err := s.tokenOptions()
	if err != nil {
		return err
	}
	args := []string{
		"--name", s.name,
		"--data-dir", s.dir,
		"--listen-client-urls", s.client.String(), "--advertise-client-urls", s.client.String(),
		"--listen-peer-urls", s.peer.String(), "--initial-advertise-peer-urls", s.peer.String(),
		"--initial-cluster", s.initialCluster,
		"--heartbeat-interval", strconv.FormatUint(uint64(tick), 10),
		"--election-timeout", strconv.FormatUint(uint64(election), 10),
		"--bcrypt-cost", "4",
		"--auth-token", token,
		"--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
	}
	if ttl > 0 {
		args = append(args, "--auth-token-ttl", strconv.FormatUint(uint64(ttl), 10))
	}
	if tls := s.opts.TLS; tls != nil {
		args = append(args, "--cert-file", tls.CertFile, "--key-file", tls.KeyFile, "--trusted-ca-file", tls.TrustedCAFile)
		if tls.ClientCertAuth {
			args = append(args, "--client-cert-auth")
		}
	}
	logPath := filepath.Join(filepath.Dir(s.dir), s.name+"-etcd.log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := tools.Command(context.Background(), s.opts.Binary, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", s.opts.Binary, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{}), log: logPath}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	s.proc = p
	s.t.Cleanup(func() {
		if s.t.Failed() {
			b, _ := os.ReadFile(logPath)
			s.t.Logf("etcdtest: %s %s log (last 3000 bytes):\n%s", s.opts.Binary, s.name, tail(b, 3000))
		}
	})
	return nil
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		b = b[len(b)-n:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return b
}

// waitProcess waits until the member answers a status request (s.mu held).
func (s *Server) waitProcess(timeout time.Duration) error {
	c, err := newClient(s.opts, []string{s.Endpoint()}, false)
	if err != nil {
		return err
	}
	defer c.Close()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Status(ctx, s.Endpoint())
		cancel()
		var ee rpctypes.EtcdError
		if err == nil || errors.As(err, &ee) && !strings.Contains(ee.Error(), "no leader") {
			return nil
		}
		select {
		case <-s.proc.done:
			return fmt.Errorf("%s exited at start: %v; log %s", s.opts.Binary, s.proc.err, s.proc.log)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %v; log %s", s.opts.Binary, timeout, err, s.proc.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stopProcess stops the executable as systemd would: SIGTERM, then
// SIGKILL after 15s (s.mu held).
func (s *Server) stopProcess() {
	p := s.proc
	s.proc = nil
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}
