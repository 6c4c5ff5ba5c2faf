package testbed

import (
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/tools"
)

// EnvRequireRoot, set to 1 (as CI does), turns RequireRoot's skip into a
// failure, so a run can never pass with the namespace tests skipped.
const EnvRequireRoot = nstest.EnvRequireRoot

// RequireRoot skips t with a clear message unless the process can build a
// testbed (root, /dev/net/tun: nstest.RequireRoot; and the ip program); with
// TULLE_REQUIRE_ROOT_TESTS=1 it fails t instead.
func RequireRoot(t testing.TB) {
	t.Helper()
	nstest.RequireRoot(t)
	if _, err := tools.LookPath("ip"); err != nil {
		nstest.SkipMissing(t, "needs the ip program: "+err.Error())
	}
}

// NewT builds a bed for a test: it calls RequireRoot, fails the test if the
// bed can not be built, logs progress with t.Logf and registers Close with
// t.Cleanup. When the test has failed, Close first logs the tail of every
// tulled log and of the etcd log.
func NewT(t testing.TB, opts Options) *Bed {
	t.Helper()
	RequireRoot(t)
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	b, err := New(ctx, opts)
	if err != nil {
		t.Fatalf("testbed: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			t.Logf("testbed %s: metrics after the failure:\n%s", b.Prefix, b.MetricsSummary(ctx))
			cancel()
			t.Logf("testbed %s: logs after the failure:\n%s", b.Prefix, b.LogsString(60))
		}
		if err := b.Close(); err != nil {
			t.Errorf("testbed: close: %v", err)
		}
	})
	return b
}

// DumpLogs writes the last lines of every host's tulled log and of the etcd
// log to w.
func (b *Bed) DumpLogs(w io.Writer, lines int) {
	b.mu.Lock()
	hosts := append([]*Host(nil), b.Hosts...)
	b.mu.Unlock()
	for _, h := range hosts {
		if tail := LogTail(h.LogFile, lines); tail != "" {
			fmt.Fprintf(w, "--- tulled on %s (%s), last %d lines of %s\n%s\n", h.Name, h.Addr, lines, h.LogFile, tail)
		}
	}
	if b.Etcd != nil {
		if tail := LogTail(b.EtcdLogFile(), lines); tail != "" {
			fmt.Fprintf(w, "--- etcd, last %d lines\n%s\n", lines, tail)
		}
	}
}

// LogsString is DumpLogs into a string.
func (b *Bed) LogsString(lines int) string {
	var sb strings.Builder
	b.DumpLogs(&sb, lines)
	return sb.String()
}
