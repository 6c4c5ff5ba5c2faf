package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/daemon/buildinfo"
	"github.com/tulle-net/tulle/daemon/config"
	"github.com/tulle-net/tulle/daemon/health"
	"github.com/tulle-net/tulle/daemon/ipmasq"
	"github.com/tulle-net/tulle/daemon/metrics"
	"github.com/tulle-net/tulle/daemon/netif"
	"github.com/tulle-net/tulle/daemon/sdnotify"
	"github.com/tulle-net/tulle/subnet"
	etcdreg "github.com/tulle-net/tulle/subnet/etcd"
)

// Timing of the main loop and its helpers.
const (
	// tickEvery is how often the main loop looks at everything, publishes
	// health and pings the watchdog (more often if WatchdogSec asks).
	tickEvery = time.Second
	// maxStall: /healthz fails when the main loop has not turned this long.
	maxStall = 15 * time.Second
	// masqEvery: ip-masq rules are re-asserted this often.
	masqEvery = 10 * time.Second
	// deadGrace: a data plane that reports dead this long without its Run
	// returning is given up on.
	deadGrace = 5 * time.Second
	// stopTimeout bounds the wait for goroutines at shutdown.
	stopTimeout = 10 * time.Second
)

// watchDownBound: a lease watch down this long makes tulled not ready. It
// rides out an etcd restart or a leader election (seconds) without a flap,
// and flags a host that no longer sees other hosts' leases long before the
// TulleNotReady alert (5 minutes). A variable so that tests can shorten it.
var watchDownBound = 30 * time.Second

// renewGrace is how long a renewal may be overdue (it failed, or etcd has
// not answered it) before tulled is not ready: a quarter of the renewal
// margin, at most 10s, so a renewal that succeeds on its first retry does
// not flap readiness.
func renewGrace(margin time.Duration) time.Duration { return min(margin/4, 10*time.Second) }

// leaseProblem says why the held lease can not be trusted, "" if it can.
// It names the lease by both its subnets in a dual-stack network: the
// one key holds both, and both go when it expires.
func leaseProblem(ms subnet.ManagerStatus, now time.Time) string {
	l := ms.Lease
	if !ms.LeaseHeld || l.Reservation || l.Expiration.IsZero() || ms.RenewAt.IsZero() {
		return ""
	}
	cause := ""
	if ms.LastRenewError != nil {
		cause = ": " + ms.LastRenewError.Error()
	}
	switch {
	case !now.Before(l.Expiration):
		return fmt.Sprintf("lease %s expired in etcd at %s, not renewed%s", subnetsText(l), l.Expiration.UTC().Format(time.RFC3339), cause)
	case now.Sub(ms.RenewAt) > renewGrace(l.Expiration.Sub(ms.RenewAt)):
		return fmt.Sprintf("lease %s not renewed since it was due at %s; it expires at %s%s", subnetsText(l),
			ms.RenewAt.UTC().Format(time.RFC3339), l.Expiration.UTC().Format(time.RFC3339), cause)
	}
	return ""
}

// watchProblem says that the lease watch has been down longer than
// watchDownBound, "" otherwise.
func watchProblem(rs subnet.RegistryStatus, now time.Time) string {
	if rs.WatchDownSince.IsZero() || now.Sub(rs.WatchDownSince) < watchDownBound {
		return ""
	}
	// The reason names the time, not the duration, so it stays the same
	// from tick to tick and "not ready" is logged once.
	return fmt.Sprintf("lease watch down since %s, over %s: other hosts' lease changes are not seen (%s)",
		rs.WatchDownSince.UTC().Format(time.RFC3339), watchDownBound, rs.Detail)
}

// Run runs the daemon until ctx is done (a clean stop; it returns nil) or a
// failure (it returns the cause; see ExitCode). Either way it first takes
// down what it set up: data plane and TUN device, ip-masq rules, the etcd
// connection, the HTTP endpoints. The lease stays in etcd.
func Run(ctx context.Context, cfg *config.Config, logger *slog.Logger) error {
	d := &daemon{
		cfg:    cfg,
		log:    logger,
		health: health.NewState(maxStall),
		notify: sdnotify.New(logger),
		peers:  map[netip.Prefix]netip.Addr{},
		phase:  "starting",
	}
	d.tick = tickEvery
	if wd := d.notify.WatchdogInterval(); wd > 0 && wd/2 < d.tick {
		d.tick = wd / 2
	}
	d.snap.Store(&metrics.Snapshot{})
	return d.run(ctx)
}

type startResult struct {
	cfg   *subnet.Config
	lease subnet.Lease
	err   error
}

// daemon is one run. Fields below "main loop state" are touched only by
// the goroutine running run.
type daemon struct {
	cfg     *config.Config
	log     *slog.Logger
	health  *health.State
	notify  *sdnotify.Notifier
	metrics *prometheus.Registry
	snap    atomic.Pointer[metrics.Snapshot]
	tick    time.Duration

	// goroutines, all stopped by cancelRun and waited for by wg
	runCtx    context.Context
	cancelRun context.CancelFunc
	wg        sync.WaitGroup
	startDone chan startResult
	events    chan []subnet.Event
	mgrDone   chan error
	beDone    chan error

	// main loop state
	sel           netif.Selection
	reg           *etcdreg.Registry
	mgr           *subnet.Manager
	netCfg        *subnet.Config
	lease         subnet.Lease
	mtu           int // the TUN device's (tunMTU)
	be            *udp.Backend
	beRunning     bool
	beDeadSince   time.Time
	masq          []*ipmasq.Rules // IPv4, then IPv6 in a dual-stack network
	masqInstalled bool
	masqErr       error
	pol           *policyRunner
	nextMasqTry   time.Time
	envWritten    bool
	ready         bool
	lastReason    string
	stopping      bool
	stopStatus    string
	phase         string
	peers         map[netip.Prefix]netip.Addr // lease subnet -> PublicIP, not our own
}

func (d *daemon) run(ctx context.Context) error {
	info := buildinfo.Get()
	d.log.Info("tulled starting", "version", info.Version, "revision", info.Revision, "go", info.GoVersion,
		"etcd", strings.Join(d.cfg.Etcd.Endpoints, ","), "prefix", d.cfg.Etcd.Prefix,
		"tun", d.cfg.TunName, "driver", d.cfg.TunDriver, "subnet_file", d.cfg.SubnetFile, "ip_masq", d.cfg.IPMasq)

	reg, err := metrics.NewRegistry(func() metrics.Snapshot { return *d.snap.Load() })
	if err != nil {
		return err
	}
	d.metrics = reg
	httpCtx, stopHTTP := context.WithCancel(context.Background())
	httpDone := make(chan error, 3)
	var httpWG sync.WaitGroup
	defer func() {
		stopHTTP()
		httpWG.Wait()
	}()
	if err := d.startHTTP(httpCtx, &httpWG, httpDone); err != nil {
		return err
	}

	d.runCtx, d.cancelRun = context.WithCancel(context.Background())
	defer d.cancelRun()
	err = d.loop(ctx, httpDone)
	return d.shutdown(err)
}

// startHTTP binds --metrics-addr and flannel's --healthz-ip:--healthz-port
// (the same handler on both) and serves them until ctx is done.
func (d *daemon) startHTTP(ctx context.Context, wg *sync.WaitGroup, done chan<- error) error {
	addrs := []string{}
	if d.cfg.MetricsAddr != "" {
		addrs = append(addrs, d.cfg.MetricsAddr)
	}
	if h := d.cfg.HealthzAddr(); h != "" && !sameListener(h, d.cfg.MetricsAddr) {
		addrs = append(addrs, h)
	}
	handler := health.Handler(d.health, d.metrics, d.log)
	type served struct {
		ln      net.Listener
		handler http.Handler
		what    string
	}
	var all []served
	listen := func(addr string, h http.Handler, what string) error {
		ln, err := health.Listen(addr)
		if err != nil {
			for _, s := range all {
				s.ln.Close()
			}
			return err
		}
		all = append(all, served{ln, h, what})
		return nil
	}
	for _, a := range addrs {
		if err := listen(a, handler, "/metrics, /healthz and /readyz"); err != nil {
			return err
		}
	}
	// The profiler shows the process's memory: only on a loopback
	// listener of its own (config refuses any other address), with the
	// password taken out of the command line it shows.
	if d.cfg.DebugPprof {
		if err := listen(d.cfg.DebugPprofAddr, health.Pprof(config.RedactArgs(os.Args)), "Go's profiler at /debug/pprof/"); err != nil {
			return err
		}
	}
	for _, s := range all {
		d.log.Info("serving "+s.what, "addr", s.ln.Addr().String())
		wg.Go(func() {
			if err := health.Serve(ctx, s.ln, s.handler); err != nil {
				done <- err
			}
		})
	}
	return nil
}

// sameListener says whether two host:port addresses would collide: same
// port, and the same host or either one all addresses.
func sameListener(a, b string) bool {
	ha, pa, err1 := net.SplitHostPort(a)
	hb, pb, err2 := net.SplitHostPort(b)
	if err1 != nil || err2 != nil || pa != pb {
		return false
	}
	any := func(h string) bool { return h == "" || h == "0.0.0.0" || h == "::" }
	return ha == hb || any(ha) || any(hb)
}

// setup does the steps that can not wait: the interface, the previous
// subnet, the registry and the lease manager.
func (d *daemon) setup() error {
	sel, err := netif.Select(nil, netif.Spec{Ifaces: d.cfg.Ifaces, Regexes: d.cfg.IfaceRegexes, PublicIP: d.cfg.PublicIP, PublicIPv6: d.cfg.PublicIPv6})
	if err != nil {
		err = fmt.Errorf("underlay interface: %w", err)
		if len(d.cfg.Ifaces) > 0 || len(d.cfg.IfaceRegexes) > 0 {
			return asConfigError(err)
		}
		return err
	}
	d.sel = sel
	d.log.Info("underlay interface", "iface", sel.Name, "addr", sel.Addr, "public_ip", sel.PublicIP,
		"addr6", sel.Addr6, "public_ipv6", sel.PublicIPv6, "mtu", sel.MTU, "chosen_by", sel.How)
	if !sel.Up {
		d.log.Warn("underlay interface is down; traffic will not flow until it is up", "iface", sel.Name)
	}

	var previous, previous6 netip.Prefix
	switch env, err := subnet.ReadEnv(d.cfg.SubnetFile); {
	case err == nil:
		previous, previous6 = env.Subnet, env.IPv6Subnet
		d.log.Info("previous subnet found; asking for it again", "subnet", previous, "ipv6_subnet", previous6, "file", d.cfg.SubnetFile)
	case errors.Is(err, fs.ErrNotExist):
		d.log.Debug("no previous subnet file", "file", d.cfg.SubnetFile)
	default:
		d.log.Warn("ignoring unreadable previous subnet file", "file", d.cfg.SubnetFile, "error", err)
	}

	d.reg, err = newRegistry(d.cfg.Etcd, 0, d.log.With("component", "etcd"))
	if err != nil {
		return asConfigError(fmt.Errorf("etcd: %w", err))
	}
	d.mgr = subnet.NewManager(d.reg, subnet.ManagerOptions{
		PublicIP:           sel.PublicIP,
		PublicIPv6:         sel.PublicIPv6, // written only in a dual-stack network
		BackendData:        backendData(d.cfg.PartialChecksums),
		BackendDataFor:     d.leaseBackendData, // direct.go: features the network config turns on
		PreviousSubnet:     previous,
		PreviousIPv6Subnet: previous6,
		LeaseTTL:           d.cfg.LeaseTTL,
		RenewMargin:        d.cfg.RenewMargin,
		StartTimeout:       d.cfg.StartTimeout,
		CheckConfig:        checkNetworkConfig,
		Logger:             d.log.With("component", "lease"),
	})
	return nil
}

// loop is the main loop: it drives start-up step by step, applies lease
// events, watches health and pings the watchdog, until ctx is done (nil)
// or something fails (the cause).
func (d *daemon) loop(ctx context.Context, httpDone <-chan error) error {
	if err := d.setup(); err != nil {
		return err
	}
	d.phase = "waiting for etcd"
	d.startDone = make(chan startResult, 1)
	d.wg.Go(func() {
		cfg, lease, err := d.mgr.Start(d.runCtx)
		d.startDone <- startResult{cfg, lease, err}
	})

	ticker := time.NewTicker(d.tick)
	defer ticker.Stop()
	for {
		d.publish()
		select {
		case <-ctx.Done():
			return nil

		case r := <-d.startDone:
			d.startDone = nil
			if r.err != nil {
				if errors.Is(r.err, subnet.ErrInvalidConfig) {
					return asConfigError(fmt.Errorf("network config in etcd: %w", r.err))
				}
				if errors.Is(r.err, subnet.ErrRefused) {
					return asConfigError(fmt.Errorf("etcd: %w", r.err))
				}
				return fmt.Errorf("take a subnet lease: %w", r.err)
			}
			if err := d.startDataPlane(r.cfg, r.lease); err != nil {
				return err
			}

		case batch := <-d.events:
			d.be.Apply(batch)
			d.notePeers(batch)
			d.policyLeases(batch)
			if !d.envWritten {
				if err := d.finishStartup(); err != nil {
					return err
				}
			}

		case err := <-d.mgrDone:
			d.mgrDone = nil
			if err == nil {
				err = errors.New("stopped unexpectedly")
			}
			return fmt.Errorf("lease %s: %w", d.lease.Subnet, err)

		case err := <-d.beDone:
			d.beDone, d.beRunning = nil, false
			if err == nil {
				err = errors.New("stopped unexpectedly")
			}
			return fmt.Errorf("data plane: %w", err)

		case err := <-httpDone:
			return err

		case <-ticker.C:
			if err := d.onTick(time.Now()); err != nil {
				return err
			}
		}
	}
}

// checkNetworkConfig refuses, before any lease is taken, a network config
// that tulled cannot carry.
func checkNetworkConfig(cfg *subnet.Config) error {
	if cfg.BackendType != "udp" {
		return fmt.Errorf("Backend.Type is %q: tulled carries only flannel's udp backend", cfg.BackendType)
	}
	if !cfg.EnableIPv4 {
		return errIPv6Only
	}
	return nil
}

// startDataPlane runs once the lease is held: TUN device, data plane,
// lease manager.
func (d *daemon) startDataPlane(cfg *subnet.Config, lease subnet.Lease) error {
	d.netCfg, d.lease, d.mtu = cfg, lease, tunMTU(d.sel, cfg)
	exp := "never (reservation)"
	if !lease.Reservation {
		exp = lease.Expiration.UTC().Format(time.RFC3339)
	}
	d.log.Info("network config", "network", cfg.Network, "subnet_len", cfg.SubnetLen, "backend", cfg.BackendType, "port", cfg.Port,
		"direct_routing", cfg.DirectRouting, "subnet", lease.Subnet, "lease_expires", exp,
		"ipv6_network", cfg.IPv6Network, "ipv6_subnet", lease.IPv6Subnet, "ipv6_underlay", d.ipv6Underlay(cfg))
	if !lease.Subnet.IsValid() {
		return asConfigError(errors.New("lease has no IPv4 subnet: flannel's etcd layout keys every lease by its IPv4 subnet"))
	}
	if err := checkDualStack(cfg, lease, d.mtu); err != nil {
		return err
	}

	d.phase = "starting the data plane"
	opts := udp.Options{
		TunName:   d.cfg.TunName,
		Driver:    d.cfg.TunDriver,
		Workers:   d.cfg.Workers,
		Port:      cfg.Port,
		PublicIP:  d.sel.PublicIP,
		MTU:       d.mtu,
		Network:   cfg.Network,
		SubnetLen: cfg.SubnetLen,
		Lease:     lease,
		Logger:    d.log.With("component", "dataplane"),

		DirectRouting: cfg.DirectRouting,
		Underlay:      d.sel.Index,
	}
	d.dualStackOptions(&opts, cfg) // dualstack.go
	be, err := udp.New(opts)
	if err != nil {
		return fmt.Errorf("data plane: %w", err)
	}
	d.be = be
	if err := d.metrics.Register(be.Collector()); err != nil {
		d.log.Warn("data plane metrics not registered", "error", err)
	}
	d.log.Info("TUN device up", "device", d.cfg.TunName, "addr", netip.PrefixFrom(lease.Subnet.Addr(), 32),
		"route", cfg.Network, "route6", opts.IPv6Network, "mtu", d.mtu, "port", cfg.Port)

	d.beDone = make(chan error, 1)
	d.beRunning = true
	d.wg.Go(func() { d.beDone <- be.Run(d.runCtx) })

	d.phase = "waiting for the lease list"
	d.events = make(chan []subnet.Event, 1)
	d.mgrDone = make(chan error, 1)
	d.wg.Go(func() { d.mgrDone <- d.mgr.Run(d.runCtx, d.events) })
	d.startPolicy()
	return nil
}

// finishStartup runs after the first batch of lease events is applied:
// subnet.env, then ip-masq.
func (d *daemon) finishStartup() error {
	env := subnet.Env{Network: d.netCfg.Network, Subnet: d.lease.Subnet, MTU: d.mtu, IPMasq: d.cfg.IPMasq}
	if d.netCfg.EnableIPv6 {
		env.IPv6Network, env.IPv6Subnet = d.netCfg.IPv6Network, d.lease.IPv6Subnet
	}
	if err := subnet.WriteEnv(d.cfg.SubnetFile, env); err != nil {
		return fmt.Errorf("subnet file: %w", err)
	}
	d.envWritten = true
	d.log.Info("subnet file written", "file", d.cfg.SubnetFile, "subnet", dockerBIP(d.lease.Subnet), "ipv6_subnet", envIPv6Subnet(env), "mtu", env.MTU, "ip_masq", env.IPMasq)
	if d.cfg.IPMasq {
		d.phase = "installing ip-masq rules"
		d.tryMasq(time.Now())
	}
	return nil
}

// tryMasq installs the ip-masq rules; on success a goroutine keeps them,
// on failure the main loop tries again after masqEvery.
func (d *daemon) tryMasq(now time.Time) {
	if d.masq == nil {
		rules, err := d.newMasqRules() // dualstack.go
		if err != nil {
			d.masqFailed(now, err)
			return
		}
		d.masq = rules
	}
	for _, m := range d.masq {
		if _, err := m.Ensure(); err != nil {
			d.masqFailed(now, err)
			return
		}
	}
	d.masqInstalled, d.masqErr = true, nil
	d.log.Info("ip-masq rules installed", "chain", ipmasq.Chain, "network", d.netCfg.Network, "subnet", d.lease.Subnet,
		"ipv6_network", d.netCfg.IPv6Network, "ipv6_subnet", d.lease.IPv6Subnet)
	for _, m := range d.masq {
		d.wg.Go(func() { m.Keep(d.runCtx, masqEvery) })
	}
}

func (d *daemon) masqFailed(now time.Time, err error) {
	if d.masqErr == nil || d.masqErr.Error() != err.Error() {
		d.log.Error("ip-masq rules not installed; retrying", "error", err, "every", masqEvery)
	}
	d.masqErr = err
	d.nextMasqTry = now.Add(masqEvery)
}

// notePeers logs hosts joining and leaving (not our own lease). The
// first batch, every lease of the cluster, is logged per peer at debug
// level and summed up in one line: tens of thousands of lines at start
// help no one and cost a large cluster's hosts CPU at once.
func (d *daemon) notePeers(batch []subnet.Event) {
	first := !d.envWritten
	level := slog.LevelInfo
	if first {
		level = slog.LevelDebug
	}
	for _, ev := range batch {
		l := ev.Lease
		if l.Subnet == d.lease.Subnet {
			continue
		}
		switch ev.Type {
		case subnet.EventAdded:
			old, known := d.peers[l.Subnet]
			d.peers[l.Subnet] = l.Attrs.PublicIP
			if !known || old != l.Attrs.PublicIP {
				kind, version := hostKind(l.Attrs)
				d.log.Log(context.Background(), level, "peer added", "subnet", l.Subnet, "ipv6_subnet", l.IPv6Subnet, "public_ip", l.Attrs.PublicIP,
					"public_ipv6", l.Attrs.PublicIPv6, "host", kind, "version", version)
			}
		case subnet.EventRemoved:
			if _, known := d.peers[l.Subnet]; known {
				delete(d.peers, l.Subnet)
				d.log.Log(context.Background(), level, "peer removed", "subnet", l.Subnet, "public_ip", l.Attrs.PublicIP)
			}
		}
	}
	if first {
		d.log.Info("peers known", "peers", len(d.peers))
	}
}

// onTick checks the data plane and the lease, retries ip-masq, and pings
// the watchdog while both planes are healthy.
func (d *daemon) onTick(now time.Time) error {
	if d.cfg.IPMasq && d.envWritten && !d.masqInstalled && !now.Before(d.nextMasqTry) {
		d.tryMasq(now)
	}
	dataOK := true
	if d.be != nil {
		if d.be.Alive() {
			d.beDeadSince = time.Time{}
		} else {
			dataOK = false
			if d.beDeadSince.IsZero() {
				d.beDeadSince = now
			} else if now.Sub(d.beDeadSince) > deadGrace {
				return errors.New("data plane: a worker died")
			}
		}
	}
	if d.mgr != nil && d.lease.Subnet.IsValid() {
		if st := d.mgr.Status(); st.LeaseHeld && st.Lease.Subnet.IsValid() && st.Lease.Subnet != d.lease.Subnet {
			return fmt.Errorf("lease moved from %s to %s; restart to use the new subnet", d.lease.Subnet, st.Lease.Subnet)
		}
	}
	// The control plane is healthy while its goroutines run; a deadlocked
	// manager blocks mgr.Status() in publish, and so these pings.
	controlOK := d.startDone != nil || d.mgrDone != nil
	if controlOK && dataOK {
		d.notify.Watchdog()
	}
	return nil
}

// publish turns the state into /healthz, /readyz, metrics and STATUS=.
func (d *daemon) publish() {
	d.health.Tick()
	st := health.Status{
		Phase:            d.phase,
		DataPlaneRunning: d.be != nil && d.beRunning && d.be.Alive(),
		SubnetEnvWritten: d.envWritten,
		SubnetFile:       d.cfg.SubnetFile,
		IPMasqWanted:     d.cfg.IPMasq,
		IPMasqInstalled:  d.masqInstalled,
		Stopping:         d.stopping,
	}
	if d.masqErr != nil {
		st.IPMasqError = d.masqErr.Error()
	}
	snap := metrics.Snapshot{}
	if d.mgr != nil {
		ms := d.mgr.Status()
		st.EtcdConnected = ms.Registry.Connected
		st.EtcdDetail = ms.Registry.Detail // "waiting for etcd at ...: <cause>" while it does not answer
		st.LeaseHeld = ms.LeaseHeld
		if !ms.LeaseHeld && ms.Phase != subnet.PhaseNew {
			st.LeasePhase = ms.Phase
		}
		now := time.Now()
		st.LeaseProblem = leaseProblem(ms, now)
		if d.envWritten { // the watch runs from the first lease list on
			st.WatchProblem = watchProblem(ms.Registry, now)
		}
		snap = metrics.Snapshot{
			LeaseHeld:       ms.LeaseHeld,
			LeaseExpiry:     ms.Lease.Expiration,
			Reservation:     ms.Lease.Reservation,
			RenewFailures:   ms.RenewFailures,
			EtcdConnected:   ms.Registry.Connected,
			WatchRevision:   ms.Registry.WatchRevision,
			MalformedLeases: ms.Registry.MalformedLeases,
		}
	}
	reason := st.NotReadyReason()
	snap.Ready = reason == ""
	d.health.Publish(st)
	d.snap.Store(&snap)

	line := d.statusLine(reason)
	switch {
	case reason == "" && !d.ready:
		d.ready = true
		d.phase = "running"
		line = d.statusLine(reason)
		d.log.Info("ready", "subnet", d.lease.Subnet, "ipv6_subnet", d.lease.IPv6Subnet, "public_ip", d.sel.PublicIP, "peers", len(d.peers))
		d.notify.Ready(line)
	case reason == "" && d.lastReason != "":
		d.log.Info("ready again")
		d.notify.Status(line)
	case reason != "" && d.ready && reason != d.lastReason && !d.stopping:
		d.log.Warn("not ready", "reason", reason)
		d.notify.Status(line)
	default:
		d.notify.Status(line)
	}
	d.lastReason = reason
}

func (d *daemon) statusLine(reason string) string {
	switch {
	case d.stopping:
		return d.stopStatus
	case reason == "":
		return fmt.Sprintf("running: subnet %s, %d peers", subnetsText(d.lease), len(d.peers))
	case !d.ready:
		return "starting: " + reason
	default:
		return "not ready: " + reason
	}
}

// shutdown takes down what run set up, in reverse, and returns cause.
func (d *daemon) shutdown(cause error) error {
	d.stopping = true
	d.phase = "stopping"
	d.stopStatus = "stopping"
	if cause != nil {
		d.stopStatus = "stopping: " + cause.Error()
	}
	d.notify.Stopping(d.stopStatus)
	d.publish()
	d.log.Info("shutting down")

	d.cancelRun()
	d.waitGoroutines()
	if d.be != nil {
		if err := d.be.Close(); err != nil {
			d.log.Error("remove TUN device", "device", d.cfg.TunName, "error", err)
		} else {
			d.log.Info("data plane stopped; TUN device removed", "device", d.cfg.TunName)
		}
	}
	for _, m := range d.masq {
		if err := m.Remove(); err != nil {
			d.log.Error("remove ip-masq rules", "family", m.Family(), "error", err)
		} else {
			d.log.Info("ip-masq rules removed", "chain", ipmasq.Chain, "family", m.Family())
		}
	}
	if d.reg != nil {
		if err := d.reg.Close(); err != nil {
			d.log.Warn("close etcd connection", "error", err)
		}
	}
	if d.lease.Subnet.IsValid() {
		d.log.Info("lease left in etcd for the next start", "subnet", d.lease.Subnet)
	}
	return cause
}

// waitGoroutines waits for every goroutine of the run, draining lease
// events meanwhile so the manager is never stuck sending one.
func (d *daemon) waitGoroutines() {
	done := make(chan struct{})
	go func() {
		d.wg.Wait()
		close(done)
	}()
	timeout := time.NewTimer(stopTimeout)
	defer timeout.Stop()
	for {
		select {
		case <-done:
			return
		case <-d.events: // nil before the manager runs: never ready
		case <-timeout.C:
			d.log.Error("goroutines did not stop in time; going on with the shutdown", "waited", stopTimeout)
			return
		}
	}
}

// newRegistry opens the etcd registry the --etcd-* flags describe;
// dialTimeout 0 is the registry's default.
func newRegistry(e config.Etcd, dialTimeout time.Duration, log *slog.Logger) (*etcdreg.Registry, error) {
	return etcdreg.New(etcdreg.Config{
		Endpoints:   e.Endpoints,
		Prefix:      e.Prefix,
		CAFile:      e.CAFile,
		CertFile:    e.CertFile,
		KeyFile:     e.KeyFile,
		Username:    e.Username,
		Password:    e.Password,
		DialTimeout: dialTimeout,
	}, log)
}
