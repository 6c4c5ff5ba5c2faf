// Package udp is Tulle's data plane, wire-compatible with flannel's udp
// backend: IPv4 packets routed into the TUN device are sent, bare, as the
// payload of a UDP datagram to port Options.Port of the host that holds the
// lease of their destination; datagrams received on that port are checked
// and written into the TUN device. In a dual-stack network inner IPv6
// packets travel the same way, told apart by the version nibble, to the
// Tulle hosts that carry them (dualstack.go); the loops branch once on the
// version nibble (tx.go forward4/forward6, rx.go accept4/accept6).
//
// Guarantees:
//   - Trust: a datagram is accepted only from the PublicIP (or PublicIPv6)
//     of a current lease, only if its inner source lies in that lease (its
//     IPv6 lease, for IPv6) and its inner destination in ours; the
//     sender's source port does not matter. Everything else is dropped and
//     counted by family and reason.
//   - Never truncate: receive buffers hold the largest datagram (64 KiB);
//     what does not fit is dropped and counted.
//   - TTL and hop limit: decremented on send and on receive, as flannel
//     does; a packet whose TTL would reach 0 is dropped.
//   - PMTU: a DF IPv4 packet, or any IPv6 packet above the IPv6 minimum
//     MTU, larger than the path to its peer carries (the path MTU less 28,
//     or 48 on the IPv6 underlay, learned from the kernel on the slow path)
//     is answered with ICMP "fragmentation needed" or ICMPv6 "packet too
//     big" written back into the TUN; IPv6 is never fragmented.
//   - Steady state: no allocation, logging or map lookup per packet. The
//     route table is immutable, swapped by Apply, loaded once per batch;
//     lookups are O(1). Counters are per-loop atomics added once per batch
//     (or run of packets for one peer) and summed at scrape time.
//   - No copies in user space: a TSO superpacket read from the TUN is sent
//     as a UDP GSO train gathered from its own bytes and per-segment
//     headers; a GRO train received is written to the TUN as coalesced
//     superpackets gathered from the receive buffer.
//   - Checksums: between Tulle hosts whose leases both advertise
//     FeaturePartialChecksum, TCP and UDP checksums the kernel left partial
//     travel partial (marked, see mark.go; for IPv6 by the payload length)
//     and no host sums the payload; a mark is honoured only then, and a
//     reserved bit we did not set is cleared on send. A flannel host gets
//     and sends complete checksums, which are verified before segments are
//     merged.
//
// Each worker owns one TUN queue and one UDP socket (SO_REUSEPORT, bound to
// 0.0.0.0:Port; a BPF program spreads received flows over the sockets by
// the inner flow, see steer.go) and runs two loops, TX (TUN -> UDP) and RX
// (UDP -> TUN), each on a goroutine whose thread blocks in
// ppoll when idle. With the IPv6 underlay (Options.IPv6Underlay and a
// PublicIPv6) each worker also has an IPv6-only socket bound to [::]:Port
// (steered the same way) with an RX loop of its own; its TX loop sends to
// each peer by the socket of the peer's underlay.
package udp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/backend"
	"github.com/tulle-net/tulle/backend/tundev"
	"github.com/tulle-net/tulle/backend/udpconn"
	"github.com/tulle-net/tulle/proto"
	"github.com/tulle-net/tulle/subnet"
)

// Options configure New.
type Options struct {
	TunName  string     // default "tulle0"
	Driver   string     // "offload" (default) or "water"
	Workers  int        // 0 = runtime.NumCPU()
	Port     int        // UDP port to listen on and send to (Backend.Port); 0 = 8285
	PublicIP netip.Addr // our underlay address (the lease's PublicIP); sockets bind 0.0.0.0:Port
	// MTU is the TUN MTU the daemon computes: underlay MTU - 28, or - 48
	// when IPv6Underlay is on and we have a PublicIPv6.
	MTU       int
	Network   netip.Prefix // overlay network: route "<Network> dev tun"
	SubnetLen int          // length of every lease in Network
	// Lease is our own lease: its IPv6Subnet is our IPv6 lease, its
	// BackendData tells which features peers see us offer.
	Lease  subnet.Lease
	Logger *slog.Logger // nil = slog.Default()
	// IPv6Network is the IPv6 overlay network (route "<IPv6Network> dev
	// tun"); zero for an IPv4-only overlay. Inner IPv6 packets are then
	// carried (dualstack.go), and Lease.IPv6Subnet must be a lease of it.
	IPv6Network netip.Prefix
	// IPv6SubnetLen is the length of every IPv6 lease (flannel's
	// IPv6SubnetLen); 0 = 64.
	IPv6SubnetLen int
	// PublicIPv6 is our IPv6 underlay address (the lease's PublicIPv6);
	// zero if none.
	PublicIPv6 netip.Addr
	// IPv6Underlay is the network config's Backend.IPv6Underlay: with a
	// PublicIPv6, IPv6 sockets are also bound to [PublicIPv6]:Port ([::]
	// if it is not on this host) and peers whose leases offer it
	// (FeatureIPv6Underlay) are talked to over IPv6.
	IPv6Underlay bool
	// DirectRouting routes on-link peers that advertise FeatureDirect
	// (and the IPv6 leases of those that advertise FeatureDirectIPv6)
	// through the kernel, via Underlay (the underlay interface's index;
	// see direct.go). Off, New removes direct routes an earlier run left.
	DirectRouting bool
	Underlay      int
}

// Defaults and limits.
const (
	DefaultTunName = "tulle0"
	// maxSubnetBits bounds the route tables' top levels (see table.go): a
	// /8 in /30s, 1,024 pointers copied per update; an IPv6 network may
	// hold as many leases (a /48 in /64s is 16 bits).
	maxSubnetBits = 22
	maxSubnets    = 1 << maxSubnetBits
	// socketBuffer is the receive and send buffer of each socket.
	socketBuffer = 8 << 20
)

// Backend is the UDP data plane. It implements backend.Backend.
type Backend struct {
	opts    Options
	log     *slog.Logger
	dev     *tundev.Device
	link    linkHandle
	tunAddr [4]byte // <lease .0>, the TUN's address

	table atomic.Pointer[table]
	ctl   control
	// ownPartial: our own lease advertises FeaturePartialChecksum, as peers
	// see it; only then do we send them marked packets (a host on a
	// reservation written by hand advertises nothing, so its peers would
	// not take its marks).
	ownPartial atomic.Bool
	workers    []*worker
	stats      []*loopStats // every loop's counters (TX and RX of each worker)

	prober *mtuProber
	direct *directRouter // kernel routes to on-link peers (direct.go)

	// hot: the loops may wait hot (worker.go); set by Run before they start.
	hot atomic.Bool

	running  atomic.Bool
	stopping atomic.Bool
	dead     atomic.Bool

	// runMu orders Run against Close: loops holds the channel Run closes
	// when every loop has returned (nil before Run), so that Close closes
	// no descriptor a loop may still poll.
	runMu sync.Mutex
	loops chan struct{}

	closeIOOnce sync.Once
	closeOnce   sync.Once
	closeErr    error
}

var _ backend.Backend = (*Backend)(nil)

// New creates the TUN device (named opts.TunName, MTU opts.MTU, address
// <lease .0>/32, link up, route <Network> dev tun), one UDP socket per
// worker bound to 0.0.0.0:Port, and all buffers. It operates in the network
// namespace of the calling thread. On error everything it made is removed.
func New(opts Options) (*Backend, error) {
	if err := checkOptions(&opts); err != nil {
		return nil, err
	}
	b := &Backend{opts: opts, log: opts.Logger}
	b.tunAddr = opts.Lease.Subnet.Addr().As4()
	b.ownPartial.Store(hasFeature(opts.Lease.Attrs.BackendData, FeaturePartialChecksum))
	ok := false
	defer func() {
		if !ok {
			b.closeIO()
			b.removeDevice()
		}
	}()

	dev, err := tundev.Open(tundev.Options{
		Name: opts.TunName, MTU: opts.MTU, Queues: opts.Workers, Driver: opts.Driver, Logger: opts.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("create tun device %s: %w", opts.TunName, err)
	}
	b.dev = dev
	if b.link, err = setupDevice(dev.Name(), opts); err != nil {
		return nil, err
	}
	if err := checkPortFree(opts.Port, false); err != nil {
		return nil, err
	}
	if b.underlay6() {
		if err := checkPortFree(opts.Port, true); err != nil {
			return nil, err
		}
	}
	if b.prober, err = newMTUProber(b); err != nil {
		return nil, err
	}

	b.ctl.init()
	b.table.Store(newTableFor(&opts))
	listen := func(any netip.Addr) (*udpconn.Conn, error) {
		return udpconn.Listen(netip.AddrPortFrom(any, uint16(opts.Port)), udpconn.Options{
			ReusePort:  true,
			RecvBuffer: socketBuffer,
			SendBuffer: socketBuffer,
			BatchSize:  max(rxMessages, txMessages),
			Logger:     opts.Logger,
		})
	}
	// The IPv6 sockets are bound to our PublicIPv6, not [::]: a host often
	// has several IPv6 addresses on its underlay (temporary, SLAAC and
	// static ones), and a datagram from another one would be a stranger's
	// to our peers. A PublicIPv6 that is not on this host (a 1:1 NAT)
	// cannot be bound: then [::], and the kernel picks the source.
	bind6 := opts.PublicIPv6
	for i, q := range dev.Queues() {
		conn, err := listen(netip.IPv4Unspecified())
		if err != nil {
			return nil, fmt.Errorf("worker %d: %w", i, err)
		}
		var conn6 *udpconn.Conn
		if b.underlay6() {
			conn6, err = listen(bind6)
			if errors.Is(err, unix.EADDRNOTAVAIL) && i == 0 {
				b.log.Warn("public IPv6 address is not on this host; the IPv6 underlay sockets listen on [::] and the kernel picks their source address",
					"public_ipv6", bind6)
				bind6 = netip.IPv6Unspecified()
				conn6, err = listen(bind6)
			}
			if err != nil {
				conn.Close()
				return nil, fmt.Errorf("worker %d: IPv6 underlay: %w", i, err)
			}
		}
		w, err := newWorker(b, i, q, conn, conn6, dev.UDPOffload())
		if err != nil {
			conn.Close()
			if conn6 != nil {
				conn6.Close()
			}
			return nil, err
		}
		b.workers = append(b.workers, w)
		b.stats = append(b.stats, w.tx.stats)
		for _, rx := range w.receivers() {
			b.stats = append(b.stats, rx.stats)
		}
	}
	if len(b.workers) > 1 {
		steered := b.steer(b.workers[0].conn)
		steered6 := b.underlay6() && b.steer(b.workers[0].conn6)
		for _, w := range b.workers {
			if steered {
				w.rx.group = len(b.workers)
			}
			if steered6 {
				w.rx6.group = len(b.workers)
			}
		}
	}
	if b.direct, err = newDirectRouter(opts); err != nil {
		return nil, err
	}
	b.log.Info("data plane ready", "device", dev.Name(), "driver", dev.Driver(), "offload", dev.Offload(),
		"udp_offload", dev.UDPOffload(), "workers", len(b.workers), "mtu", opts.MTU,
		"network", opts.Network, "lease", opts.Lease.Subnet, "ipv6_network", opts.IPv6Network,
		"ipv6_lease", opts.Lease.IPv6Subnet, "port", opts.Port,
		"gso", b.workers[0].conn.GSO(), "gro", b.workers[0].conn.GRO(),
		"gso_max_segments", b.workers[0].conn.MaxSegments(), "public_ipv6", opts.PublicIPv6,
		"ipv6_underlay", b.underlay6())
	if opts.IPv6Underlay && !b.underlay6() {
		b.log.Info("the network config enables the IPv6 underlay but this host has no public IPv6 address; peers reach it over IPv4")
	}
	ok = true
	return b, nil
}

// checkOptions validates opts and fills in the defaults.
func checkOptions(o *Options) error {
	if o.TunName == "" {
		o.TunName = DefaultTunName
	}
	if o.Driver == "" {
		o.Driver = tundev.DriverOffload
	}
	if o.Workers <= 0 {
		o.Workers = runtime.NumCPU()
	}
	o.Workers = min(o.Workers, tundev.MaxQueues)
	if o.Port == 0 {
		o.Port = subnet.DefaultPort
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Port < 1 || o.Port > 65535 {
		return fmt.Errorf("udp backend: port %d: must be between 1 and 65535", o.Port)
	}
	if o.MTU < 68 || o.MTU > 65535-proto.EncapOverhead {
		return fmt.Errorf("udp backend: MTU %d: must be between 68 and %d", o.MTU, 65535-proto.EncapOverhead)
	}
	if !o.Network.IsValid() || !o.Network.Addr().Is4() || o.Network != o.Network.Masked() {
		return fmt.Errorf("udp backend: network %v: must be an IPv4 prefix with no host bits", o.Network)
	}
	if o.SubnetLen <= o.Network.Bits() || o.SubnetLen > 32 {
		return fmt.Errorf("udp backend: SubnetLen %d: must be longer than the network's /%d and at most 32", o.SubnetLen, o.Network.Bits())
	}
	if n := 1 << (o.SubnetLen - o.Network.Bits()); o.SubnetLen-o.Network.Bits() > maxSubnetBits {
		return fmt.Errorf("udp backend: network %v in /%d subnets: more than %d subnets (%d) are not supported", o.Network, o.SubnetLen, maxSubnets, n)
	}
	l := o.Lease.Subnet
	if !l.IsValid() || !l.Addr().Is4() || l.Bits() != o.SubnetLen || l != l.Masked() || !o.Network.Contains(l.Addr()) {
		return fmt.Errorf("udp backend: own lease %v: must be a /%d subnet of %v", l, o.SubnetLen, o.Network)
	}
	if o.PublicIP.IsValid() && !o.PublicIP.Unmap().Is4() {
		return fmt.Errorf("udp backend: public IP %v: must be IPv4", o.PublicIP)
	}
	o.PublicIP = o.PublicIP.Unmap()
	if o.PublicIPv6.IsValid() && !isPublicIPv6(o.PublicIPv6) {
		return fmt.Errorf("udp backend: public IPv6 %v: must be an IPv6 unicast address", o.PublicIPv6)
	}
	return checkIPv6Options(o)
}

// checkIPv6Options validates the IPv6 network and our IPv6 lease.
func checkIPv6Options(o *Options) error {
	nw := o.IPv6Network
	if !nw.IsValid() {
		return nil
	}
	if !nw.Addr().Is6() || nw.Addr().Is4In6() || nw != nw.Masked() {
		return fmt.Errorf("udp backend: IPv6 network %v: must be an IPv6 prefix with no host bits", nw)
	}
	if o.IPv6SubnetLen == 0 {
		o.IPv6SubnetLen = 64
	}
	if o.IPv6SubnetLen <= nw.Bits() || o.IPv6SubnetLen > 128 {
		return fmt.Errorf("udp backend: IPv6SubnetLen %d: must be longer than the IPv6 network's /%d and at most 128", o.IPv6SubnetLen, nw.Bits())
	}
	if o.IPv6SubnetLen-nw.Bits() > maxSubnetBits {
		return fmt.Errorf("udp backend: IPv6 network %v in /%d subnets: more than %d subnets are not supported (use a longer IPv6Network or a shorter IPv6SubnetLen, e.g. a /48 in /64s)",
			nw, o.IPv6SubnetLen, maxSubnets)
	}
	l := o.Lease.IPv6Subnet
	if !l.IsValid() || !l.Addr().Is6() || l.Bits() != o.IPv6SubnetLen || l != l.Masked() || !nw.Contains(l.Addr()) {
		return fmt.Errorf("udp backend: own IPv6 lease %v: must be a /%d subnet of %v", l, o.IPv6SubnetLen, nw)
	}
	return nil
}

// Run moves packets until ctx is done (then it returns nil) or a worker
// fails (then Alive turns false and Run returns the worker's error). It
// also returns, with nil, when Close stopped the loops. On return the
// sockets and TUN queues are closed; Close removes what is left. Run may be
// called once. It raises GOMAXPROCS to NumCPU + 1 per loop if it is lower
// (each loop blocks its own thread; see raiseGOMAXPROCS).
func (b *Backend) Run(ctx context.Context) error {
	b.runMu.Lock()
	if !b.running.CompareAndSwap(false, true) {
		b.runMu.Unlock()
		return errors.New("udp backend: Run called twice")
	}
	if b.stopping.Load() { // closed before Run
		b.runMu.Unlock()
		return nil
	}
	loopsDone := make(chan struct{})
	b.loops = loopsDone
	b.runMu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		loops    sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	fail := func(err error) {
		errOnce.Do(func() {
			firstErr = err
			b.dead.Store(true)
			b.log.Error("data plane worker failed", "error", err)
		})
		cancel()
	}
	loopCount := 0
	for _, w := range b.workers {
		loopCount += 1 + len(w.receivers())
	}
	b.hot.Store(raiseGOMAXPROCS(loopCount, b.log))
	for _, w := range b.workers {
		loops.Go(func() {
			if err := w.runTX(); err != nil {
				fail(err)
			}
		})
		for _, rx := range w.receivers() {
			loops.Go(func() {
				if err := w.runRX(rx); err != nil {
					fail(err)
				}
			})
		}
	}
	var prober sync.WaitGroup
	prober.Go(func() { b.prober.run(ctx) })
	go func() {
		loops.Wait()
		close(loopsDone)
	}()

	select {
	case <-ctx.Done():
	case <-loopsDone: // stopped under us by Close
	}
	b.stopLoops()
	<-loopsDone
	b.closeIO()
	cancel()
	prober.Wait()
	return firstErr
}

// raiseGOMAXPROCS makes room for the data plane's loops, which block their
// threads in system calls: when a loop wakes it needs a P at once, and
// with GOMAXPROCS = NumCPU all Ps may be held by the other loops' threads
// in their system calls, until sysmon takes them back (up to 10 ms); and a
// loop waiting hot (worker.go) keeps its P. So every loop gets a P of its
// own beyond the CPUs. Idle Ps cost nothing. A GOMAXPROCS set in the
// environment is the operator's and is kept. It reports whether there
// are that many Ps, which loops need to wait hot.
func raiseGOMAXPROCS(loops int, log *slog.Logger) bool {
	want := runtime.NumCPU() + loops
	if v := os.Getenv("GOMAXPROCS"); v != "" {
		have := runtime.GOMAXPROCS(0)
		log.Debug("GOMAXPROCS set in the environment; not raised for the data-plane loops", "GOMAXPROCS", v,
			"loops_wait_hot", have >= want)
		return have >= want
	}
	if have := runtime.GOMAXPROCS(0); have < want {
		runtime.GOMAXPROCS(want)
		log.Debug("raised GOMAXPROCS for the data-plane loops", "from", have, "to", want)
	}
	return true
}

// steer attaches the receive steering program (steer.go) to the sockets'
// SO_REUSEPORT group (false if it could not). Without it the kernel's hash
// spreads only by peer.
func (b *Backend) steer(c *udpconn.Conn) bool {
	f, err := steerFilter(len(b.workers))
	if err == nil {
		err = c.AttachReusePortFilter(f)
	}
	if err != nil {
		b.log.Warn("cannot steer received flows over the workers; the kernel spreads them by peer only", "error", err)
		return false
	}
	return true
}

// Alive reports whether every worker is running (or has not started): false
// once one has failed. For the daemon's watchdog and /healthz.
func (b *Backend) Alive() bool { return !b.dead.Load() }

// stopLoops makes every loop return nil promptly, whatever it waits for:
// it sets stopping and wakes every wait a loop can block in. A loop
// idles in ppoll on its worker's stop event; inside a send it may wait for
// room in a full socket buffer (the underlay does not drain it) or in a
// full TUN queue, and those waits end on the socket's and the device's own
// stop events, which Interrupt signals (closing the descriptors must wait
// until the loops have returned, see closeIO).
func (b *Backend) stopLoops() {
	b.stopping.Store(true)
	for _, w := range b.workers {
		w.stop.Signal()
		for _, c := range w.conns() {
			c.Interrupt()
		}
	}
	if b.dev != nil {
		b.dev.Interrupt()
	}
}

// closeIO stops the loops, waits until they have returned, and closes the
// sockets, the TUN queues and the loops' stop events.
func (b *Backend) closeIO() {
	b.runMu.Lock()
	b.stopLoops()
	loops := b.loops
	b.runMu.Unlock()
	if loops != nil {
		<-loops
	}
	b.closeIOOnce.Do(func() {
		for _, w := range b.workers {
			w.stop.Close()
			for _, c := range w.conns() {
				if err := c.Close(); err != nil {
					b.log.Warn("close UDP socket", "worker", w.id, "addr", c.LocalAddr(), "error", err)
				}
			}
		}
		if b.dev != nil {
			if err := b.dev.Close(); err != nil {
				b.log.Warn("close tun device", "device", b.dev.Name(), "error", err)
			}
		}
		if b.prober != nil {
			b.prober.close()
		}
	})
}

// Close stops the data plane's I/O, removes the direct routes and the TUN
// device (with its address and route). Safe to call more than once, before or after Run.
func (b *Backend) Close() error {
	b.closeOnce.Do(func() {
		b.closeIO()
		b.closeErr = errors.Join(b.direct.close(), b.removeDevice())
		if b.closeErr == nil && b.dev != nil {
			b.log.Info("data plane closed", "device", b.dev.Name())
		}
	})
	return b.closeErr
}
