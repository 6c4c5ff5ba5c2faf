package daemon

import (
	"bytes"
	"context"
	"io"
	"net/http"
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

// TestBinaryProfilerOnlyOnLoopbackWithoutThePassword runs the real tulled
// with --debug-pprof and the password on its command line: the profiler
// answers on its own loopback listener only, and its cmdline page does not
// show the password.
func TestBinaryProfilerOnlyOnLoopbackWithoutThePassword(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	bin := buildTulled(t)
	const secret = "s3cret-pw"
	cmd := tools.Command(context.Background(), bin, "--etcd-endpoints=http://127.0.0.1:2379", "--etcd-username=tulle", "--etcd-password="+secret,
		"--subnet-file="+filepath.Join(t.TempDir(), "subnet.env"), "--metrics-addr="+publicIP+":9285", "--debug-pprof", "--debug-pprof-addr=127.0.0.1:6060")
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	})
	get := func(url string) (int, string) {
		c := http.Client{Timeout: 5 * time.Second}
		resp, err := c.Get(url)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if code, _ := get("http://127.0.0.1:6060/debug/pprof/"); code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no profiler on 127.0.0.1:6060; log:\n%s", stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	code, body := get("http://127.0.0.1:6060/debug/pprof/cmdline")
	if code != http.StatusOK || strings.Contains(body, secret) || !strings.Contains(body, "--etcd-password=REDACTED") || !strings.Contains(body, "--etcd-username=tulle") {
		t.Errorf("/debug/pprof/cmdline: %d %q", code, body)
	}
	if code, _ := get("http://" + publicIP + ":9285/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("the profiler answers on the metrics listener %s:9285: %d", publicIP, code)
	}
	if code, _ := get("http://" + publicIP + ":9285/healthz"); code != http.StatusOK {
		t.Errorf("/healthz on the metrics listener: %d", code)
	}
	if strings.Contains(stderr.String(), secret) {
		t.Errorf("the log shows the password:\n%s", stderr.String())
	}

	// A profiler address the network reaches is refused.
	out, err := tools.Command(context.Background(), bin, "--debug-pprof", "--debug-pprof-addr="+publicIP+":6060").CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != ExitUsage || !strings.Contains(string(out), "must be a loopback address") {
		t.Errorf("--debug-pprof-addr=%s:6060: %v\n%s", publicIP, err, out)
	}
}
