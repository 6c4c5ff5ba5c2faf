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

	"github.com/tulle-net/tulle/tests/tools"
)

// Where the shipped files expect the binaries.
const (
	installedTulled  = "/usr/local/bin/tulled"
	installedDockerd = "/usr/bin/dockerd"
)

// stageUnits copies tulled.service, a stand-in docker.service (Docker's
// packages ship it; this machine has no Docker engine) and our drop-in into
// a temporary unit directory, pointing them at real executables: the built
// tulled, and a copy of true(1) as dockerd.
func stageUnits(t *testing.T, tulled string) string {
	t.Helper()
	dir := t.TempDir()
	dockerd := filepath.Join(dir, "dockerd")
	copyFile(t, "/bin/true", dockerd, 0o755)
	r := strings.NewReplacer(installedTulled, tulled, installedDockerd, dockerd)
	rewrite := func(src, dst string) {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, []byte(r.Replace(string(b))), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rewrite(deployFile(t, "systemd/tulled.service"), filepath.Join(dir, "tulled.service"))
	rewrite(deployFile(t, "docker/10-tulle.conf"), filepath.Join(dir, "docker.service.d", "10-tulle.conf"))
	docker := `[Unit]
Description=Docker Application Container Engine (stand-in of the packaged unit)
After=network-online.target containerd.service
Wants=network-online.target

[Service]
Type=notify
ExecStart=` + installedDockerd + ` -H fd:// --containerd=/run/containerd/containerd.sock
ExecReload=/bin/kill -s HUP $MAINPID
Restart=always

[Install]
WantedBy=multi-user.target
`
	if err := os.WriteFile(filepath.Join(dir, "docker.service"), []byte(r.Replace(docker)), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}

// TestUnitsPassSystemdAnalyzeVerify runs Debian's systemd-analyze verify on
// tulled.service and on docker.service with our drop-in. verify exits 0 even
// for unknown keys or bad values (it only warns), so any output fails.
func TestUnitsPassSystemdAnalyzeVerify(t *testing.T) {
	sa := requireTool(t, "systemd-analyze")
	dir := stageUnits(t, buildTulled(t))
	cmd := tools.Command(context.Background(), sa, "verify", "--man=no",
		filepath.Join(dir, "tulled.service"), filepath.Join(dir, "docker.service"))
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) != 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	// The check is live: a misspelt key is reported.
	bad := filepath.Join(dir, "bad.service")
	b, _ := os.ReadFile(filepath.Join(dir, "tulled.service"))
	if err := os.WriteFile(bad, []byte(strings.Replace(string(b), "WatchdogSec=", "WatchdogSecs=", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _ = tools.Command(context.Background(), sa, "verify", "--man=no", bad).CombinedOutput()
	if !strings.Contains(string(out), "Unknown key") {
		t.Errorf("systemd-analyze verify did not report a misspelt key:\n%s", out)
	}
}

// TestUnitExposureStaysLow asks systemd's own sandbox review
// (systemd-analyze security) about tulled.service. Its score is 0 (locked
// down) to 10 (exposed); tulled.service scores 2.3 ("OK": what remains is
// root UID, CAP_NET_ADMIN and the host network, which an overlay needs). A
// change that weakens the sandbox above 3.0 fails here.
func TestUnitExposureStaysLow(t *testing.T) {
	sa := requireTool(t, "systemd-analyze")
	dir := stageUnits(t, buildTulled(t))
	out, err := tools.Command(context.Background(), sa, "security", "--offline=true", "--threshold=30", "--no-pager",
		filepath.Join(dir, "tulled.service")).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security: %v (exposure above 3.0?)\n%s", err, out)
	}
	if !strings.Contains(string(out), "Overall exposure level for tulled.service") {
		t.Errorf("systemd-analyze security printed no exposure level:\n%s", out)
	}
}

// TestUnitIsANotifyServiceWithWatchdogAndLeastPrivilege pins the settings
// the issue asks for, so an edit that drops one fails here.
func TestUnitIsANotifyServiceWithWatchdogAndLeastPrivilege(t *testing.T) {
	u := parseUnit(t, deployFile(t, "systemd/tulled.service"))
	want := map[string]string{
		"Service.Type":                     "notify",
		"Service.NotifyAccess":             "main",
		"Service.Restart":                  "always",
		"Service.RestartPreventExitStatus": "2",
		"Service.EnvironmentFile":          "/etc/tulle/tulled.env",
		"Service.ExecStart":                installedTulled,
		"Service.User":                     "root",
		"Service.CapabilityBoundingSet":    "CAP_NET_ADMIN",
		"Service.AmbientCapabilities":      "CAP_NET_ADMIN",
		"Service.NoNewPrivileges":          "yes",
		"Service.ProtectSystem":            "strict",
		"Service.ProtectHome":              "yes",
		"Service.PrivateTmp":               "yes",
		"Service.DevicePolicy":             "closed",
		"Service.DeviceAllow":              "/dev/net/tun rw",
		"Service.RestrictAddressFamilies":  "AF_INET AF_INET6 AF_NETLINK AF_UNIX",
		"Service.SystemCallArchitectures":  "native",
		"Service.RuntimeDirectory":         "flannel",
		"Service.RuntimeDirectoryPreserve": "yes",
		"Install.WantedBy":                 "multi-user.target",
	}
	for k, v := range want {
		section, key, _ := strings.Cut(k, ".")
		if got := u.Value(section, key); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	for _, dep := range []struct{ key, unit string }{
		{"Wants", "network-online.target"}, {"After", "network-online.target"}, {"Before", "docker.service"},
	} {
		if !slices.Contains(u.Words("Unit", dep.key), dep.unit) {
			t.Errorf("Unit.%s does not name %s", dep.key, dep.unit)
		}
	}
	wd, err := time.ParseDuration(u.Value("Service", "WatchdogSec"))
	if err != nil || wd < 10*time.Second || wd > time.Minute {
		t.Errorf("WatchdogSec = %q: want 10s..1m", u.Value("Service", "WatchdogSec"))
	}
	// systemd must not kill tulled while it still waits for etcd on its
	// own (TULLED_ETCD_START_TIMEOUT, documented in tulled.env).
	start, err := time.ParseDuration(strings.ReplaceAll(u.Value("Service", "TimeoutStartSec"), "min", "m"))
	etcdWait := envFileDefault(t, "TULLED_ETCD_START_TIMEOUT")
	wait, err2 := time.ParseDuration(etcdWait)
	if err != nil || err2 != nil || start <= wait {
		t.Errorf("TimeoutStartSec = %q must exceed TULLED_ETCD_START_TIMEOUT = %q", u.Value("Service", "TimeoutStartSec"), etcdWait)
	}
	// RuntimeDirectory=flannel is the (only writable) home of subnet.env.
	if got := envFileDefault(t, "TULLED_SUBNET_FILE"); filepath.Dir(got) != "/run/"+u.Value("Service", "RuntimeDirectory") {
		t.Errorf("TULLED_SUBNET_FILE default %s is not in /run/%s", got, u.Value("Service", "RuntimeDirectory"))
	}
}

var envLine = regexp.MustCompile(`^#?(TULLED_[A-Z0-9_]+)=(.*)$`)

// envFile returns the TULLED_ variables the example env file documents
// (commented out or not) with their values.
func envFile(t *testing.T) map[string]string {
	t.Helper()
	f, err := os.Open(deployFile(t, "systemd/tulled.env"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	vars := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if m := envLine.FindStringSubmatch(line); m != nil {
			if _, dup := vars[m[1]]; dup {
				t.Errorf("tulled.env documents %s twice", m[1])
			}
			vars[m[1]] = m[2]
			continue
		}
		if line != "" && !strings.HasPrefix(line, "#") {
			t.Errorf("tulled.env: %q is set; the example must leave every variable commented out", line)
		}
	}
	return vars
}

func envFileDefault(t *testing.T, name string) string {
	t.Helper()
	v, ok := envFile(t)[name]
	if !ok {
		t.Fatalf("tulled.env does not document %s", name)
	}
	return v
}

var helpFlag = regexp.MustCompile(`(?m)^\s+(?:-[a-z], )?--([a-z][a-z0-9-]+)`)

// tulledFlags returns the flags the built tulled shows in its --help
// (without --help and --version).
func tulledFlags(t *testing.T) []string {
	t.Helper()
	out, err := tools.Command(context.Background(), buildTulled(t), "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("tulled --help: %v\n%s", err, out)
	}
	var flags []string
	for _, m := range helpFlag.FindAllStringSubmatch(string(out), -1) {
		if m[1] != "help" && m[1] != "version" && !slices.Contains(flags, m[1]) {
			flags = append(flags, m[1])
		}
	}
	if len(flags) < 15 {
		t.Fatalf("found only %d flags in tulled --help; has its format changed?\n%s", len(flags), out)
	}
	return flags
}

// TestEnvFileDocumentsEveryTulledFlag compares the example env file with the
// flags the built tulled accepts (its --help).
func TestEnvFileDocumentsEveryTulledFlag(t *testing.T) {
	flags := tulledFlags(t)
	vars := envFile(t)
	for _, f := range flags {
		name := "TULLED_" + strings.ToUpper(strings.ReplaceAll(f, "-", "_"))
		if _, ok := vars[name]; !ok {
			t.Errorf("tulled.env does not document %s (flag --%s)", name, f)
		}
		delete(vars, name)
	}
	for name := range vars {
		t.Errorf("tulled.env documents %s, but tulled has no such flag", name)
	}
}

// TestReadmeFlagTableListsEveryTulledFlag compares README.md's flags table
// (the first column of the table under "### Flags") with tulled --help.
func TestReadmeFlagTableListsEveryTulledFlag(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "\n### Flags\n")
	if !ok {
		t.Fatal("README.md has no \"### Flags\" section")
	}
	section, _, _ = strings.Cut(section, "\n#")
	documented := map[string]bool{}
	for _, line := range strings.Split(section, "\n") {
		if !strings.HasPrefix(line, "| `--") {
			continue
		}
		first, _, _ := strings.Cut(strings.TrimPrefix(line, "|"), "|")
		for _, m := range regexp.MustCompile("`--([a-z0-9-]+)`").FindAllStringSubmatch(first, -1) {
			documented[m[1]] = true
		}
	}
	for _, f := range tulledFlags(t) {
		if !documented[f] {
			t.Errorf("README.md's flags table lacks --%s (tulled --help shows it)", f)
		}
		delete(documented, f)
	}
	for f := range documented {
		t.Errorf("README.md's flags table has --%s, which tulled --help does not show", f)
	}
}
