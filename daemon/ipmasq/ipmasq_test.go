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

func iptablesS(t *testing.T, chain string) string {
	t.Helper()
	out, err := tools.Command(context.Background(), "iptables", "-w", "-t", "nat", "-S", chain).CombinedOutput()
	if err != nil {
		t.Fatalf("iptables -t nat -S %s: %v\n%s", chain, err, out)
	}
	return string(out)
}

func chainExists(t *testing.T) bool {
	t.Helper()
	return tools.Command(context.Background(), "iptables", "-w", "-t", "nat", "-S", Chain).Run() == nil
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

// wantRules checks the chain holds flannel's rules for our network and lease
// and that POSTROUTING jumps to it first.
func wantRules(t *testing.T, r *Rules) {
	t.Helper()
	got := iptablesS(t, Chain)
	masq := "-j MASQUERADE"
	if r.ipt.HasRandomFully() {
		masq += " --random-fully"
	}
	c := `-m comment --comment "tulle masq"`
	want := []string{
		"-N " + Chain,
		"-A " + Chain + " -m mark --mark 0x4000/0x4000 " + c + " -j RETURN",
		"-A " + Chain + " -s 198.18.0.0/16 -d 198.18.0.0/16 " + c + " -j RETURN",
		"-A " + Chain + " -s 198.18.0.0/16 ! -d 224.0.0.0/4 " + c + " " + masq,
		"-A " + Chain + " ! -s 198.18.0.0/16 -d 198.18.79.0/24 " + c + " -j RETURN",
		"-A " + Chain + " ! -s 198.18.0.0/16 -d 198.18.0.0/16 " + c + " " + masq,
	}
	if strings.TrimSpace(got) != strings.Join(want, "\n") {
		t.Errorf("chain %s:\n%s\nwant:\n%s", Chain, got, strings.Join(want, "\n"))
	}
	post := strings.Split(strings.TrimSpace(iptablesS(t, "POSTROUTING")), "\n")
	if len(post) < 2 || post[1] != "-A POSTROUTING "+c+" -j "+Chain {
		t.Errorf("POSTROUTING does not jump to %s first:\n%s", Chain, strings.Join(post, "\n"))
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
	r, err := New(network, lease, nil)
	if err != nil {
		t.Fatal(err)
	}
	mustEnsure(t, r, true)
	wantRules(t, r)
	mustEnsure(t, r, false) // idempotent

	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	if chainExists(t) {
		t.Errorf("chain %s still there after Remove", Chain)
	}
	post := iptablesS(t, "POSTROUTING")
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
	r, err := New(network, lease, nil)
	if err != nil {
		t.Fatal(err)
	}
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
	r, err := New(network, lease, nil)
	if err != nil {
		t.Fatal(err)
	}
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
	for !chainExists(t) || !strings.Contains(iptablesS(t, "POSTROUTING"), Chain) {
		if time.Now().After(deadline) {
			t.Fatal("rules not put back within 5s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	wantRules(t, r)
}
