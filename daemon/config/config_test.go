package config

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func mustParse(t *testing.T, args, env []string) *Config {
	t.Helper()
	c, action, err := Parse(args, env)
	if err != nil {
		t.Fatalf("Parse(%q, %q): %v", args, env, err)
	}
	if action != ActionRun {
		t.Fatalf("action %v", action)
	}
	return c
}

func TestDefaultsAreFlanneldsAndTulles(t *testing.T) {
	c := mustParse(t, nil, nil)
	if strings.Join(c.Etcd.Endpoints, ",") != "http://127.0.0.1:2379" || c.Etcd.Prefix != "/coreos.com/network" {
		t.Errorf("etcd %+v", c.Etcd)
	}
	if c.SubnetFile != "/run/flannel/subnet.env" || c.RenewMargin != time.Hour || c.LeaseTTL != 24*time.Hour || c.IPMasq {
		t.Errorf("network %+v", c)
	}
	if c.HealthzIP != "0.0.0.0" || c.HealthzPort != 0 || c.HealthzAddr() != "" || c.MetricsAddr != ":9285" {
		t.Errorf("health %+v", c)
	}
	if c.TunName != "tulle0" || c.TunDriver != "offload" || c.Workers != 0 || c.StartTimeout != 10*time.Minute || !c.PartialChecksums {
		t.Errorf("data plane %+v", c)
	}
	if c.LogLevel != slog.LevelInfo || c.LogFormat != "text" || len(c.Warnings) != 0 {
		t.Errorf("logs %+v", c)
	}
}

func TestFlagBeatsTulledEnvBeatsFlanneldEnv(t *testing.T) {
	env := []string{
		"FLANNELD_ETCD_PREFIX=/flannel", "TULLED_ETCD_PREFIX=/tulled",
		"FLANNELD_SUBNET_FILE=/flannel/subnet.env",
		"FLANNELD_IP_MASQ=true",
		"FLANNELD_WORKERS=3", "TULLED_WORKERS=2",
		"FLANNELD_IFACE=eth9", "TULLED_IFACE=eth1,192.0.2.7",
		"FLANNELD_SUBNET_LEASE_RENEW_MARGIN=30",
	}
	c := mustParse(t, []string{"--workers=1", "-etcd-endpoints=https://192.0.2.250:2379,https://192.0.2.251:2379"}, env)
	if c.Workers != 1 {
		t.Errorf("workers %d: the flag must win", c.Workers)
	}
	if c.Etcd.Prefix != "/tulled" {
		t.Errorf("prefix %q: TULLED_ must beat FLANNELD_", c.Etcd.Prefix)
	}
	if c.SubnetFile != "/flannel/subnet.env" || !c.IPMasq || c.RenewMargin != 30*time.Minute {
		t.Errorf("FLANNELD_ alone must apply: %+v", c)
	}
	if strings.Join(c.Ifaces, " ") != "eth1 192.0.2.7" {
		t.Errorf("ifaces %q", c.Ifaces)
	}
	if strings.Join(c.Etcd.Endpoints, " ") != "https://192.0.2.250:2379 https://192.0.2.251:2379" {
		t.Errorf("endpoints %q (flanneld's single-dash form must work)", c.Etcd.Endpoints)
	}

	if c = mustParse(t, nil, []string{"TULLED_PARTIAL_CHECKSUMS=false"}); c.PartialChecksums {
		t.Error("TULLED_PARTIAL_CHECKSUMS=false left partial checksums on")
	}

	c = mustParse(t, []string{"--iface", "eth2", "--iface=eth3"}, env)
	if strings.Join(c.Ifaces, " ") != "eth2 eth3" {
		t.Errorf("repeated --iface %q: the flags replace the environment", c.Ifaces)
	}
}

func TestUnknownEnvIsAWarningAndPasswordFlagIsFlagged(t *testing.T) {
	c := mustParse(t, []string{"--etcd-username=u", "--etcd-password=p"}, []string{"FLANNELD_KUBE_SUBNET_MGR=true", "TULLED_WORKRES=2", "TULLED_WORKERS=2", "HOME=/root"})
	got := strings.Join(c.Warnings, "\n")
	for _, want := range []string{"FLANNELD_KUBE_SUBNET_MGR names no tulled flag", "TULLED_WORKRES names no tulled flag", "process list"} {
		if !strings.Contains(got, want) {
			t.Errorf("warnings %q lack %q", got, want)
		}
	}
	if strings.Contains(got, "TULLED_WORKERS") || strings.Contains(got, "HOME") {
		t.Errorf("warnings %q name a known or foreign variable", got)
	}
}

func TestInvalidValuesAreUsageErrorsNamingTheSource(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"--workers=-1"}, nil, "invalid --workers -1: want 0 (one per CPU) to 1024"},
		{nil, []string{"TULLED_WORKERS=many"}, `invalid value "many" for TULLED_WORKERS`},
		{nil, []string{"FLANNELD_IP_MASQ=perhaps"}, `invalid value "perhaps" for FLANNELD_IP_MASQ`},
		{[]string{"--tun-driver=fast"}, nil, `invalid --tun-driver "fast": want offload or water`},
		{nil, []string{"TULLED_TUN_NAME=a-very-long-tun-name"}, `invalid TULLED_TUN_NAME "a-very-long-tun-name"`},
		{[]string{"--public-ip=2001:db8::1"}, nil, `invalid --public-ip "2001:db8::1": want a unicast IPv4 address`},
		{[]string{"--public-ip=192.0.2"}, nil, `invalid --public-ip "192.0.2"`},
		{[]string{"--iface=fe80::1"}, nil, `invalid --iface "fe80::1": want a global IPv6 address (not link-local)`},
		{[]string{"--public-ipv6=198.51.100.7"}, nil, `invalid --public-ipv6 "198.51.100.7": want a global unicast IPv6 address`},
		{[]string{"--public-ipv6=fe80::1"}, nil, `invalid --public-ipv6 "fe80::1"`},
		{nil, []string{"FLANNELD_PUBLIC_IPV6=::ffff:192.0.2.1"}, `invalid FLANNELD_PUBLIC_IPV6 "::ffff:192.0.2.1"`},
		{[]string{"--iface-regex=("}, nil, `invalid --iface-regex "("`},
		{[]string{"--etcd-endpoints=192.0.2.250"}, nil, `invalid etcd endpoint "192.0.2.250" in --etcd-endpoints: want scheme://host:port`},
		{[]string{"--etcd-endpoints=ftp://192.0.2.250:2379"}, nil, `scheme "ftp"`},
		{[]string{"--etcd-endpoints=,"}, nil, "--etcd-endpoints is empty"},
		{[]string{"--etcd-prefix=coreos.com"}, nil, "must start with '/'"},
		{[]string{"--etcd-certfile=/c.pem"}, nil, "--etcd-certfile and --etcd-keyfile go together"},
		{[]string{"--subnet-lease-renew-margin=0"}, nil, "invalid --subnet-lease-renew-margin 0: must be at least 1 (minutes)"},
		{[]string{"--subnet-lease-ttl=1s"}, nil, "must be at least 2s"},
		{[]string{"--subnet-lease-ttl=2500ms"}, nil, "whole seconds"},
		{[]string{"--etcd-start-timeout=0s"}, nil, "must be positive"},
		{[]string{"--metrics-addr=9285"}, nil, `invalid --metrics-addr "9285"`},
		{[]string{"--healthz-ip=any"}, nil, `invalid --healthz-ip "any": want an IP address`},
		{[]string{"--healthz-port=70000"}, nil, "invalid --healthz-port 70000"},
		{[]string{"--log-level=loud"}, nil, `invalid --log-level "loud"`},
		{[]string{"--log-format=xml"}, nil, `invalid --log-format "xml": want text or json`},
		{[]string{"--no-such-flag"}, nil, "flag provided but not defined: -no-such-flag"},
		{[]string{"status"}, nil, `unexpected argument "status"`},
	} {
		_, _, err := Parse(tc.args, tc.env)
		var ue *UsageError
		if !errors.As(err, &ue) {
			t.Errorf("Parse(%q, %q): %v, want a *UsageError", tc.args, tc.env, err)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q, %q): %q, want it to contain %q", tc.args, tc.env, err, tc.want)
		}
	}
}

func TestValuesAreConverted(t *testing.T) {
	c := mustParse(t, []string{
		"--public-ip=198.51.100.7", "--iface-regex=^eth", "--healthz-port=8471", "--healthz-ip=127.0.0.1",
		"--metrics-addr=", "--log-level=debug", "--log-format=json", "--subnet-lease-ttl=30s", "--etcd-prefix=/x/",
	}, nil)
	if c.PublicIP != netip.MustParseAddr("198.51.100.7") || len(c.IfaceRegexes) != 1 || c.IfaceRegexes[0].String() != "^eth" {
		t.Errorf("%+v", c)
	}
	if c.HealthzAddr() != "127.0.0.1:8471" || c.MetricsAddr != "" || c.LogLevel != slog.LevelDebug || c.LogFormat != "json" {
		t.Errorf("%+v", c)
	}
	if c.LeaseTTL != 30*time.Second || c.Etcd.Prefix != "/x" {
		t.Errorf("%+v", c)
	}
	// Dual stack: flannel's --public-ipv6 (also from its environment
	// variable) and an IPv6 address on --iface.
	c = mustParse(t, []string{"--iface=2001:db8:ffff::1", "--iface=eth0"}, []string{"FLANNELD_PUBLIC_IPV6=2001:db8:ffff::7"})
	if c.PublicIPv6 != netip.MustParseAddr("2001:db8:ffff::7") || strings.Join(c.Ifaces, ",") != "2001:db8:ffff::1,eth0" {
		t.Errorf("PublicIPv6 %v, ifaces %q", c.PublicIPv6, c.Ifaces)
	}
}

func TestHelpAndVersionActions(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"-help"}, {"--workers=-5", "--help"}} {
		c, action, err := Parse(args, nil)
		if err != nil && args[0] != "--workers=-5" || action != ActionHelp && err == nil || c != nil {
			t.Errorf("%q: %v %v %v", args, c, action, err)
		}
	}
	if _, action, err := Parse([]string{"--version"}, []string{"TULLED_VERSION=true"}); action != ActionVersion || err != nil {
		t.Errorf("--version: %v %v", action, err)
	}
	if _, action, err := Parse(nil, []string{"TULLED_HELP=true"}); action != ActionRun || err != nil {
		t.Errorf("TULLED_HELP must not turn a run into help: %v %v", action, err)
	}
}

func TestUsageIsGroupedAndMentionsEnvironment(t *testing.T) {
	var b strings.Builder
	Usage(&b)
	out := b.String()
	last := -1
	for _, want := range []string{"etcd:", "--etcd-endpoints URLS", "network:", "--iface NAME|IP", "data plane:", "--tun-driver", "observability:", "--metrics-addr HOST:PORT", "TULLED_<FLAG>", "FLANNELD_<FLAG>", "Exit status"} {
		i := strings.Index(out, want)
		if i < 0 || i < last {
			t.Errorf("help lacks %q or has it out of order:\n%s", want, out)
		}
		last = i
	}
	if !strings.Contains(out, "(default 24h)") || !strings.Contains(out, "(default 10m)") {
		t.Errorf("durations not shown shortly:\n%s", out)
	}
}

func TestStatusTakesEtcdFlagsFromEnvironment(t *testing.T) {
	s, action, err := ParseStatus([]string{"--json"}, []string{"FLANNELD_ETCD_ENDPOINTS=http://192.0.2.250:2379", "TULLED_JSON=false", "TULLED_WORKERS=x"})
	if err != nil || action != ActionRun {
		t.Fatal(action, err)
	}
	if !s.JSON || s.Etcd.Endpoints[0] != "http://192.0.2.250:2379" || s.Timeout != 10*time.Second {
		t.Errorf("%+v", s)
	}
	if _, action, _ := ParseStatus([]string{"-h"}, nil); action != ActionHelp {
		t.Errorf("-h: %v", action)
	}
}

func TestDockerOptsFlagsAreMkDockerOpts(t *testing.T) {
	d, _, err := ParseDockerOpts([]string{"-f", "/tmp/s.env", "-m", "-k", "OPTS"}, []string{"TULLED_SUBNET_FILE=/x"})
	if err != nil {
		t.Fatal(err)
	}
	if d.SubnetFile != "/tmp/s.env" || !d.NoIPMasq || d.Key != "OPTS" || !d.Individual || !d.Combined {
		t.Errorf("%+v", d)
	}
	d, _, err = ParseDockerOpts([]string{"-c"}, []string{"FLANNELD_SUBNET_FILE=/y"})
	if err != nil {
		t.Fatal(err)
	}
	if d.SubnetFile != "/y" || d.Individual || !d.Combined {
		t.Errorf("%+v", d)
	}
}

func TestPasswordFileIsReadAndMustBePrivate(t *testing.T) {
	dir := t.TempDir()
	private := filepath.Join(dir, "etcd-password")
	if err := os.WriteFile(private, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := mustParse(t, []string{"--etcd-username=tulle", "--etcd-password-file=" + private}, nil)
	if c.Etcd.Password != "s3cret" || c.Etcd.PasswordFile != private {
		t.Errorf("password %q from %q", c.Etcd.Password, c.Etcd.PasswordFile)
	}
	c = mustParse(t, nil, []string{"TULLED_ETCD_USERNAME=tulle", "TULLED_ETCD_PASSWORD_FILE=" + private})
	if c.Etcd.Password != "s3cret" {
		t.Errorf("TULLED_ETCD_PASSWORD_FILE: password %q", c.Etcd.Password)
	}
	c = mustParse(t, []string{"--etcd-username=tulle"}, []string{"TULLED_ETCD_PASSWORD=from-env"})
	if c.Etcd.Password != "from-env" || len(c.Warnings) != 0 {
		t.Errorf("TULLED_ETCD_PASSWORD: password %q, warnings %q", c.Etcd.Password, c.Warnings)
	}

	shared := filepath.Join(dir, "shared")
	if err := os.WriteFile(shared, []byte("s3cret"), 0o640); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"--etcd-username=tulle", "--etcd-password-file=" + shared}, nil,
			"--etcd-password-file: " + shared + " has mode 0640: group or others may read the password; chmod 600 " + shared},
		{nil, []string{"TULLED_ETCD_USERNAME=tulle", "TULLED_ETCD_PASSWORD_FILE=" + shared}, "TULLED_ETCD_PASSWORD_FILE: " + shared + " has mode 0640"},
		{[]string{"--etcd-username=tulle", "--etcd-password-file=" + empty}, nil, empty + " is empty"},
		{[]string{"--etcd-username=tulle", "--etcd-password-file=" + filepath.Join(dir, "none")}, nil, "no such file"},
		{[]string{"--etcd-username=tulle", "--etcd-password-file=" + private}, []string{"TULLED_ETCD_PASSWORD=x"},
			"TULLED_ETCD_PASSWORD and --etcd-password-file both given"},
		{[]string{"--etcd-password-file=" + private}, nil, "an etcd password given without --etcd-username"},
	} {
		_, _, err := Parse(tc.args, tc.env)
		var ue *UsageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v %v: %v, want a usage error saying %q", tc.args, tc.env, err, tc.want)
		}
	}
}

func TestProfilerOnlyOnLoopbackAndItsCommandLineHidesThePassword(t *testing.T) {
	if c := mustParse(t, nil, nil); c.DebugPprofAddr != "127.0.0.1:6060" {
		t.Errorf("default --debug-pprof-addr %q", c.DebugPprofAddr)
	}
	for _, ok := range []string{"127.0.0.1:6060", "[::1]:6060", "localhost:7000", "127.0.0.5:0"} {
		if _, _, err := Parse([]string{"--debug-pprof", "--debug-pprof-addr=" + ok}, nil); err != nil {
			t.Errorf("--debug-pprof-addr=%s: %v", ok, err)
		}
	}
	for _, bad := range []string{":6060", "0.0.0.0:6060", "192.0.2.1:6060", "[::]:6060"} {
		if _, _, err := Parse([]string{"--debug-pprof-addr=" + bad}, nil); err == nil || !strings.Contains(err.Error(), "must be a loopback address") {
			t.Errorf("--debug-pprof-addr=%s: %v", bad, err)
		}
	}
	got := RedactArgs([]string{"tulled", "--etcd-password=a", "-etcd-password", "b", "--etcd-username", "u", "--etcd-password", "c", "--", "--etcd-password=d"})
	want := []string{"tulled", "--etcd-password=REDACTED", "-etcd-password", "REDACTED", "--etcd-username", "u", "--etcd-password", "REDACTED", "--", "--etcd-password=REDACTED"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("RedactArgs = %q\nwant %q", got, want)
	}
}
