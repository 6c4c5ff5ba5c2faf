package daemon

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeSubnetEnv writes a subnet.env as flanneld (and tulled) write it.
func writeSubnetEnv(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "subnet.env")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const flannelEnv = "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.79.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"

func runMain(t *testing.T, env []string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	code = Main(args, env, &o, &e)
	return code, o.String(), e.String()
}

// The format of flannel's mk-docker-opts.sh (../shared/reference/flannel-compat.md):
// DOCKER_OPTS=" --bip=10.5.79.1/24 --ip-masq=false --mtu=1472". In a
// dual-stack network Docker's bridge gets the IPv6 lease too: --ipv6
// --fixed-cidr-v6=<lease>, in mk-docker-opts.sh's alphabetical order.
func TestDockerOptsPrintsWhatMkDockerOptsPrints(t *testing.T) {
	for _, c := range []struct{ env, want string }{
		{flannelEnv, `DOCKER_OPT_BIP="--bip=198.18.79.1/24"
DOCKER_OPT_IPMASQ="--ip-masq=false"
DOCKER_OPT_MTU="--mtu=1472"
DOCKER_OPTS=" --bip=198.18.79.1/24 --ip-masq=false --mtu=1472"
`},
		{dualStackEnv, `DOCKER_OPT_BIP="--bip=198.18.79.1/24"
DOCKER_OPT_IPMASQ="--ip-masq=false"
DOCKER_OPT_IPV6="--ipv6 --fixed-cidr-v6=2001:db8:1:4f::/64"
DOCKER_OPT_MTU="--mtu=1472"
DOCKER_OPTS=" --bip=198.18.79.1/24 --ip-masq=false --ipv6 --fixed-cidr-v6=2001:db8:1:4f::/64 --mtu=1472"
`},
	} {
		code, out, errOut := runMain(t, nil, "docker-opts", "-f", writeSubnetEnv(t, c.env))
		if code != 0 || out != c.want {
			t.Errorf("exit %d, stderr %q\ngot:\n%s\nwant:\n%s", code, errOut, out, c.want)
		}
	}
}

func TestDockerOptsVariants(t *testing.T) {
	noMasq := writeSubnetEnv(t, strings.Replace(flannelEnv, "FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false", 1))
	p := writeSubnetEnv(t, flannelEnv)
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"combined only", nil, []string{"-c", "-f", p}, "DOCKER_OPTS=\" --bip=198.18.79.1/24 --ip-masq=false --mtu=1472\"\n"},
		{"individual only", nil, []string{"-i", "-f", p}, "DOCKER_OPT_BIP=\"--bip=198.18.79.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n"},
		{"tulled does not masquerade: Docker must", nil, []string{"-c", "-f", noMasq}, "DOCKER_OPTS=\" --bip=198.18.79.1/24 --ip-masq=true --mtu=1472\"\n"},
		{"no --ip-masq (-m)", nil, []string{"-m", "-c", "-f", p}, "DOCKER_OPTS=\" --bip=198.18.79.1/24 --mtu=1472\"\n"},
		{"own key (-k) keeps its value from the environment", []string{"MY_OPTS=--debug"}, []string{"-c", "-k", "MY_OPTS", "-f", p},
			"MY_OPTS=\"--debug  --bip=198.18.79.1/24 --ip-masq=false --mtu=1472\"\n"},
		{"subnet file from FLANNELD_SUBNET_FILE", []string{"FLANNELD_SUBNET_FILE=" + p}, []string{"-c"}, "DOCKER_OPTS=\" --bip=198.18.79.1/24 --ip-masq=false --mtu=1472\"\n"},
	} {
		code, out, errOut := runMain(t, tc.env, append([]string{"docker-opts"}, tc.args...)...)
		if code != 0 || out != tc.want {
			t.Errorf("%s: exit %d, stderr %q\ngot:  %q\nwant: %q", tc.name, code, errOut, out, tc.want)
		}
	}
}

func TestDockerOptsDaemonJSONFragment(t *testing.T) {
	p := writeSubnetEnv(t, flannelEnv)
	code, out, errOut := runMain(t, nil, "docker-opts", "--daemon-json", "-f", p)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if len(got) != 3 || got["bip"] != "198.18.79.1/24" || got["mtu"] != 1472.0 || got["ip-masq"] != false {
		t.Errorf("got %s", out)
	}
	_, out, _ = runMain(t, nil, "docker-opts", "--daemon-json", "-m", "-f", p)
	if strings.Contains(out, "ip-masq") {
		t.Errorf("-m still sets ip-masq: %s", out)
	}
}

func TestDockerOptsWritesFileAtomically(t *testing.T) {
	p := writeSubnetEnv(t, flannelEnv)
	dst := filepath.Join(t.TempDir(), "docker_opts.env")
	code, out, errOut := runMain(t, nil, "docker-opts", "-f", p, "-d", dst)
	if code != 0 || out != "" {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	b, err := os.ReadFile(dst)
	if err != nil || !strings.HasPrefix(string(b), "DOCKER_OPT_BIP=\"--bip=198.18.79.1/24\"\n") {
		t.Errorf("%v: %q", err, b)
	}
	entries, _ := os.ReadDir(filepath.Dir(dst))
	if len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
}

func TestDockerOptsFailsClearly(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "subnet.env")
	code, _, errOut := runMain(t, nil, "docker-opts", "-f", missing)
	if code != ExitFailure || !strings.Contains(errOut, missing) || !strings.Contains(errOut, "is it running") {
		t.Errorf("missing file: exit %d, %q", code, errOut)
	}
	corrupt := writeSubnetEnv(t, "FLANNEL_SUBNET=banana\n")
	code, _, errOut = runMain(t, nil, "docker-opts", "-f", corrupt)
	if code != ExitFailure || !strings.Contains(errOut, "FLANNEL_SUBNET=banana") {
		t.Errorf("corrupt file: exit %d, %q", code, errOut)
	}
	code, _, errOut = runMain(t, nil, "docker-opts", "-x")
	if code != ExitUsage || !strings.Contains(errOut, "flag provided but not defined: -x") {
		t.Errorf("bad flag: exit %d, %q", code, errOut)
	}
}

func TestMainUsageVersionAndExitCodes(t *testing.T) {
	code, out, _ := runMain(t, nil, "--help")
	if code != 0 || !strings.Contains(out, "observability:") {
		t.Errorf("--help: %d %q", code, out)
	}
	code, out, _ = runMain(t, nil, "--version")
	if code != 0 || !strings.HasPrefix(out, "tulled ") {
		t.Errorf("--version: %d %q", code, out)
	}
	code, _, errOut := runMain(t, []string{"FLANNELD_SUBNET_LEASE_RENEW_MARGIN=0"})
	if code != ExitUsage || !strings.Contains(errOut, "invalid FLANNELD_SUBNET_LEASE_RENEW_MARGIN 0") {
		t.Errorf("bad env: %d %q", code, errOut)
	}
	code, out, _ = runMain(t, nil, "status", "--help")
	if code != 0 || !strings.Contains(out, "tulled status") {
		t.Errorf("status --help: %d %q", code, out)
	}
}
