package ipmasq

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/tulle-net/tulle/tests/tools"
)

var (
	network6 = netip.MustParsePrefix("2001:db8:1::/48")
	lease6   = netip.MustParsePrefix("2001:db8:1:4f::/64")
)

// In a dual-stack network the IPv6 rules are flannel's, with the IPv6
// network and lease and IPv6 multicast, in ip6tables' nat table; the IPv4
// rules are untouched by them, and each set comes and goes on its own.
func TestIPv6RulesAreFlannelsInIP6Tables(t *testing.T) {
	if !inNetns(t) {
		return
	}
	r4 := mustNew(t, network, lease)
	r6 := mustNew(t, network6, lease6)
	if r4.Family() != "IPv4" || r6.Family() != "IPv6" {
		t.Fatalf("families %s, %s", r4.Family(), r6.Family())
	}
	mustEnsure(t, r4, true)
	mustEnsure(t, r6, true)
	mustEnsure(t, r6, false) // idempotent
	wantRules(t, r4)
	wantRulesIn(t, r6, "ip6tables", "2001:db8:1::/48", "2001:db8:1:4f::/64", "ff00::/8")

	// Damage to the IPv6 set is repaired by its own Ensure.
	if out, err := tools.Command(context.Background(), "ip6tables", "-w", "-t", "nat", "-F", Chain).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	mustEnsure(t, r4, false)
	mustEnsure(t, r6, true)

	if err := r6.Remove(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(natS(t, "ip6tables", "POSTROUTING"), Chain) {
		t.Error("ip6tables POSTROUTING still jumps to the chain after Remove")
	}
	wantRules(t, r4)
	if err := r4.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := New(network, lease6, nil); err == nil || !strings.Contains(err.Error(), "both IPv4 or both IPv6") {
		t.Errorf("mixed families: %v", err)
	}
}
