package testbed

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// SubnetEnv is flannel's subnet.env as tulled writes it for Docker and CNI.
type SubnetEnv struct {
	Network netip.Prefix // FLANNEL_NETWORK, e.g. 198.18.0.0/16
	Subnet  netip.Prefix // FLANNEL_SUBNET, e.g. 198.18.1.1/24 (the bridge address)
	MTU     int          // FLANNEL_MTU
	IPMasq  bool         // FLANNEL_IPMASQ
	// In a dual-stack network (zero otherwise):
	IPv6Network netip.Prefix // FLANNEL_IPV6_NETWORK, e.g. 2001:db8:1::/48
	IPv6Subnet  netip.Prefix // FLANNEL_IPV6_SUBNET, e.g. 2001:db8:1:1::1/64 (the bridge address)
}

// Lease is the lease subnet (FLANNEL_SUBNET masked), e.g. 198.18.1.0/24.
func (e SubnetEnv) Lease() netip.Prefix { return e.Subnet.Masked() }

// IPv6Lease is the IPv6 lease (FLANNEL_IPV6_SUBNET masked), zero if none.
func (e SubnetEnv) IPv6Lease() netip.Prefix { return e.IPv6Subnet.Masked() }

// ReadSubnetEnv parses a subnet.env file. It is the test's own reading of
// the format (independent of package subnet) and requires FLANNEL_NETWORK,
// FLANNEL_SUBNET and FLANNEL_MTU.
func ReadSubnetEnv(path string) (SubnetEnv, error) {
	f, err := os.Open(path)
	if err != nil {
		return SubnetEnv{}, err
	}
	defer f.Close()
	var e SubnetEnv
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		k, v, ok := strings.Cut(text, "=")
		if !ok {
			return e, fmt.Errorf("%s:%d: want KEY=VALUE, got %q", path, line, text)
		}
		seen[k] = true
		switch k {
		case "FLANNEL_NETWORK":
			e.Network, err = netip.ParsePrefix(v)
		case "FLANNEL_SUBNET":
			e.Subnet, err = netip.ParsePrefix(v)
		case "FLANNEL_MTU":
			e.MTU, err = strconv.Atoi(v)
		case "FLANNEL_IPMASQ":
			e.IPMasq, err = strconv.ParseBool(v)
		case "FLANNEL_IPV6_NETWORK":
			e.IPv6Network, err = netip.ParsePrefix(v)
		case "FLANNEL_IPV6_SUBNET":
			e.IPv6Subnet, err = netip.ParsePrefix(v)
		}
		if err != nil {
			return e, fmt.Errorf("%s:%d: %s: %w", path, line, k, err)
		}
	}
	if err := sc.Err(); err != nil {
		return e, fmt.Errorf("%s: %w", path, err)
	}
	for _, k := range []string{"FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU"} {
		if !seen[k] {
			return e, fmt.Errorf("%s: no %s", path, k)
		}
	}
	return e, nil
}

// SubnetEnv reads the host's subnet.env (written by tulled).
func (h *Host) SubnetEnv() (SubnetEnv, error) {
	e, err := ReadSubnetEnv(h.SubnetFile)
	if err != nil {
		return e, fmt.Errorf("host %s: %w", h.Name, err)
	}
	return e, nil
}

// Container is a host's "container": a namespace with a veth on a bridge in
// the host, addressed as Docker would from subnet.env.
type Container struct {
	Node
	Gateway netip.Prefix // the bridge address in the host (FLANNEL_SUBNET)
	Bridge  string       // the bridge's name in the host namespace
	// Gateway6 is the bridge's IPv6 address (FLANNEL_IPV6_SUBNET) in a
	// dual-stack network, zero otherwise; the container then has Addr6.
	Gateway6 netip.Prefix
}

// Container returns the host's container, nil before SetupContainer.
func (h *Host) Container() *Container {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.container
}

// SetupContainer does what Docker does with subnet.env: a bridge in the host
// with the address FLANNEL_SUBNET (198.18.<n>.1/24) and MTU FLANNEL_MTU, and
// a container namespace on it with the next address (198.18.<n>.2/24), MTU
// FLANNEL_MTU and a default route via the bridge; in a dual-stack network
// also the IPv6 ones (FLANNEL_IPV6_SUBNET, see AddContainerIPv6). If a
// container exists for another subnet (the lease changed), it is replaced;
// for the same subnets it is kept.
func (h *Host) SetupContainer(ctx context.Context) (*Container, error) {
	env, err := h.SubnetEnv()
	if err != nil {
		return nil, err
	}
	if !env.Subnet.Addr().Is4() || env.Subnet.Bits() > 30 || env.MTU < 576 {
		return nil, fmt.Errorf("host %s: subnet.env FLANNEL_SUBNET=%s FLANNEL_MTU=%d: not usable for a container", h.Name, env.Subnet, env.MTU)
	}
	h.mu.Lock()
	old := h.container
	h.mu.Unlock()
	if old != nil {
		if old.Gateway == env.Subnet && old.MTU == env.MTU && old.Gateway6 == env.IPv6Subnet {
			return old, nil
		}
		if err := h.removeContainer(ctx, old); err != nil {
			return nil, err
		}
	}
	c, err := h.AddContainer(ctx, "c", env.Subnet, env.MTU)
	if err != nil {
		return nil, err
	}
	if env.IPv6Subnet.IsValid() {
		if err := h.AddContainerIPv6(ctx, c, env.IPv6Subnet); err != nil {
			return nil, err
		}
	}
	h.mu.Lock()
	h.container = c
	h.mu.Unlock()
	return c, nil
}

// AddContainer builds a container on h as Docker does from subnet.env: a
// bridge in the host with the address gateway (198.18.<n>.1/24) and the MTU,
// and a namespace on it, behind a veth, with the next address, the MTU and a
// default route via gateway. tag names it: the node is "<tag><index>", the
// namespace "<prefix>-<tag><index>", the bridge "<prefix><tag>b<index>", the
// veth ends "<prefix><tag>v<index>" (host) and "<prefix><tag>e<index>". The
// namespace goes with the bed; the container is not the host's Container()
// (SetupContainer's, tag "c"), so a caller may add others beside it.
func (h *Host) AddContainer(ctx context.Context, tag string, gateway netip.Prefix, mtu int) (*Container, error) {
	b := h.bed
	c := &Container{
		Node:    h.containerNode(tag, gateway.Addr().Next(), mtu),
		Gateway: gateway,
		Bridge:  fmt.Sprintf("%s%sb%d", b.Prefix, tag, h.Index),
	}
	if err := b.addNetns(ctx, c.NS); err != nil {
		return nil, fmt.Errorf("host %s: container %s: %w", h.Name, c.Name, err)
	}
	hostEnd := fmt.Sprintf("%s%sv%d", b.Prefix, tag, h.Index)
	m := strconv.Itoa(mtu)
	steps := [][]string{
		{"-n", h.NS, "link", "add", c.Bridge, "mtu", m, "type", "bridge"},
		{"-n", h.NS, "addr", "add", gateway.String(), "dev", c.Bridge},
		{"-n", h.NS, "link", "set", c.Bridge, "up"},
		{"-n", h.NS, "link", "add", hostEnd, "mtu", m, "type", "veth", "peer", "name", c.Link, "mtu", m, "netns", c.NS},
		{"-n", h.NS, "link", "set", hostEnd, "master", c.Bridge, "up"},
		{"-n", c.NS, "addr", "add", netip.PrefixFrom(c.Addr, gateway.Bits()).String(), "dev", c.Link},
		{"-n", c.NS, "link", "set", c.Link, "up"},
		{"-n", c.NS, "route", "add", "default", "via", gateway.Addr().String(), "dev", c.Link},
	}
	for _, s := range steps {
		if err := ipCmd(ctx, s...); err != nil {
			return nil, fmt.Errorf("host %s: container %s: %w", h.Name, c.Name, err)
		}
	}
	return c, nil
}

// containerNode is the node of h's container tag (see AddContainer for the
// names), with address addr and MTU mtu.
func (h *Host) containerNode(tag string, addr netip.Addr, mtu int) Node {
	b := h.bed
	return Node{
		Name: fmt.Sprintf("%s%d", tag, h.Index),
		NS:   fmt.Sprintf("%s-%s%d", b.Prefix, tag, h.Index),
		Link: fmt.Sprintf("%s%se%d", b.Prefix, tag, h.Index),
		Addr: addr,
		MTU:  mtu,
		bed:  b,
	}
}

// removeContainer deletes a container's namespace and bridge (the namespace
// itself stays scheduled for deletion at Close, which tolerates its absence).
func (h *Host) removeContainer(ctx context.Context, c *Container) error {
	var errs []error
	if err := ipCmd(ctx, "netns", "del", c.NS); err != nil {
		errs = append(errs, err)
	}
	if err := ipCmd(ctx, "-n", h.NS, "link", "del", c.Bridge); err != nil {
		errs = append(errs, err)
	}
	h.mu.Lock()
	h.container = nil
	h.mu.Unlock()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("host %s: remove container %s: %w", h.Name, c.NS, err)
	}
	return nil
}

// StartAll starts tulled on every host that has none running (with
// extra flags), waits until each is ready and sets up each host's
// container. Hosts start concurrently.
func (b *Bed) StartAll(ctx context.Context, extra ...string) error {
	b.mu.Lock()
	hosts := append([]*Host(nil), b.Hosts...)
	b.mu.Unlock()
	errs := make([]error, len(hosts))
	var wg sync.WaitGroup
	start := time.Now()
	for i, h := range hosts {
		if t := h.Tulled(); t != nil && !t.p.exited() {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := h.StartTulled(ctx, extra...); err != nil {
				errs[i] = err
				return
			}
			if _, err := h.SetupContainer(ctx); err != nil {
				errs[i] = err
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	b.logf("tulled ready on %d hosts in %v", len(hosts), time.Since(start).Round(time.Millisecond))
	return nil
}
