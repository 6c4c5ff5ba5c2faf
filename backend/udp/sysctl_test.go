package udp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/tests/nstest"
)

// readOnlyProcSys gives the calling thread (locked, in a namespace of
// nstest.In, and discarded afterwards) a mount namespace of its own in
// which /proc/sys is a read-only bind mount of itself, as containers and
// sandboxes mount it, and checks that a write there fails.
func readOnlyProcSys() error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("unshare mount namespace: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	if err := unix.Mount("/proc/sys", "/proc/sys", "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind /proc/sys: %w", err)
	}
	if err := unix.Mount("", "/proc/sys", "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("remount /proc/sys read-only: %w", err)
	}
	err := os.WriteFile("/proc/sys/net/ipv6/conf/default/disable_ipv6", []byte("0"), 0)
	if !errors.Is(err, unix.EROFS) {
		return fmt.Errorf("a write to the read-only /proc/sys: %v, want EROFS", err)
	}
	return nil
}

// TestDualStackStartsUnderAReadOnlyProcSys: in a network namespace whose
// new devices have IPv6 on and forwarding off (a host that does not
// forward IPv6 yet), every IPv6 setting the data plane wants on its TUN
// device is right already, so a read-only /proc/sys does not stop a
// dual-stack start: nothing is written. The device gets its IPv6 address
// and route, and the kernel sends nothing into it by itself.
func TestDualStackStartsUnderAReadOnlyProcSys(t *testing.T) {
	ns := nstest.NewAnonNetns(t)
	name := nstest.Name("ro")
	logs := &logBuffer{}
	var b *Backend
	err := nstest.In(ns, func() error {
		// nstest turns IPv6 off on new links; a host's default is on.
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/default/disable_ipv6", []byte("0"), 0); err != nil {
			return err
		}
		if err := readOnlyProcSys(); err != nil {
			return err
		}
		opts := Options{
			TunName:   name,
			Workers:   1,
			Port:      subnet.DefaultPort,
			PublicIP:  hostA,
			MTU:       1500 - proto.EncapOverhead,
			Network:   network,
			SubnetLen: 24,
			Lease:     subnet.Lease{Subnet: leaseA, Attrs: subnet.LeaseAttrs{PublicIP: hostA}},
			Logger:    slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		}
		dualStack(&opts)
		var err error
		b, err = New(opts)
		return err
	})
	if err != nil {
		t.Fatalf("New under a read-only /proc/sys: %v\n%s", err, logs.String())
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})

	err = nstest.In(ns, func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		if l.Attrs().RawFlags&unix.IFF_MULTICAST != 0 {
			return fmt.Errorf("%s has multicast on", name)
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			return err
		}
		if want := netip.PrefixFrom(leaseA6.Addr(), 128).String(); len(addrs) != 1 || addrs[0].IPNet.String() != want {
			return fmt.Errorf("IPv6 addresses of %s: %v, want only %s", name, addrs, want)
		}
		rs, err := netlink.RouteGet(netip.MustParseAddr("2001:db8:1:2::9").AsSlice())
		if err != nil || len(rs) != 1 || rs[0].LinkIndex != l.Attrs().Index {
			return fmt.Errorf("route to another host's IPv6 lease: %v %v, want dev %s", rs, err, name)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The kernel's first solicitations and reports go when the link comes
	// up and repeat within about a second: none may come.
	for deadline := time.Now().Add(1500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if tx, _ := tunStats(t, ns, name); tx != 0 {
			t.Fatalf("the kernel sent %d packets into %s by itself", tx, name)
		}
	}
}
