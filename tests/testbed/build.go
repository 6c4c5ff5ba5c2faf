package testbed

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"go/build"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/tulle-net/tulle/tests/tools"
)

// Module is the Go module path of Tulle.
const Module = "github.com/tulle-net/tulle"

// Environment variables that point the testbed at prebuilt binaries instead
// of building them (e.g. CI's `make build` output).
const (
	EnvTulledBin = "TULLE_TULLED_BIN"
	EnvEtcdBin   = "TULLE_ETCDSERVER_BIN"
)

var (
	procDirMu  sync.Mutex
	procDirVal string

	buildMu sync.Mutex
	built   = map[string]string{} // package -> binary path
)

// processDir returns the directory of this process's testbed files,
// <tmp>/tulle-testbed-<pid>, creating it. Beds live below it; built
// binaries live in its bin/. A later run removes it if this process dies
// without calling Cleanup.
func processDir() (string, error) {
	procDirMu.Lock()
	defer procDirMu.Unlock()
	if procDirVal != "" {
		return procDirVal, nil
	}
	d := filepath.Join(os.TempDir(), "tulle-testbed-"+strconv.Itoa(os.Getpid()))
	if err := os.MkdirAll(d, 0o755); err != nil {
		return "", fmt.Errorf("testbed: %w", err)
	}
	procDirVal = d
	return d, nil
}

// Cleanup removes this process's testbed directory (built binaries
// included). Call it once at the end of the program or of TestMain, after
// every bed is closed.
func Cleanup() error {
	buildMu.Lock() // lock order: buildMu, then procDirMu (as buildOnce)
	defer buildMu.Unlock()
	procDirMu.Lock()
	defer procDirMu.Unlock()
	built = map[string]string{}
	if procDirVal == "" {
		return nil
	}
	err := os.RemoveAll(procDirVal)
	procDirVal = ""
	return err
}

// RepoRoot returns the root of the Tulle source tree: the first directory
// from the working directory upwards whose go.mod declares Module, else the
// tree this file was compiled from.
func RepoRoot() (string, error) {
	if wd, err := os.Getwd(); err == nil {
		for d := wd; ; d = filepath.Dir(d) {
			if isTulleRoot(d) {
				return d, nil
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		d := filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
		if isTulleRoot(d) {
			return d, nil
		}
	}
	return "", fmt.Errorf("testbed: no Tulle source tree (go.mod of %s) above the working directory", Module)
}

func isTulleRoot(dir string) bool {
	f, err := os.Open(filepath.Join(dir, "go.mod"))
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) == 2 && fields[0] == "module" {
			return fields[1] == Module
		}
	}
	return false
}

func goCommand() string {
	if p, err := tools.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(build.Default.GOROOT, "bin", "go")
}

// BuildTulled builds ./cmd/tulled once per process and returns the binary's
// path. If TULLE_TULLED_BIN names a file, that binary is used instead.
func BuildTulled(ctx context.Context) (string, error) {
	return buildOnce(ctx, "./cmd/tulled", "tulled", EnvTulledBin)
}

// BuildEtcdServer builds ./tests/etcdserver once per process and returns the
// binary's path. If TULLE_ETCDSERVER_BIN names a file, that binary is used.
func BuildEtcdServer(ctx context.Context) (string, error) {
	return buildOnce(ctx, "./tests/etcdserver", "etcdserver", EnvEtcdBin)
}

// BuildTool builds the main package pkg (a path relative to the repository
// root, e.g. "./tests/bench/helper") once per process and returns the
// binary's path.
func BuildTool(ctx context.Context, pkg string) (string, error) {
	return buildOnce(ctx, pkg, filepath.Base(pkg), "")
}

func buildOnce(ctx context.Context, pkg, name, env string) (string, error) {
	if env != "" {
		if p := os.Getenv(env); p != "" {
			if st, err := os.Stat(p); err != nil || st.IsDir() {
				return "", fmt.Errorf("testbed: %s=%s: not a binary: %v", env, p, err)
			}
			return filepath.Abs(p)
		}
	}
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[pkg]; ok {
		return p, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	dir, err := processDir()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "bin", name)
	args := []string{"build", "-o", out}
	if rev := gitRevision(ctx, root); rev != "" {
		// As `make build` stamps it, so logs and bench results say which
		// tulled ran (this machine's GOFLAGS may turn -buildvcs off).
		args = append(args, "-ldflags=-X github.com/tulle-net/tulle/daemon/buildinfo.revision="+rev)
	}
	cmd := tools.Command(ctx, goCommand(), append(args, pkg)...)
	cmd.Dir = root
	if msg, err := cmd.CombinedOutput(); err != nil {
		if errors.Is(ctx.Err(), context.Canceled) {
			return "", fmt.Errorf("testbed: go build %s: %w", pkg, ctx.Err())
		}
		return "", fmt.Errorf("testbed: go build %s in %s: %w\n%s", pkg, root, err, strings.TrimSpace(string(msg)))
	}
	built[pkg] = out
	return out, nil
}

// gitRevision is the short commit of the checkout at root, with "-dirty"
// when tracked files differ from it, or "" when git cannot tell.
func gitRevision(ctx context.Context, root string) string {
	out, err := tools.Command(ctx, "git", "-C", root, "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return ""
	}
	rev := strings.TrimSpace(string(out))
	if tools.Command(ctx, "git", "-C", root, "diff", "--quiet", "HEAD").Run() != nil {
		rev += "-dirty"
	}
	return rev
}
