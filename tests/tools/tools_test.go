package tools_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/tools"
)

func TestTheListParses(t *testing.T) {
	progs := tools.Programs()
	if len(progs) < 10 {
		t.Fatalf("only %d programs on the list", len(progs))
	}
	for _, name := range []string{"ip", "iperf3", "ethtool", "iptables", "ping", "promtool", "go", "cnitool", "/usr/lib/cni/bridge"} {
		if _, ok := tools.Lookup(name); !ok {
			t.Errorf("%s is not on the list", name)
		}
	}
}

func TestParseRefusesWhatDepsCannotInstall(t *testing.T) {
	for _, bad := range []string{
		"ip",                           // no source
		"ip apt iproute2",              // unknown source
		"ip deb",                       // no package
		"promtool deb-file prometheus", // no file in the package
		"lib/x deb foo",                // a relative path
		"ip deb iproute2\nip deb iproute2",
		"library github.com/x/y curl", // runs a program not listed
		"ip deb iproute2\nvia ip curl",
		"ip deb iproute2\nvia curl ip",
	} {
		if _, err := tools.Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted it", bad)
		}
	}
}

func TestCheckRefusesProgramsNotOnTheList(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ok := [][]string{
		{"ip", "link", "show"},
		{"ip", "netns", "exec", "ns1", "ping", "-c", "1", "192.0.2.1"},
		{"ip", "-all", "netns", "exec", "ip", "link"},
		{"ip", "netns", "exec", "ns1", "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"},
		{"nsenter", "--net=/proc/1/fd/3", "ethtool", "-K", "eth0", "tx", "off"},
		{"nsenter", "-t", "1", "-n", "--", "ip", "addr"},
		{"setpriv", "--bounding-set", "-all", "--inh-caps=-all", "--", "/tmp/x/bin/tulled", "--help"},
		{"/tmp/build/bin/tulled", "--version"},
		{"/usr/lib/cni/bridge"},
		{"ip", "netns", "exec", "ns1", self, "-test.run=X"},
		{"/usr/bin/env", "-u", "X", "A=b", "/tmp/x/bin/tulled", "docker-opts"},
	}
	for _, c := range ok {
		if err := tools.Check(c[0], c[1:]...); err != nil {
			t.Errorf("Check(%q): %v", c, err)
		}
	}
	refused := [][]string{
		{"curl", "http://192.0.2.1/"},
		{"ip", "netns", "exec", "ns1", "tcpdump", "-i", "eth0"},
		{"ip", "-n", "ns1", "netns", "exec", "ns2", "curl"},
		{"nsenter", "-t", "1", "-n", "curl"},
		{"setpriv", "--reuid", "0", "curl"},
		{"unshare", "--mount", "--propagation", "private", "curl"},
		{"sh", "-c", "exec curl -s http://192.0.2.1/"},
		{"ip", "netns", "exec", "ns1", "nsenter", "--net=/x", "curl"},
		{"/usr/local/bin/curl"},
		{"env", "-u", "X", "A=b", "curl"},
	}
	for _, c := range refused {
		err := tools.Check(c[0], c[1:]...)
		if !errors.Is(err, tools.ErrNotListed) {
			t.Errorf("Check(%q) = %v, want an error wrapping ErrNotListed", c, err)
		}
	}
}

func TestCommandThatIsRefusedDoesNotStart(t *testing.T) {
	cmd := tools.Command(context.Background(), "ip", "netns", "exec", "nonexistent-ns", "curl", "http://192.0.2.1/")
	out, err := cmd.CombinedOutput()
	if !errors.Is(err, tools.ErrNotListed) || cmd.Process != nil {
		t.Fatalf("a refused command ran or failed otherwise: %v\n%s", err, out)
	}
	if !strings.Contains(err.Error(), "curl") || !strings.Contains(err.Error(), tools.ListFile) {
		t.Errorf("the error does not say what and where: %v", err)
	}
}

func TestCommandRunsAListedProgram(t *testing.T) {
	out, err := tools.Command(context.Background(), "sh", "-c", "echo listed").Output()
	if err != nil || strings.TrimSpace(string(out)) != "listed" {
		t.Fatalf("sh -c: %q, %v", out, err)
	}
}

func TestAllowScriptChecksWhatTheScriptRuns(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad")
	if err := tools.AllowScript(bad, "sh", "curl"); !errors.Is(err, tools.ErrNotListed) {
		t.Errorf("AllowScript with curl: %v", err)
	}
	if err := tools.Check(bad); !errors.Is(err, tools.ErrNotListed) {
		t.Errorf("a refused script is allowed: %v", err)
	}
	good := filepath.Join(dir, "good")
	if err := os.WriteFile(good, []byte("#!/bin/sh\necho ok\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := tools.AllowScript(good, "sh"); err != nil {
		t.Fatal(err)
	}
	out, err := tools.Command(context.Background(), good).Output()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Errorf("allowed script: %q, %v", out, err)
	}
}

// TestDepsReadsTheSameList runs scripts/deps.sh --print: deps.sh must see
// the same programs, sources and packages as the Go code.
func TestDepsReadsTheSameList(t *testing.T) {
	root := repoRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := tools.Command(ctx, "bash", filepath.Join(root, "scripts", "deps.sh"), "--print")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("deps.sh --print: %v", err)
	}
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		got = append(got, strings.Join(strings.Fields(l), " "))
	}
	var want []string
	for _, p := range tools.Programs() {
		want = append(want, strings.Join(append([]string{p.Name, p.Source}, p.From...), " "))
	}
	if !slices.Equal(got, want) {
		t.Errorf("deps.sh --print:\n%s\nthe Go code reads:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestListedProgramsAreInstalled: after scripts/deps.sh (make test runs it
// first), every program that is not built by the tests is there. With
// TULLE_REQUIRE_ROOT_TESTS=1 a missing one fails.
func TestListedProgramsAreInstalled(t *testing.T) {
	var missing []string
	for _, p := range tools.Programs() {
		if p.Source == tools.SourceBuild {
			continue
		}
		if _, err := tools.LookPath(p.Name); err != nil {
			missing = append(missing, err.Error())
		}
	}
	if len(missing) > 0 {
		nstest.SkipMissing(t, "run scripts/deps.sh; missing:\n"+strings.Join(missing, "\n"))
	}
}

// TestReadmeNamesWhatDepsInstalls: README's "The two commands" tells a new
// user what make demo and make test install; it must name every package
// on the list.
func TestReadmeNamesWhatDepsInstalls(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "\n## The two commands\n")
	if !ok {
		t.Fatal(`README.md has no "## The two commands" section`)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	for _, p := range tools.Programs() {
		var wants []string
		switch p.Source {
		case tools.SourceDeb:
			for _, pkg := range p.From {
				wants = append(wants, "`"+pkg+"`")
			}
		case tools.SourceDebFile:
			wants = []string{"`" + p.Name + "`"}
		}
		for _, want := range wants {
			if !strings.Contains(section, want) {
				t.Errorf("README.md's \"The two commands\" does not name %s (for %s), which scripts/deps.sh installs", want, p.Name)
			}
		}
	}
}
