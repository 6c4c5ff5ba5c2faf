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

// cniHost is one network config staged on a testbed host as a CNI
// runtime would have it: its own config directory for cnitool and the
// host's state directories.
type cniHost struct {
	h          *testbed.Host
	confDir    string // NETCONFPATH
	dataDir    string // tulle-cni's saved delegate configs
	ipamDir    string // host-local's reservations, one directory per network name
	subnetFile string
}

// stageCNIConf writes the shipped network config src (deploy/cni/...) for
// host h into a config directory of its own under root, with the host's
// subnet.env and the state directories moved under root (the hosts of a
// testbed share one file system): tulle-cni's dataDir keeps its base name,
// so configs that keep their saved configs apart still do, and host-local's
// directory is root/networks, shared by the configs of a host as
// /var/lib/cni/networks is. edit, if not nil, changes the config first.
func stageCNIConf(t *testing.T, h *testbed.Host, root, src string, edit func(conf, plugin map[string]any)) cniHost {
	t.Helper()
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
	if edit != nil {
		edit(conf, plugin)
	}
	dataDir, _ := plugin["dataDir"].(string)
	if dataDir == "" {
		dataDir = "/var/lib/cni/tulle" // tulle-cni's default
	}
	if _, ok := plugin["ipam"]; ok {
		t.Fatalf("%s: sets ipam; the test expects host-local's default directory", src)
	}
	c := cniHost{h: h, confDir: filepath.Join(root, strings.TrimSuffix(filepath.Base(src), filepath.Ext(src))+".d"),
		dataDir: filepath.Join(root, filepath.Base(dataDir)), ipamDir: filepath.Join(root, "networks"), subnetFile: h.SubnetFile}
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
		if _, err := os.Stat("/run/netns/" + name); err != nil {
			return // the test deleted it (a container that is gone)
		}
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
	ctx, b, cnitool, cniPath := cniBed(t, 2, testbed.DefaultNetworkConfig)
	if _, err := b.Host(1).StartTulled(ctx, "--ip-masq"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Host(2).StartTulled(ctx); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	hosts := []cniHost{
		stageCNIConf(t, b.Host(1), filepath.Join(root, "h1"), "cni/10-tulle.conflist", nil),
		stageCNIConf(t, b.Host(2), filepath.Join(root, "h2"), "cni/tulle-mesos.conf", nil),
	}

	var addrs []netip.Addr
	var netnsPaths []string
	for i, c := range hosts {
		env, err := c.h.SubnetEnv()
		if err != nil {
			t.Fatal(err)
		}
		ctr, path, addr := c.cniAdd(ctx, t, b, cnitool, cniPath, fmt.Sprintf("k%d", i+1))
		ns := ctr.NS
		netnsPaths = append(netnsPaths, path)
		addrs = append(addrs, addr)
		// What DEL must remove is there now (so the checks after DEL are not
		// looking in the wrong place).
		for _, f := range []string{
			filepath.Join(c.ipamDir, "tulle", addr.String()),                // host-local's reservation
			filepath.Join(c.dataDir, cnitoolContainerID(path)+"@eth0.json"), // tulle-cni's saved config
			cnitoolCacheFile(path),                                          // libcni's cached result
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
		wantContainerRoute(ctx, t, c.h.Name, ns, env.Network, env.Subnet.Addr())
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

// cniAdd runs cnitool add for a new container namespace (named with the
// bed's prefix and suffix) and returns the namespace's node, its path and
// its IPv4 address. The plugins must give it one address of each lease the
// host holds (IPv4, and IPv6 in a dual-stack network), in that lease and
// with its length; the node has them as Addr and Addr6.
func (c cniHost) cniAdd(ctx context.Context, t *testing.T, b *testbed.Bed, cnitool, cniPath, suffix string) (*testbed.Node, string, netip.Addr) {
	t.Helper()
	env, err := c.h.SubnetEnv()
	if err != nil {
		t.Fatal(err)
	}
	ns := addNetns(ctx, t, b, suffix)
	path := "/run/netns/" + ns
	out, err := c.cnitool(ctx, t, cnitool, cniPath, "add", path)
	if err != nil {
		t.Fatalf("host %s: cnitool add (%s): %v\n%s", c.h.Name, c.confDir, err, out)
	}
	var res struct {
		IPs []struct{ Address string } `json:"ips"`
	}
	want := 1
	if env.IPv6Subnet.IsValid() {
		want = 2
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.IPs) != want {
		t.Fatalf("host %s: cnitool add printed %q (%v): want %d address(es)", c.h.Name, out, err, want)
	}
	ctr := &testbed.Node{Name: suffix, NS: ns}
	for _, ip := range res.IPs {
		p, err := netip.ParsePrefix(ip.Address)
		switch {
		case err != nil:
			t.Fatalf("host %s: address %q: %v", c.h.Name, ip.Address, err)
		case p.Addr().Is4() && env.Lease().Contains(p.Addr()) && p.Bits() == env.Lease().Bits():
			ctr.Addr = p.Addr()
		case p.Addr().Is6() && env.IPv6Subnet.IsValid() && env.IPv6Lease().Contains(p.Addr()) && p.Bits() == env.IPv6Lease().Bits():
			ctr.Addr6 = p.Addr()
		default:
			t.Fatalf("host %s: container address %s is in no lease of the host (%s, %s)", c.h.Name, p, env.Lease(), env.IPv6Subnet)
		}
	}
	if !ctr.Addr.IsValid() || (env.IPv6Subnet.IsValid() && !ctr.Addr6.IsValid()) {
		t.Fatalf("host %s: addresses %v: want one of each lease", c.h.Name, res.IPs)
	}
	return ctr, path, ctr.Addr
}

// wantContainerRoute checks that container namespace ns (of host) routes
// network via gw.
func wantContainerRoute(ctx context.Context, t *testing.T, host, ns string, network netip.Prefix, gw netip.Addr) {
	t.Helper()
	family := "-4"
	if network.Addr().Is6() {
		family = "-6"
	}
	routes, _ := testbed.Exec(ctx, ns, "ip", family, "route")
	if !strings.Contains(routes, network.String()+" via "+gw.String()) {
		t.Errorf("host %s: container routes lack %s via %s:\n%s", host, network, gw, routes)
	}
}

// cniTestSetup builds the plugins directory (our tulle-cni, Debian's
// plugins) and cnitool, and returns cnitool's path and CNI_PATH.
func cniTestSetup(t *testing.T) (cnitool, cniPath string) {
	t.Helper()
	testbed.RequireRoot(t)
	for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
		requireTool(t, filepath.Join(debianCNIDir, p))
	}
	cnitool = buildTool(t, "github.com/containernetworking/cni/cnitool")
	binDir := t.TempDir()
	if err := os.Symlink(buildTool(t, "./cmd/tulle-cni"), filepath.Join(binDir, "tulle-cni")); err != nil {
		t.Fatal(err)
	}
	return cnitool, binDir + ":" + debianCNIDir
}

// cniBed starts a CNI test: cnitool and the plugin path (cniTestSetup),
// a bed of hosts hosts whose network config is config (tulled not
// started), and a context of 3 minutes, cancelled when the test ends,
// before the bed is torn down.
func cniBed(t *testing.T, hosts int, config string) (ctx context.Context, b *testbed.Bed, cnitool, cniPath string) {
	t.Helper()
	cnitool, cniPath = cniTestSetup(t)
	b = testbed.NewT(t, testbed.Options{Hosts: hosts})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	if err := b.WriteNetworkConfig(ctx, config); err != nil {
		t.Fatal(err)
	}
	return ctx, b, cnitool, cniPath
}

// TestKubernetesAndMesosContainersShareTheLeaseOnOneHost: both shipped
// configs on one host, as README says they may be. A lease is one /24
// behind one bridge: with a bridge each, both bridges would claim the
// lease's first address and containers behind one of them would be
// unreachable. Both use cni0 and one host-local pool (both networks are
// named tulle), so their containers get distinct addresses and are
// reachable from another host and from each other.
func TestKubernetesAndMesosContainersShareTheLeaseOnOneHost(t *testing.T) {
	ctx, b, cnitool, cniPath := cniBed(t, 2, testbed.DefaultNetworkConfig)
	for _, h := range b.Hosts {
		if _, err := h.StartTulled(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Host(2).SetupContainer(ctx); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(t.TempDir(), "h1")
	k8s := stageCNIConf(t, b.Host(1), root, "cni/10-tulle.conflist", nil)
	mesos := stageCNIConf(t, b.Host(1), root, "cni/tulle-mesos.conf", nil)
	if k8s.dataDir == mesos.dataDir {
		t.Errorf("both configs keep tulle-cni's saved configs in %s: Kubernetes' GC would delete Mesos' attachments", k8s.dataDir)
	}
	k, kPath, _ := k8s.cniAdd(ctx, t, b, cnitool, cniPath, "k8s")
	m, mPath, _ := mesos.cniAdd(ctx, t, b, cnitool, cniPath, "mesos")
	if k.Addr == m.Addr {
		t.Fatalf("both containers got %s", k.Addr)
	}
	remote := &b.Host(2).Container().Node
	for _, dst := range []*testbed.Node{k, m} {
		if _, err := remote.WaitReachable(ctx, dst.Addr, 10*time.Second); err != nil {
			t.Errorf("%s container %s from host 2's container: %v", dst.Name, dst.Addr, err)
		}
	}
	if _, err := k.Ping(ctx, m.Addr, 2); err != nil {
		t.Errorf("Kubernetes container to Mesos container: %v", err)
	}
	for _, c := range []struct {
		h    cniHost
		path string
	}{{k8s, kPath}, {mesos, mPath}} {
		if out, err := c.h.cnitool(ctx, t, cnitool, cniPath, "del", c.path); err != nil {
			t.Errorf("cnitool del (%s): %v\n%s", c.h.confDir, err, out)
		}
	}
}

// TestCNI110StatusAddAndGCWithDebianPlugins runs a network at CNI 1.1.0
// (the shipped conflist at cniVersion 1.1.0, without portmap, which
// Debian 12's v1.1.1 does not speak at 1.1.0) through the real cnitool:
// STATUS fails with "plugin not available" until tulled writes
// subnet.env, ADD works although Debian's bridge and host-local speak at
// most 1.0.0 (tulle-cni talks to them at that), and GC deletes a gone
// container's attachment that the runtime no longer knows: the address
// is free again and the saved config is gone. (tulled masquerades here:
// the bridge plugin, told to masquerade, can remove its rule only through
// the container's namespace, on GC as on any DEL after the namespace went.)
func TestCNI110StatusAddAndGCWithDebianPlugins(t *testing.T) {
	ctx, b, cnitool, cniPath := cniBed(t, 1, testbed.DefaultNetworkConfig)
	c := stageCNIConf(t, b.Host(1), filepath.Join(t.TempDir(), "h1"), "cni/10-tulle.conflist", func(conf, plugin map[string]any) {
		conf["cniVersion"] = "1.1.0"
		conf["plugins"] = []any{plugin}
	})

	out, err := c.cnitool(ctx, t, cnitool, cniPath, "status", "/run/netns/none")
	if err == nil || !strings.Contains(out, "tulle-cni: read "+c.subnetFile+": no such file; is tulled running?") {
		t.Errorf("cnitool status before tulled ran: %v\n%s", err, out)
	}
	if _, err := b.Host(1).StartTulled(ctx, "--ip-masq"); err != nil {
		t.Fatal(err)
	}
	if out, err := c.cnitool(ctx, t, cnitool, cniPath, "status", "/run/netns/none"); err != nil {
		t.Errorf("cnitool status with tulled running: %v\n%s", err, out)
	}

	ctr, path, addr := c.cniAdd(ctx, t, b, cnitool, cniPath, "gone")
	env, err := c.h.SubnetEnv()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ctr.Ping(ctx, env.Subnet.Addr(), 1); err != nil {
		t.Errorf("container to its gateway on cni0: %v", err)
	}
	reservation := filepath.Join(c.ipamDir, "tulle", addr.String())
	saved := filepath.Join(c.dataDir, cnitoolContainerID(path)+"@eth0.json")
	for _, f := range []string{reservation, saved} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("after ADD: %v", err)
		}
	}
	// The container goes without a DEL, and the runtime forgets it (here:
	// libcni's cache of it goes), so only tulle-cni's GC can clean up.
	if out, err := tools.Command(ctx, "ip", "netns", "del", ctr.NS).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del: %v\n%s", err, out)
	}
	if err := os.Remove(cnitoolCacheFile(path)); err != nil {
		t.Fatal(err)
	}
	if out, err := c.cnitool(ctx, t, cnitool, cniPath, "gc", "/run/netns/none"); err != nil {
		t.Fatalf("cnitool gc: %v\n%s", err, out)
	}
	for _, f := range []string{reservation, saved} {
		if _, err := os.Stat(f); err == nil {
			t.Errorf("after GC: %s is still there", f)
		}
	}
	if out, _ := c.h.Exec(ctx, "ip", "-o", "link", "show", "type", "veth"); strings.Contains(out, "master") {
		t.Errorf("a container veth is left on the bridge after GC:\n%s", out)
	}
}
