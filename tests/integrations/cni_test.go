package integrations

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
	"github.com/tulle-net/tulle/tests/tools"
)

// debianCNIDir holds the bridge, host-local, loopback and portmap plugins of
// Debian's containernetworking-plugins.
const debianCNIDir = "/usr/lib/cni"

// cniHost is one testbed host set up as a CNI runtime would be: a network
// config directory for cnitool and private state directories.
type cniHost struct {
	h          *testbed.Host
	confDir    string // NETCONFPATH
	dataDir    string // tulle-cni's saved delegate configs
	ipamDir    string // host-local's reservations
	subnetFile string
}

// stageCNIConf writes the shipped network config src (deploy/cni/...) for
// host h, with the host's subnet.env and private state directories (the
// hosts of a testbed share one file system).
func stageCNIConf(t *testing.T, h *testbed.Host, src string) cniHost {
	t.Helper()
	dir := filepath.Join(t.TempDir(), h.Name)
	c := cniHost{h: h, confDir: filepath.Join(dir, "net.d"), dataDir: filepath.Join(dir, "tulle"),
		ipamDir: filepath.Join(dir, "ipam"), subnetFile: h.SubnetFile}
	b, err := os.ReadFile(deployFile(t, src))
	if err != nil {
		t.Fatal(err)
	}
	var conf map[string]any
	if err := json.Unmarshal(b, &conf); err != nil {
		t.Fatalf("%s: %v", src, err)
	}
	plugin := conf // a .conf is the plugin config itself
	if list, ok := conf["plugins"].([]any); ok {
		plugin = list[0].(map[string]any)
	}
	if plugin["type"] != "tulle-cni" {
		t.Fatalf("%s: first plugin is %v, want tulle-cni", src, plugin["type"])
	}
	plugin["subnetFile"] = c.subnetFile
	plugin["dataDir"] = c.dataDir
	plugin["ipam"] = map[string]any{"dataDir": c.ipamDir}
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(c.confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(c.confDir, filepath.Base(src)), out, 0o644); err != nil {
		t.Fatal(err)
	}
	return c
}

// cnitool runs the real cnitool in the host's namespace, as the runtime
// would run the plugins, with our tulle-cni and Debian's plugins.
func (c cniHost) cnitool(ctx context.Context, t *testing.T, tool, cniPath, verb, netns string) (string, error) {
	t.Helper()
	cmd := tools.Command(ctx, "ip", "netns", "exec", c.h.NS, tool, verb, "tulle", netns)
	cmd.Env = append(os.Environ(), "NETCONFPATH="+c.confDir, "CNI_PATH="+cniPath, "CNI_IFNAME=eth0")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// addNetns creates a container namespace named with the bed's prefix (so
// a crashed run's leftovers are swept) and deletes it at the end.
func addNetns(ctx context.Context, t *testing.T, b *testbed.Bed, suffix string) string {
	t.Helper()
	name := b.Prefix + "-" + suffix
	if out, err := tools.Command(ctx, "ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v\n%s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := tools.Command(context.Background(), "ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v\n%s", name, err, out)
		}
	})
	return name
}

// cnitoolContainerID is the container ID cnitool derives from the netns path.
func cnitoolContainerID(netnsPath string) string {
	s := sha512.Sum512([]byte(netnsPath))
	return fmt.Sprintf("cnitool-%x", s[:10])
}

// cnitoolCacheFile is where libcni (in cnitool) caches the result of ADD.
func cnitoolCacheFile(netnsPath string) string {
	return "/var/lib/cni/results/tulle-" + cnitoolContainerID(netnsPath) + "-eth0"
}

// TestCNIPluginConnectsContainersOnTwoHostsAndDelLeavesNothing is the
// issue's real test: the real cnitool, Debian's bridge, host-local,
// loopback and portmap plugins, our tulle-cni, and the real tulled on two
// testbed hosts. Host 1 uses the shipped Kubernetes conflist (tulled with
// --ip-masq), host 2 the Mesos config (tulled without, so the bridge
// masquerades). The two containers ping each other over Tulle; DEL, on host
// 2 after subnet.env is gone, leaves no veth, no reservation, no saved
// config and no masquerade chain behind.
func TestCNIPluginConnectsContainersOnTwoHostsAndDelLeavesNothing(t *testing.T) {
	testbed.RequireRoot(t)
	for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
		requireTool(t, filepath.Join(debianCNIDir, p))
	}
	cnitool := buildTool(t, "github.com/containernetworking/cni/cnitool")
	binDir := t.TempDir()
	if err := os.Symlink(buildTool(t, "./cmd/tulle-cni"), filepath.Join(binDir, "tulle-cni")); err != nil {
		t.Fatal(err)
	}
	cniPath := binDir + ":" + debianCNIDir

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	b := testbed.NewT(t, testbed.Options{Hosts: 2})
	if err := b.WriteNetworkConfig(ctx, testbed.DefaultNetworkConfig); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Host(1).StartTulled(ctx, "--ip-masq"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Host(2).StartTulled(ctx); err != nil {
		t.Fatal(err)
	}
	hosts := []cniHost{
		stageCNIConf(t, b.Host(1), "cni/10-tulle.conflist"),
		stageCNIConf(t, b.Host(2), "cni/tulle-mesos.conf"),
	}

	var addrs []netip.Addr
	var netnsPaths []string
	for i, c := range hosts {
		env, err := c.h.SubnetEnv()
		if err != nil {
			t.Fatal(err)
		}
		ns := addNetns(ctx, t, b, fmt.Sprintf("k%d", i+1))
		path := "/run/netns/" + ns
		netnsPaths = append(netnsPaths, path)
		out, err := c.cnitool(ctx, t, cnitool, cniPath, "add", path)
		if err != nil {
			t.Fatalf("host %s: cnitool add: %v\n%s", c.h.Name, err, out)
		}
		var res struct {
			IPs []struct{ Address string } `json:"ips"`
		}
		if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.IPs) != 1 {
			t.Fatalf("host %s: cnitool add printed %q: %v", c.h.Name, out, err)
		}
		p, err := netip.ParsePrefix(res.IPs[0].Address)
		if err != nil || !env.Lease().Contains(p.Addr()) || p.Bits() != env.Lease().Bits() {
			t.Fatalf("host %s: container address %s is not in the lease %s", c.h.Name, res.IPs[0].Address, env.Lease())
		}
		addrs = append(addrs, p.Addr())
		// What DEL must remove is there now (so the checks after DEL are not
		// looking in the wrong place).
		for _, f := range []string{
			filepath.Join(c.ipamDir, "tulle", p.Addr().String()),            // host-local's reservation
			filepath.Join(c.dataDir, cnitoolContainerID(path)+"@eth0.json"), // tulle-cni's saved config
			cnitoolCacheFile(path), // libcni's cached result
		} {
			if _, err := os.Stat(f); err != nil {
				t.Errorf("host %s: after ADD: %v", c.h.Name, err)
			}
		}
		// The delegate gave it FLANNEL_MTU and the route to the overlay.
		link, _ := testbed.Exec(ctx, ns, "ip", "-o", "link", "show", "eth0")
		if !strings.Contains(link, fmt.Sprintf("mtu %d ", env.MTU)) {
			t.Errorf("host %s: container eth0 %q, want mtu %d", c.h.Name, link, env.MTU)
		}
		routes, _ := testbed.Exec(ctx, ns, "ip", "-4", "route")
		if !strings.Contains(routes, env.Network.String()+" via "+env.Subnet.Addr().String()) {
			t.Errorf("host %s: container routes lack %s via %s:\n%s", c.h.Name, env.Network, env.Subnet.Addr(), routes)
		}
	}

	ctr1 := &testbed.Node{Name: "k1", NS: b.Prefix + "-k1"}
	ctr2 := &testbed.Node{Name: "k2", NS: b.Prefix + "-k2"}
	if _, err := ctr1.WaitReachable(ctx, addrs[1], 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := ctr1.Ping(ctx, addrs[1], 5); err != nil {
		t.Error(err)
	}
	if _, err := ctr2.Ping(ctx, addrs[0], 5); err != nil {
		t.Error(err)
	}

	// CHECK (spec 0.4.0+: the Kubernetes conflist) passes on a healthy
	// attachment.
	if out, err := hosts[0].cnitool(ctx, t, cnitool, cniPath, "check", netnsPaths[0]); err != nil {
		t.Errorf("host h1: cnitool check: %v\n%s", err, out)
	}
	// Host 2's bridge masquerades (tulled runs without --ip-masq).
	if out, _ := hosts[1].h.Exec(ctx, "iptables", "-t", "nat", "-S", "POSTROUTING"); !strings.Contains(out, "CNI-") {
		t.Errorf("host h2: no CNI masquerade rule although FLANNEL_IPMASQ=false:\n%s", out)
	}

	// DEL on host 2 after subnet.env is gone (tulled stopped, file removed):
	// the saved delegate config is enough.
	if err := b.Host(2).Tulled().Stop(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(hosts[1].subnetFile); err != nil {
		t.Fatal(err)
	}
	for i, c := range hosts {
		for round := 1; round <= 2; round++ { // DEL is idempotent
			if out, err := c.cnitool(ctx, t, cnitool, cniPath, "del", netnsPaths[i]); err != nil {
				t.Errorf("host %s: cnitool del #%d: %v\n%s", c.h.Name, round, err, out)
			}
		}
		assertNothingLeft(ctx, t, c, b.Prefix+fmt.Sprintf("-k%d", i+1), netnsPaths[i])
	}

	// ADD without subnet.env says what is wrong.
	out, err := hosts[1].cnitool(ctx, t, cnitool, cniPath, "add", netnsPaths[1])
	if err == nil || !strings.Contains(out, "tulle-cni: read "+hosts[1].subnetFile+": no such file; is tulled running?") {
		t.Errorf("cnitool add without subnet.env: %v\n%s", err, out)
	}
	if _, err := hosts[1].cnitool(ctx, t, cnitool, cniPath, "del", netnsPaths[1]); err != nil {
		t.Errorf("cnitool del after a failed add: %v", err)
	}
	assertNothingLeft(ctx, t, hosts[1], b.Prefix+"-k2", netnsPaths[1])
}

// assertNothingLeft checks that a container's DEL undid everything: no
// interface in the container, no veth in the host, no address reserved,
// no saved delegate config, no cached result and no masquerade chain.
func assertNothingLeft(ctx context.Context, t *testing.T, c cniHost, ctrNS, netnsPath string) {
	t.Helper()
	if out, _ := testbed.Exec(ctx, ctrNS, "ip", "-o", "link", "show"); strings.Contains(out, "eth0") {
		t.Errorf("host %s: eth0 still in the container after DEL:\n%s", c.h.Name, out)
	}
	if out, _ := c.h.Exec(ctx, "ip", "-o", "link", "show", "type", "veth"); strings.Contains(out, "master") {
		t.Errorf("host %s: a container veth is left on the bridge after DEL:\n%s", c.h.Name, out)
	}
	// host-local keeps "lock" and "last_reserved_ip.N"; a reservation is a
	// file named by the address.
	ents, _ := os.ReadDir(filepath.Join(c.ipamDir, "tulle"))
	for _, e := range ents {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			t.Errorf("host %s: host-local still reserves %s after DEL", c.h.Name, e.Name())
		}
	}
	if ents, _ := os.ReadDir(c.dataDir); len(ents) != 0 {
		t.Errorf("host %s: saved delegate configs left after DEL: %v", c.h.Name, ents)
	}
	if _, err := os.Stat(cnitoolCacheFile(netnsPath)); err == nil {
		t.Errorf("host %s: libcni's cached result %s left after DEL", c.h.Name, cnitoolCacheFile(netnsPath))
	}
	if out, _ := c.h.Exec(ctx, "iptables", "-t", "nat", "-S"); strings.Contains(out, "CNI-") {
		t.Errorf("host %s: CNI chains left in the nat table after DEL:\n%s", c.h.Name, out)
	}
}
