package integrations

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/testbed"
)

// TestCNIGivesContainersBothFamiliesInADualStackNetwork: the real
// cnitool, Debian's plugins and tulle-cni with the shipped conflist, on two
// hosts of a dual-stack network (real tulled): each container gets an
// address of each of its host's leases and routes to both networks, the
// containers reach each other over IPv6 and IPv4, and DEL frees both
// addresses.
func TestCNIGivesContainersBothFamiliesInADualStackNetwork(t *testing.T) {
	ctx, b, cnitool, cniPath := cniBed(t, 2, testbed.DualStackNetworkConfig)
	for _, h := range b.Hosts {
		if _, err := h.StartTulled(ctx, "--ip-masq"); err != nil {
			t.Fatal(err)
		}
	}
	root := t.TempDir()
	var ctrs []*testbed.Node
	var paths []string
	var hosts []cniHost
	for i, h := range b.Hosts {
		c := stageCNIConf(t, h, filepath.Join(root, h.Name), "cni/10-tulle.conflist", nil)
		hosts = append(hosts, c)
		env, err := h.SubnetEnv()
		if err != nil {
			t.Fatal(err)
		}
		if !env.IPv6Subnet.IsValid() {
			t.Fatalf("host %s: subnet.env without FLANNEL_IPV6_SUBNET", h.Name)
		}
		ctr, path, _ := c.cniAdd(ctx, t, b, cnitool, cniPath, fmt.Sprintf("d%d", i+1))
		wantContainerRoute(ctx, t, h.Name, ctr.NS, env.IPv6Network, env.IPv6Subnet.Addr())
		wantContainerRoute(ctx, t, h.Name, ctr.NS, env.Network, env.Subnet.Addr())
		ctrs, paths = append(ctrs, ctr), append(paths, path)
	}

	for _, p := range [][2]*testbed.Node{{ctrs[0], ctrs[1]}, {ctrs[1], ctrs[0]}} {
		for _, dst := range []netip.Addr{p[1].Addr6, p[1].Addr} {
			if _, err := p[0].WaitReachable(ctx, dst, 10*time.Second); err != nil {
				t.Fatal(err)
			}
			if _, err := p[0].Ping(ctx, dst, 3); err != nil {
				t.Error(err)
			}
		}
	}
	if _, err := testbed.TransferTCPTo(ctx, ctrs[0], ctrs[1], ctrs[1].Addr6, 4<<20); err != nil {
		t.Error(err)
	}

	for i, c := range hosts {
		if out, err := c.cnitool(ctx, t, cnitool, cniPath, "del", paths[i]); err != nil {
			t.Errorf("host %s: cnitool del: %v\n%s", c.h.Name, err, out)
		}
		for _, a := range []netip.Addr{ctrs[i].Addr, ctrs[i].Addr6} {
			if _, err := os.Stat(filepath.Join(c.ipamDir, "tulle", a.String())); err == nil {
				t.Errorf("host %s: host-local still reserves %s after DEL", c.h.Name, a)
			}
		}
		assertNothingLeft(ctx, t, c, ctrs[i].NS, paths[i])
	}
}
