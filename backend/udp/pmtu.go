package udp

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/proto"
)

// mtuProbeInterval is how often the path MTU of peers with traffic is
// looked at again (the kernel's learned PMTU rises back after 10 minutes).
const mtuProbeInterval = 5 * time.Second

// mtuProber learns the path MTU to each peer on the slow path: it connects
// a UDP socket to the peer and asks the kernel (getsockopt IP_MTU, or
// IPV6_MTU for a peer on the IPv6 underlay), which knows the route MTU and
// every "fragmentation needed" (Packet Too Big) the underlay sent. The TX
// loops then answer packets that would not fit with ICMP.
//
// Which peers: one that the TX path just sent to for the first time (it
// pokes the prober), one whose send failed with EMSGSIZE/EINVAL, and every
// interval each peer that had traffic since the last look.
type mtuProber struct {
	b    *Backend
	wake chan struct{}

	mu  sync.Mutex
	fd  int // unconnected until a probe; -1 when closed
	fd6 int // the same for IPv6 peers; -1 without the IPv6 underlay
}

// newMTUProber makes the probe socket; it lives in the network namespace of
// the caller (New's), whatever thread probes later.
func newMTUProber(b *Backend) (*mtuProber, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("path MTU probe socket: %w", err)
	}
	m := &mtuProber{b: b, fd: fd, fd6: -1, wake: make(chan struct{}, 1)}
	if b.underlay6() {
		if m.fd6, err = unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("path MTU probe socket (IPv6): %w", err)
		}
	}
	return m, nil
}

// poke asks for a look at new or suspect peers soon; it never blocks.
func (m *mtuProber) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// run probes until ctx is done.
func (m *mtuProber) run(ctx context.Context) {
	tick := time.NewTicker(mtuProbeInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.wake:
			m.round(false)
		case <-tick.C:
			m.round(true)
		}
	}
}

// round probes new and suspect peers, and with all also every peer that
// had traffic since the last round.
func (m *mtuProber) round(all bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fd < 0 {
		return
	}
	for p := range m.b.table.Load().all() {
		suspect := p.suspect.Swap(false)
		fresh := !p.probed.Load() && p.active.Load()
		if suspect || fresh || (all && p.active.Swap(false)) {
			p.probed.Store(true)
			m.probe(p)
		}
	}
}

// probe asks the kernel for the path MTU to p and stores the inner limit.
func (m *mtuProber) probe(p *peer) {
	fd, level, opt, overhead := m.fd, unix.IPPROTO_IP, unix.IP_MTU, proto.EncapOverhead
	var sa unix.Sockaddr
	if p.underlay == underlay6 {
		fd, level, opt, overhead = m.fd6, unix.IPPROTO_IPV6, unix.IPV6_MTU, proto.EncapOverheadIPv6
		sa = &unix.SockaddrInet6{Port: int(p.addr.Port()), Addr: p.addr.Addr().As16()}
	} else {
		sa = &unix.SockaddrInet4{Port: int(p.addr.Port()), Addr: p.addr.Addr().As4()}
	}
	if err := unix.Connect(fd, sa); err != nil {
		m.b.log.Debug("path MTU probe: connect", "peer", p.addr.Addr(), "subnet", p.subnet, "error", err)
		return
	}
	mtu, err := unix.GetsockoptInt(fd, level, opt)
	if err != nil {
		m.b.log.Debug("path MTU probe: getsockopt", "peer", p.addr.Addr(), "subnet", p.subnet, "error", err)
		return
	}
	var limit int32 // 0: the path carries whatever the TUN MTU lets through
	if inner := mtu - overhead; inner < m.b.opts.MTU {
		limit = int32(max(inner, 68))
	}
	if old := p.innerMTU.Swap(limit); old != limit {
		m.b.log.Info("path MTU to peer changed", "peer", p.addr.Addr(), "subnet", p.subnet,
			"path_mtu", mtu, "inner_mtu_limit", limit)
	}
}

// close releases the socket; later rounds do nothing.
func (m *mtuProber) close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fd >= 0 {
		unix.Close(m.fd)
		m.fd = -1
	}
	if m.fd6 >= 0 {
		unix.Close(m.fd6)
		m.fd6 = -1
	}
}
