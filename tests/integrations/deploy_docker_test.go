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

	"github.com/tulle-net/tulle/tests/tools"
)

// readEnvironmentFile parses a file as systemd's EnvironmentFile= does for
// the lines docker-opts writes: KEY=VALUE or KEY="VALUE", '#' comments.
func readEnvironmentFile(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: %q is not KEY=VALUE", path, line)
		}
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			v = strings.NewReplacer(`\"`, `"`, `\\`, `\`).Replace(v[1 : len(v)-1])
		}
		env[k] = v
	}
	return env
}

var unitVar = regexp.MustCompile(`\$([A-Za-z_][A-Za-z0-9_]*)`)

// expandCommand does systemd's expansion of an Exec line: an unquoted
// $VAR becomes the variable's whitespace-separated words.
func expandCommand(line string, env map[string]string) []string {
	var argv []string
	for _, w := range strings.Fields(line) {
		if m := unitVar.FindStringSubmatch(w); m != nil && m[0] == w {
			argv = append(argv, strings.Fields(env[m[1]])...)
			continue
		}
		argv = append(argv, w)
	}
	return argv
}

// TestDockerDropInGivesDockerdTheLease plays systemd's part for the drop-in:
// it runs the drop-in's ExecStartPre (the real tulled docker-opts) with the
// environment systemd would give it, twice as for a restart of Docker, and
// expands ExecStart with the file it wrote. dockerd must get exactly
// flannel's options for the lease in subnet.env.
func TestDockerDropInGivesDockerdTheLease(t *testing.T) {
	tulled := buildTulled(t)
	dir := t.TempDir()
	subnetFile := filepath.Join(dir, "subnet.env")
	optsFile := filepath.Join(dir, "docker")
	if err := os.WriteFile(subnetFile, []byte("FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.79.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dropIn := parseUnit(t, deployFile(t, "docker/10-tulle.conf"))
	if w := dropIn.Words("Unit", "After"); !slices.Contains(w, "tulled.service") {
		t.Errorf("drop-in: After=%v, want tulled.service", w)
	}
	for _, key := range []string{"Requires", "BindsTo"} {
		if w := dropIn.Values("Unit", key); len(w) > 0 {
			t.Errorf("drop-in: %s=%s would stop or restart Docker with tulled", key, w)
		}
	}
	pre := dropIn.Values("Service", "ExecStartPre")
	if len(pre) != 1 {
		t.Fatalf("drop-in: ExecStartPre = %q, want one command", pre)
	}
	// docker-opts puts DOCKER_NETWORK_OPTIONS from its environment first;
	// on a restart that is the previous run's file, so it runs without it.
	if f := strings.Fields(pre[0]); len(f) < 3 || f[0] != "/usr/bin/env" || f[1] != "-u" || f[2] != "DOCKER_NETWORK_OPTIONS" {
		t.Errorf("drop-in: ExecStartPre = %q, want it under /usr/bin/env -u DOCKER_NETWORK_OPTIONS", pre[0])
	}
	envFiles := dropIn.Values("Service", "EnvironmentFile")
	if !slices.Contains(envFiles, "-/run/flannel/docker") {
		t.Fatalf("drop-in: EnvironmentFile = %q, want -/run/flannel/docker", envFiles)
	}
	starts := dropIn.Values("Service", "ExecStart")
	if len(starts) != 2 || starts[0] != "" {
		t.Fatalf("drop-in: ExecStart = %q, want a reset and one command", starts)
	}
	r := strings.NewReplacer(installedTulled, tulled, "/run/flannel/docker", optsFile)

	runPre := func() (string, error) {
		argv := strings.Fields(r.Replace(pre[0]))
		cmd := tools.Command(context.Background(), argv[0], argv[1:]...)
		// systemd's environment for the command: the files of the unit,
		// read before it runs ("-": optional), so on a restart the
		// previous run's options are in it.
		cmd.Env = append(os.Environ(), "TULLED_SUBNET_FILE="+subnetFile)
		if _, err := os.Stat(optsFile); err == nil {
			for k, v := range readEnvironmentFile(t, optsFile) {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
		}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	want := map[string]string{
		"DOCKER_OPT_BIP":         "--bip=198.18.79.1/24",
		"DOCKER_OPT_IPMASQ":      "--ip-masq=false",
		"DOCKER_OPT_MTU":         "--mtu=1472",
		"DOCKER_NETWORK_OPTIONS": " --bip=198.18.79.1/24 --ip-masq=false --mtu=1472",
	}
	for i := 1; i <= 2; i++ {
		if out, err := runPre(); err != nil {
			t.Fatalf("ExecStartPre, start %d: %v\n%s", i, err, out)
		}
		got := readEnvironmentFile(t, optsFile)
		for k, v := range want {
			if got[k] != v {
				t.Errorf("start %d: %s=%q, want %q", i, k, got[k], v)
			}
		}
	}
	argv := expandCommand(starts[1], readEnvironmentFile(t, optsFile))
	wantArgv := []string{installedDockerd, "-H", "fd://", "--containerd=/run/containerd/containerd.sock",
		"--bip=198.18.79.1/24", "--ip-masq=false", "--mtu=1472"}
	if !slices.Equal(argv, wantArgv) {
		t.Errorf("dockerd argv:\n got %q\nwant %q", argv, wantArgv)
	}

	// Without subnet.env (tulled never ran), ExecStartPre fails, so Docker
	// does not start on a network of its own choosing; the error names the file.
	if err := os.Remove(subnetFile); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(optsFile); err != nil {
		t.Fatal(err)
	}
	out, err := runPre()
	if err == nil {
		t.Errorf("ExecStartPre succeeded without subnet.env:\n%s", out)
	} else if !strings.Contains(out, subnetFile) {
		t.Errorf("ExecStartPre without subnet.env: the error does not name %s:\n%s", subnetFile, out)
	}
}
