package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
	"github.com/tulle-net/tulle/tests/tools"
)

// modeTulleBaseline is tulle-offload run by another tulled (-baseline):
// the tulled of an earlier revision, measured in the same run as this
// one, alternating with it, for a before and after that the machine's
// drift does not blur.
const modeTulleBaseline = "tulle-offload-baseline"

// prepareBaseline makes the baseline tulled available as a program named
// tulled (as the testbed runs it) in the results folder: a copy of the
// binary -baseline names, or, if it names none, one built from that git
// revision of this repository in a temporary worktree. It records the
// binary's version in the configuration.
func (b *bench) prepareBaseline(ctx context.Context) error {
	dir, err := filepath.Abs(filepath.Join(b.cfg.Out, "baseline"))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	bin := filepath.Join(dir, "tulled")
	if st, err := os.Stat(b.cfg.Baseline); err == nil && !st.IsDir() {
		if err := copyFile(b.cfg.Baseline, bin); err != nil {
			return fmt.Errorf("baseline %s: %w", b.cfg.Baseline, err)
		}
	} else if err := buildRevision(ctx, b.cfg.Baseline, bin); err != nil {
		return err
	}
	b.cfg.BaselineBin = bin
	b.report.Config.BaselineBin = bin
	b.report.Env.Baseline = tulledVersion(ctx, bin)
	return nil
}

// buildRevision builds ./cmd/tulled of git revision rev into out.
func buildRevision(ctx context.Context, rev, out string) error {
	root, err := testbed.RepoRoot()
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "tulle-baseline-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	src := filepath.Join(tmp, "src")
	run := func(dir, name string, args ...string) error {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		cmd := tools.Command(ctx, name, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("baseline %s: %s %s: %w: %s", rev, name, strings.Join(args, " "), err, firstLines(string(out), 5))
		}
		return nil
	}
	if err := run(root, "git", "worktree", "add", "--detach", src, rev); err != nil {
		return err
	}
	defer run(root, "git", "worktree", "remove", "--force", src)
	return run(src, "go", "build", "-o", out, "./cmd/tulled")
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// useTulled makes the testbed start bin as tulled until restore is called
// (testbed.BuildTulled reads its variable at every start).
func useTulled(bin string) (restore func()) {
	old, had := os.LookupEnv(testbed.EnvTulledBin)
	os.Setenv(testbed.EnvTulledBin, bin)
	return func() {
		if had {
			os.Setenv(testbed.EnvTulledBin, old)
		} else {
			os.Unsetenv(testbed.EnvTulledBin)
		}
	}
}
