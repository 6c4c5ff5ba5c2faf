// Package nstest holds the helpers of root-only unit tests in network
// namespaces they create: the root guard every such test calls, anonymous
// namespaces, named ones with veth pairs. (tests/testbed builds the full
// two-host testbed on top of this for the end-to-end tests.)
package nstest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/tests/tools"
)

// EnvRequireRoot, set to 1 (as CI does), turns RequireRoot's skip into a
// failure, so a run can never pass with the root-only tests skipped.
const EnvRequireRoot = "TULLE_REQUIRE_ROOT_TESTS"

// RequireRoot skips t with the reason unless the process can make network
// namespaces and TUN devices (root, /dev/net/tun); with
// TULLE_REQUIRE_ROOT_TESTS=1 it fails t instead.
func RequireRoot(t testing.TB) {
	t.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "needs root (network namespaces, veth, TUN devices)"
	} else if _, err := os.Stat("/dev/net/tun"); err != nil {
		why = "needs /dev/net/tun: " + err.Error()
	}
	if why == "" {
		return
	}
	SkipMissing(t, why)
}

// SkipMissing skips t because the machine lacks something the test needs
// (a kernel feature, a tool), or fails it when TULLE_REQUIRE_ROOT_TESTS=1:
// CI must run every test, not count a skipped one as passed.
func SkipMissing(t testing.TB, why string) {
	t.Helper()
	if os.Getenv(EnvRequireRoot) == "1" {
		t.Fatalf("%s, and %s=1 forbids skipping", why, EnvRequireRoot)
	}
	t.Skip(why)
}

// EnterNewNetns moves the test goroutine, locked to its OS thread, into a
// new anonymous network namespace for the rest of the test, with lo up and
// IPv6 off on new links (router solicitations and MLD reports would show up
// in TUN reads at random times). Every socket, TUN device and netlink call
// made from this goroutine lives there. The namespace has no name, so
// nothing is left behind: it goes with its last socket or device. The
// thread stays locked and is discarded with the test goroutine.
func EnterNewNetns(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatalf("get current netns: %v", err)
	}
	ns, err := netns.New()
	if err != nil {
		orig.Close()
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() {
		netns.Set(orig)
		orig.Close()
		ns.Close()
	})
	if err := prepareNew(); err != nil {
		t.Fatal(err)
	}
}

// NewAnonNetns makes an anonymous network namespace, prepared as
// EnterNewNetns prepares its own, without entering it: run code in it with
// In. It has no name, so nothing is left behind; its handle is closed in
// t.Cleanup and it goes with its last socket or device.
func NewAnonNetns(t testing.TB) netns.NsHandle {
	t.Helper()
	RequireRoot(t)
	var h netns.NsHandle
	errc := make(chan error, 1)
	go func() { // the thread ends in the new namespace and is discarded
		runtime.LockOSThread()
		var err error
		if h, err = netns.New(); err != nil {
			errc <- fmt.Errorf("new netns: %w", err)
			return
		}
		errc <- prepareNew()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// In runs fn on a new OS thread inside ns. The thread stays locked and is
// discarded with its goroutine, so no other goroutine ever runs in ns by
// accident. Sockets, TUN devices and netlink handles fn makes live in ns.
func In(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// prepareNew readies the new namespace the calling thread is in: lo up,
// IPv6 off on new links.
func prepareNew() error {
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("loopback up: %w", err)
	}
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/default/disable_ipv6", []byte("1"), 0o644); err != nil {
		return fmt.Errorf("disable IPv6 on new links: %w", err)
	}
	return nil
}

var seq atomic.Int64

// Name is a per-run name for a namespace or link: "tl<pid><suffix><n>",
// cut to the 15 characters of an interface name.
func Name(suffix string) string {
	n := fmt.Sprintf("tl%d%s%d", os.Getpid()%100000, suffix, seq.Add(1))
	if len(n) > 15 {
		n = n[len(n)-15:]
	}
	return n
}

// Netns is a named network namespace a test created.
type Netns struct {
	Name   string
	Handle *netlink.Handle // netlink inside the namespace
	ns     netns.NsHandle
}

// NewNetns creates a named network namespace (visible to `ip netns exec`)
// with loopback up, deleted in t.Cleanup.
func NewNetns(t testing.TB) *Netns {
	t.Helper()
	RequireRoot(t)
	name := Name("n")
	var (
		ns  netns.NsHandle
		err error
	)
	func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		orig, gerr := netns.Get()
		if gerr != nil {
			err = gerr
			return
		}
		defer orig.Close()
		ns, err = netns.NewNamed(name)
		if serr := netns.Set(orig); serr != nil && err == nil {
			err = serr
		}
	}()
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		_ = netns.DeleteNamed(name)
		t.Fatalf("netlink handle in %s: %v", name, err)
	}
	n := &Netns{Name: name, Handle: h, ns: ns}
	t.Cleanup(func() {
		h.Close()
		ns.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("loopback up in %s: %v", name, err)
	}
	return n
}

// Run runs a command inside the namespace (ip netns exec) and returns its
// combined output; it fails t on error.
func (n *Netns) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := n.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns exec %s %s %s: %v\n%s", n.Name, name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Command is an exec.Cmd running inside the namespace.
func (n *Netns) Command(name string, args ...string) *exec.Cmd {
	return tools.Command(context.Background(), "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// childEnv marks a test binary re-executed inside a namespace.
const childEnv = "TULLE_NSTEST_CHILD"

// InChild reports whether this process is the re-executed copy that
// RunTestInNetns started.
func InChild() bool { return os.Getenv(childEnv) != "" }

// RunTestInNetns re-executes the test binary inside the namespace, running
// only the test named test (the caller, which checks InChild() to know
// which side it is on), and fails t with the child's output if it fails.
// Use it for code that forks programs (iptables) from goroutines of its own,
// which a thread-local namespace switch would not cover.
func (n *Netns) RunTestInNetns(t testing.TB, test string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := n.Command(exe, "-test.run=^"+test+"$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s in netns %s: %v\n%s", test, n.Name, err, out)
	}
	if testing.Verbose() {
		t.Logf("child output:\n%s", out)
	}
}

// AddUnderlay gives the namespace an underlay: a veth pair with addr (CIDR,
// e.g. "192.0.2.1/24") and mtu on one end, both ends up, and a default route
// via gw on it. It returns the name of the addressed end.
func (n *Netns) AddUnderlay(t testing.TB, addr string, mtu int, gw string) string {
	t.Helper()
	a, b := Name("u"), Name("v")
	if err := n.Handle.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a, MTU: mtu}, PeerName: b}); err != nil {
		t.Fatalf("veth %s/%s in %s: %v", a, b, n.Name, err)
	}
	la, err := n.Handle.LinkByName(a)
	if err != nil {
		t.Fatal(err)
	}
	lb, err := n.Handle.LinkByName(b)
	if err != nil {
		t.Fatal(err)
	}
	ad, err := netlink.ParseAddr(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Handle.AddrAdd(la, ad); err != nil {
		t.Fatalf("address %s on %s: %v", addr, a, err)
	}
	for _, l := range []netlink.Link{la, lb} {
		if err := n.Handle.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	if gw != "" {
		if err := n.Handle.RouteAdd(&netlink.Route{LinkIndex: la.Attrs().Index, Gw: net.ParseIP(gw)}); err != nil {
			t.Fatalf("default route via %s: %v", gw, err)
		}
	}
	return a
}

// Veth links n to other with a veth pair: the end in n gets addr, the end
// in other gets otherAddr (CIDRs; "" for none); both up. An IPv6 address
// skips duplicate address detection, so it is usable at once. It returns
// the names of the two ends.
func (n *Netns) Veth(t testing.TB, addr string, other *Netns, otherAddr string) (string, string) {
	t.Helper()
	a, b := Name("a"), Name("b")
	if err := n.Handle.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a}, PeerName: b, PeerNamespace: netlink.NsFd(int(other.ns))}); err != nil {
		t.Fatalf("veth %s (%s) to %s (%s): %v", a, n.Name, b, other.Name, err)
	}
	for _, end := range []struct {
		h    *netlink.Handle
		name string
		addr string
	}{{n.Handle, a, addr}, {other.Handle, b, otherAddr}} {
		l, err := end.h.LinkByName(end.name)
		if err != nil {
			t.Fatal(err)
		}
		if end.addr != "" {
			ad, err := netlink.ParseAddr(end.addr)
			if err != nil {
				t.Fatal(err)
			}
			if ad.IP.To4() == nil {
				ad.Flags = unix.IFA_F_NODAD
			}
			if err := end.h.AddrAdd(l, ad); err != nil {
				t.Fatalf("address %s on %s: %v", end.addr, end.name, err)
			}
		}
		if err := end.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	return a, b
}

// DefaultRoute adds a default route via gw (which must be on a connected
// network of the namespace).
func (n *Netns) DefaultRoute(t testing.TB, gw string) {
	t.Helper()
	if err := n.Handle.RouteAdd(&netlink.Route{Gw: net.ParseIP(gw)}); err != nil {
		t.Fatalf("default route via %s in %s: %v", gw, n.Name, err)
	}
}

// Do runs fn with the calling goroutine's thread inside the namespace
// named name (sockets fn opens stay in it), then switches back.
func Do(name string, fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return err
	}
	defer orig.Close()
	ns, err := netns.GetFromName(name)
	if err != nil {
		return fmt.Errorf("netns %s: %w", name, err)
	}
	defer ns.Close()
	if err := netns.Set(ns); err != nil {
		return fmt.Errorf("enter netns %s: %w", name, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// This thread is in the wrong namespace: never give it back.
		runtime.LockOSThread()
		return errors.Join(ferr, fmt.Errorf("leave netns %s: %w", name, err))
	}
	return ferr
}
