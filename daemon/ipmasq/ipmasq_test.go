package ipmasq

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tulle-net/tulle/tests/nstest"
	"github.com/tulle-net/tulle/tests/tools"
)

var (
	network = netip.MustParsePrefix("198.18.0.0/16")
	lease   = netip.MustParsePrefix("198.18.79.0/24")
)

// inNetns runs the calling test again inside a fresh network namespace (so
// iptables, forked from any goroutine, only ever touches that namespace)
// and reports whether the caller is that inner run.
func inNetns(t *testing.T) bool {
	t.Helper()
	if nstest.InChild() {
		return true
	}
	ns := nstest.NewNetns(t)
	ns.RunTestInNetns(t, t.Name())
	return false
}

// natS lists chain of the nat table with tool (iptables or ip6tables).
func natS(t *testing.T, tool, chain string) string {
	t.Helper()
	out, err := tools.Command(context.Background(), tool, "-w", "-t", "nat", "-S", chain).CombinedOutput()
	if err != nil {
		t.Fatalf("%s -t nat -S %s: %v\n%s", tool, chain, err, out)
	}
	return string(out)
}

func chainExists(t *testing.T) bool {
	t.Helper()
	return tools.Command(context.Background(), "iptables", "-w", "-t", "nat", "-S", Chain).Run() == nil
}

// mustNew is New(network, lease, nil), which must succeed.
func mustNew(t *testing.T, network, lease netip.Prefix) *Rules {
	t.Helper()
	r, err := New(network, lease, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func mustEnsure(t *testing.T, r *Rules, wantChanged bool) {
	t.Helper()
	changed, err := r.Ensure()
	if err != nil {
		t.Fatal(err)
	}
	if changed != wantChanged {
		t.Fatalf("Ensure changed=%v, want %v", changed, wantChanged)
	}
}

// wantRules checks the IPv4 chain holds flannel's rules for our network
// and lease and that POSTROUTING jumps to it first.
func wantRules(t *testing.T, r *Rules) {
	t.Helper()
	wantRulesIn(t, r, "iptables", "198.18.0.0/16", "198.18.79.0/24", "224.0.0.0/4")
}

// wantRulesIn checks that tool's nat chain holds flannel's rules for
// network and lease (mcast the family's multicast range) and that tool's
// POSTROUTING jumps to it first.
func wantRulesIn(t *testing.T, r *Rules, tool, network, lease, mcast string) {
	t.Helper()
	got := natS(t, tool, Chain)
	masq := "-j MASQUERADE"
	if r.ipt.HasRandomFully() {
		masq += " --random-fully"
	}
	c := `-m comment --comment "tulle masq"`
	want := []string{
		"-N " + Chain,
		"-A " + Chain + " -m mark --mark 0x4000/0x4000 " + c + " -j RETURN",
		"-A " + Chain + " -s " + network + " -d " + network + " " + c + " -j RETURN",
		"-A " + Chain + " -s " + network + " ! -d " + mcast + " " + c + " " + masq,
		"-A " + Chain + " ! -s " + network + " -d " + lease + " " + c + " -j RETURN",
		"-A " + Chain + " ! -s " + network + " -d " + network + " " + c + " " + masq,
	}
	if strings.TrimSpace(got) != strings.Join(want, "\n") {
		t.Errorf("%s chain %s:\n%s\nwant:\n%s", tool, Chain, got, strings.Join(want, "\n"))
	}
	post := strings.Split(strings.TrimSpace(natS(t, tool, "POSTROUTING")), "\n")
	if len(post) < 2 || post[1] != "-A POSTROUTING "+c+" -j "+Chain {
		t.Errorf("%s POSTROUTING does not jump to %s first:\n%s", tool, Chain, strings.Join(post, "\n"))
	}
}

func TestEnsureInstallsFlannelRulesAndRemoveDeletesThem(t *testing.T) {
	if !inNetns(t) {
		return
	}
	// Someone else's rule in POSTROUTING must stay, and ours must go first.
	if out, err := tools.Command(context.Background(), "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", "198.51.100.0/24", "-j", "RETURN").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	r := mustNew(t, network, lease)
	mustEnsure(t, r, true)
	wantRules(t, r)
	mustEnsure(t, r, false) // idempotent

	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	if chainExists(t) {
		t.Errorf("chain %s still there after Remove", Chain)
	}
	post := natS(t, "iptables", "POSTROUTING")
	if strings.Contains(post, Chain) || !strings.Contains(post, "-s 198.51.100.0/24 -j RETURN") {
		t.Errorf("POSTROUTING after Remove:\n%s", post)
	}
	if err := r.Remove(); err != nil {
		t.Errorf("second Remove: %v", err)
	}
}

func TestEnsurePutsBackDeletedRules(t *testing.T) {
	if !inNetns(t) {
		return
	}
	r := mustNew(t, network, lease)
	mustEnsure(t, r, true)
	t.Cleanup(func() { _ = r.Remove() })

	for _, damage := range [][]string{
		append([]string{"-D", Chain}, r.Specs()[2]...),                            // one rule gone
		{"-D", "POSTROUTING", "-m", "comment", "--comment", Comment, "-j", Chain}, // the jump gone
		{"-A", Chain, "-j", "RETURN"},                                             // a stranger's rule added
		{"-F", Chain},                                                             // flushed
	} {
		if out, err := tools.Command(context.Background(), "iptables", append([]string{"-w", "-t", "nat"}, damage...)...).CombinedOutput(); err != nil {
			t.Fatalf("iptables %v: %v: %s", damage, err, out)
		}
		mustEnsure(t, r, true)
		wantRules(t, r)
	}
	// Chain and jump both gone (iptables -t nat -F; -X).
	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	mustEnsure(t, r, true)
	wantRules(t, r)
}

func TestKeepReassertsPeriodically(t *testing.T) {
	if !inNetns(t) {
		return
	}
	r := mustNew(t, network, lease)
	mustEnsure(t, r, true)
	t.Cleanup(func() { _ = r.Remove() })

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); r.Keep(ctx, 100*time.Millisecond) }()
	defer func() { cancel(); wg.Wait() }()

	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !chainExists(t) || !strings.Contains(natS(t, "iptables", "POSTROUTING"), Chain) {
		if time.Now().After(deadline) {
			t.Fatal("rules not put back within 5s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	wantRules(t, r)
}
