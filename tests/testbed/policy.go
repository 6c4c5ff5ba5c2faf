package testbed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/tulle-net/tulle/policy"
	"github.com/tulle-net/tulle/subnet"
)

// PolicyKey and NetsetKey are the etcd keys of a policy and a netset under
// the default prefix.
func PolicyKey(name string) string { return subnet.DefaultPrefix + "/policies/" + name }

// NetsetKey is the etcd key of a netset.
func NetsetKey(name string) string { return subnet.DefaultPrefix + "/netsets/" + name }

// PutKey writes value at key in the bed's etcd (directly, as an operator's
// etcdctl would: nothing validates it).
func (b *Bed) PutKey(ctx context.Context, key, value string) error {
	cli, err := b.EtcdClient()
	if err != nil {
		return err
	}
	if _, err := cli.Put(ctx, key, value); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// DeleteKey deletes key from the bed's etcd.
func (b *Bed) DeleteKey(ctx context.Context, key string) error {
	cli, err := b.EtcdClient()
	if err != nil {
		return err
	}
	if _, err := cli.Delete(ctx, key); err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	return nil
}

// AddContainerBeside adds a container on the bridge of c (same host, same
// subnet) with the address after c's: the "c2b" of the policy tests, whose
// traffic to c is bridged, not routed. tag names it as in AddContainer. In
// a dual-stack network (c has Addr6) it gets the IPv6 address after c's
// too, and a default route via the bridge's.
func (h *Host) AddContainerBeside(ctx context.Context, c *Container, tag string) (*Container, error) {
	b := h.bed
	nc := &Container{
		Node:     h.containerNode(tag, c.Addr.Next(), c.MTU),
		Gateway:  c.Gateway,
		Bridge:   c.Bridge,
		Gateway6: c.Gateway6,
	}
	if err := b.addNetns(ctx, nc.NS); err != nil {
		return nil, fmt.Errorf("host %s: container %s: %w", h.Name, nc.Name, err)
	}
	hostEnd := fmt.Sprintf("%s%sv%d", b.Prefix, tag, h.Index)
	m := strconv.Itoa(c.MTU)
	steps := [][]string{
		{"-n", h.NS, "link", "add", hostEnd, "mtu", m, "type", "veth", "peer", "name", nc.Link, "mtu", m, "netns", nc.NS},
		{"-n", h.NS, "link", "set", hostEnd, "master", c.Bridge, "up"},
		{"-n", nc.NS, "addr", "add", netip.PrefixFrom(nc.Addr, c.Gateway.Bits()).String(), "dev", nc.Link},
		{"-n", nc.NS, "link", "set", nc.Link, "up"},
		{"-n", nc.NS, "route", "add", "default", "via", c.Gateway.Addr().String(), "dev", nc.Link},
	}
	if c.Addr6.IsValid() {
		nc.Addr6 = c.Addr6.Next()
		steps = append(steps,
			[]string{"-n", nc.NS, "addr", "add", netip.PrefixFrom(nc.Addr6, c.Gateway6.Bits()).String(), "dev", nc.Link, "nodad"},
			[]string{"-n", nc.NS, "-6", "route", "add", "default", "via", c.Gateway6.Addr().String(), "dev", nc.Link})
	}
	for _, s := range steps {
		if err := ipCmd(ctx, s...); err != nil {
			return nil, fmt.Errorf("host %s: container %s: %w", h.Name, nc.Name, err)
		}
	}
	return nc, nil
}

// ServeTCP accepts (and closes at once) TCP connections on port at the
// node's address, and at its IPv6 address if it has one, until the
// returned stop is called.
func (n *Node) ServeTCP(port uint16) (stop func(), err error) {
	var lns []net.Listener
	for _, a := range []netip.Addr{n.Addr, n.Addr6} {
		if !a.IsValid() {
			continue
		}
		ln, err := n.Listen("tcp", netip.AddrPortFrom(a, port).String())
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, err
		}
		lns = append(lns, ln)
	}
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Go(func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		})
	}
	return func() {
		for _, ln := range lns {
			ln.Close()
		}
		wg.Wait()
	}, nil
}

// ErrConnectTimedOut is a connect that nothing answered: what a policy
// drop looks like.
var ErrConnectTimedOut = errors.New("connect timed out")

// Connect opens (and closes) a TCP connection from the node to dst:port
// within timeout: nil when it connected, ErrConnectTimedOut (wrapped) when
// nothing answered, another error (refused, unreachable) otherwise.
func (n *Node) Connect(ctx context.Context, dst netip.Addr, port uint16, timeout time.Duration) error {
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := n.Dial(cctx, "tcp", netip.AddrPortFrom(dst, port).String())
	if err == nil {
		return c.Close()
	}
	var ne net.Error
	if ctx.Err() == nil && (errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())) {
		return fmt.Errorf("%s -> %s:%d: %w", n.Name, dst, port, ErrConnectTimedOut)
	}
	return fmt.Errorf("%s -> %s:%d: %w", n.Name, dst, port, err)
}

// PolicyTable reads Tulle's nftables table in the host's namespace through
// the library (no nft program): nil when the host has none.
func (h *Host) PolicyTable() (*policy.Installed, error) {
	f, err := os.Open("/run/netns/" + h.NS)
	if err != nil {
		return nil, fmt.Errorf("host %s: %w", h.Name, err)
	}
	defer f.Close()
	inst, err := policy.NewEnforcer(int(f.Fd())).Read()
	if err != nil {
		return nil, fmt.Errorf("host %s: %w", h.Name, err)
	}
	return inst, nil
}

// PolicySet returns the ranges of a set of the host's table ("first-last"
// strings, sorted), nil when there is no such set or no table.
func (h *Host) PolicySet(name string) ([]string, error) {
	inst, err := h.PolicyTable()
	if err != nil || inst == nil {
		return nil, err
	}
	return inst.Sets[name], nil
}
