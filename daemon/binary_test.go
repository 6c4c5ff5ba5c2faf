package daemon

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/tools"
)

// The binary must stay lean: the etcd server (and its raft, bbolt, ...)
// belongs in tests, never in tulled.
func TestTulledDoesNotLinkTheEtcdServer(t *testing.T) {
	out, err := tools.Command(context.Background(), goTool(), "list", "-deps", "github.com/tulle-net/tulle/cmd/tulled").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		for _, banned := range []string{"go.etcd.io/etcd/server/", "go.etcd.io/raft/", "go.etcd.io/bbolt"} {
			if strings.HasPrefix(pkg, banned) {
				t.Errorf("tulled links %s", pkg)
			}
		}
	}
}

// goTool finds the go command: on PATH, else where the brief installs it.
func goTool() string {
	if p, err := tools.LookPath("go"); err == nil {
		return p
	}
	return "/usr/local/go/bin/go"
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// buildTulled builds cmd/tulled once per test binary, with a version and a
// revision set the way a release sets them.
func buildTulled(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tulled-bin-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "tulled")
		ld := "-X github.com/tulle-net/tulle/daemon/buildinfo.version=v9.9.9-test -X github.com/tulle-net/tulle/daemon/buildinfo.revision=0123abcd"
		out, err := tools.Command(context.Background(), goTool(), "build", "-ldflags", ld, "-o", builtBin, "github.com/tulle-net/tulle/cmd/tulled").CombinedOutput()
		if err != nil {
			buildErr = err
			builtBin = string(out)
		}
	})
	if buildErr != nil {
		t.Fatalf("go build ./cmd/tulled: %v\n%s", buildErr, builtBin)
	}
	return builtBin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if builtBin != "" && buildErr == nil {
		os.RemoveAll(filepath.Dir(builtBin))
	}
	os.Exit(code)
}

func TestBinaryVersionComesFromLdflags(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildTulled(t)
	out, err := tools.Command(context.Background(), bin, "--version").Output()
	if err != nil || !strings.HasPrefix(string(out), "tulled v9.9.9-test (revision 0123abcd, go") {
		t.Errorf("--version: %v %q", err, out)
	}
	err = tools.Command(context.Background(), bin, "--tun-driver=fast").Run()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != ExitUsage {
		t.Errorf("usage error: %v, want exit status 2", err)
	}
}

func TestBinaryStopsWithExit0OnSIGTERMWhileWaitingForEtcd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	ns := nstest.NewNetns(t)
	ns.AddUnderlay(t, publicIP+"/24", 1500, "192.0.2.254")
	bin := buildTulled(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		cmd := ns.Command(bin, "--etcd-endpoints=http://127.0.0.1:2379", "--subnet-file="+filepath.Join(t.TempDir(), "subnet.env"),
			"--metrics-addr=127.0.0.1:9285", "--log-format=json")
		var stderr syncBuffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(stderr.String(), "connection refused") && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		// ip netns exec runs tulled in its own process (exec), so cmd's PID is tulled's.
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%v: exit %v, want 0\n%s", sig, err, stderr.String())
			}
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Fatalf("%v: tulled did not stop within 15s\n%s", sig, stderr.String())
		}
		logs := stderr.String()
		for _, want := range []string{`"msg":"signal received; stopping`, `"msg":"tulled stopped","exit_status":0`} {
			if !strings.Contains(logs, want) {
				t.Errorf("%v: log lacks %s:\n%s", sig, want, logs)
			}
		}
		if bytes.Contains([]byte(logs), []byte(`"level":"ERROR"`)) {
			t.Errorf("%v: errors logged on a clean stop:\n%s", sig, logs)
		}
	}
}
