// Package integrations tests what deploy/ ships (the systemd unit, the
// Docker drop-in, the CNI plugin and its network configs, the Prometheus
// rules and the Grafana dashboard) with the real tools: systemd-analyze,
// setpriv, cnitool with the containernetworking plugins, promtool, and the
// real tulled in testbed namespaces.
package integrations

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/testbed"
	"github.com/tulle-net/tulle/tests/tools"
)

// repoRoot is the Tulle source tree (deploy/ files are read from there).
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func deployFile(t testing.TB, rel string) string {
	t.Helper()
	return filepath.Join(repoRoot(t), "deploy", rel)
}

// requireTool returns the path of an external program the test needs (it
// must be on tests/tools' list). A missing one skips the test with where
// it comes from, unless TULLE_REQUIRE_ROOT_TESTS=1 (CI), where it fails:
// CI must run every test.
func requireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := tools.LookPath(name)
	if err != nil {
		nstest.SkipMissing(t, err.Error())
	}
	return p
}

// buildTulled builds cmd/tulled once per test process.
func buildTulled(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := testbed.BuildTulled(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// buildTool builds a main package of the module (ours or a dependency's,
// e.g. the CNI library's cnitool) once per test process.
func buildTool(t testing.TB, pkg string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := testbed.BuildTool(ctx, pkg)
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := tools.Command(context.Background(), name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// unitEntry is one "Key=Value" line of a systemd unit file.
type unitEntry struct{ Section, Key, Value string }

// unitFile is a systemd unit or drop-in, in order, repeated keys kept.
type unitFile []unitEntry

// parseUnit reads a unit file the way systemd does for what the tests need:
// [Section] headers, Key=Value lines, '#' and ';' comments, trailing '\'
// continuations.
func parseUnit(t testing.TB, path string) unitFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var u unitFile
	section := ""
	sc := bufio.NewScanner(f)
	pending := ""
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if pending != "" {
			line = pending + " " + line
			pending = ""
		}
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";") {
			continue
		}
		if strings.HasSuffix(line, `\`) {
			pending = strings.TrimSuffix(line, `\`)
			continue
		}
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			section = line[1 : len(line)-1]
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || section == "" {
			t.Fatalf("%s:%d: not a Key=Value line in a section: %q", path, n, line)
		}
		u = append(u, unitEntry{section, strings.TrimSpace(k), strings.TrimSpace(v)})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// Values returns every value of section.key, in order.
func (u unitFile) Values(section, key string) []string {
	var out []string
	for _, e := range u {
		if e.Section == section && e.Key == key {
			out = append(out, e.Value)
		}
	}
	return out
}

// Value returns the last value of section.key ("" if unset).
func (u unitFile) Value(section, key string) string {
	v := u.Values(section, key)
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// Words returns the space-separated words of every section.key line.
func (u unitFile) Words(section, key string) []string {
	var out []string
	for _, v := range u.Values(section, key) {
		out = append(out, strings.Fields(v)...)
	}
	return out
}

// knownMetrics are the metric names tulled exports (the brief's contract).
// Histograms also have _bucket, _sum and _count series.
var knownMetrics = []string{
	"tulle_peer_transmit_packets_total", "tulle_peer_transmit_bytes_total",
	"tulle_peer_receive_packets_total", "tulle_peer_receive_bytes_total",
	"tulle_dropped_packets_total",
	"tulle_peers",
	"tulle_lease_expiry_timestamp_seconds", "tulle_lease_renewal_failures_total",
	"tulle_etcd_connected", "tulle_etcd_watch_revision", "tulle_malformed_leases_total",
	"tulle_ready", "tulle_build_info",
}

var knownHistograms = []string{
	"tulle_tun_read_batch_size", "tulle_tun_write_batch_size",
	"tulle_udp_receive_batch_size", "tulle_udp_send_batch_size",
}

// knownMetric says whether name is one tulled exports: Tulle's own, the Go
// and process collectors' (go_*, process_*), or Prometheus' own "up".
func knownMetric(name string) bool {
	if slices.Contains(knownMetrics, name) || name == "up" ||
		strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") {
		return true
	}
	for _, h := range knownHistograms {
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if name == h+suffix {
				return true
			}
		}
	}
	return false
}

var (
	promqlStrings  = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'`)
	promqlMatchers = regexp.MustCompile(`\{[^}]*\}`)
	promqlRanges   = regexp.MustCompile(`\[[^\]]*\]`)
	promqlNumbers  = regexp.MustCompile(`\b[0-9][0-9a-zA-Z.]*`) // 0.9, 5m, 1e3
	promqlLabels   = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promqlIdent    = regexp.MustCompile(`\$?[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?`)
	promqlKeywords = []string{"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
		"group_left", "group_right", "inf", "nan", "Inf", "NaN"}
)

// metricNames returns the metric names a PromQL expression selects: the
// identifiers that are not functions, keywords, label names in grouping
// clauses or matchers, strings, durations or $variables.
func metricNames(expr string) []string {
	s := promqlStrings.ReplaceAllString(expr, `""`)
	s = promqlMatchers.ReplaceAllString(s, " ")
	s = promqlRanges.ReplaceAllString(s, " ")
	s = promqlLabels.ReplaceAllString(s, " ")
	s = promqlNumbers.ReplaceAllString(s, " ")
	var out []string
	for _, m := range promqlIdent.FindAllStringSubmatch(s, -1) {
		tok := m[0]
		if m[1] != "" || strings.HasPrefix(tok, "$") || slices.Contains(promqlKeywords, tok) {
			continue // a function call, a dashboard variable or a keyword
		}
		if !slices.Contains(out, tok) {
			out = append(out, tok)
		}
	}
	return out
}

func TestMetricNamesFindsSelectorsOnly(t *testing.T) {
	got := metricNames(`histogram_quantile(0.9, sum by (le) (rate(tulle_udp_send_batch_size_bucket{job=~"$job",x="a b"}[$__rate_interval])))
		and on (instance) tulle_peers > bool 0 or up{job="tulle"} offset 5m unless vector(1)`)
	want := []string{"tulle_udp_send_batch_size_bucket", "tulle_peers", "up"}
	if !slices.Equal(got, want) {
		t.Errorf("metricNames = %q, want %q", got, want)
	}
}
