package subnet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/tulle-net/tulle/subnet/internal/backoff"
)

// startRefusals is how many refusals in a row end Start.
const startRefusals = 3

// Defaults of ManagerOptions.
const (
	DefaultLeaseTTL     = 24 * time.Hour
	DefaultRenewMargin  = 60 * time.Minute
	DefaultStartTimeout = 10 * time.Minute
)

// Phases reported in ManagerStatus.Phase.
const (
	PhaseNew            = "not started"
	PhaseWaitingEtcd    = "waiting for etcd"
	PhaseWaitingConfig  = "waiting for network config"
	PhaseAcquiring      = "acquiring lease"
	PhaseHolding        = "holding lease"
	PhaseRenewalFailing = "renewal failing"
	PhaseReacquiring    = "re-acquiring lease"
	PhaseLeaseLost      = "lease lost"
	PhaseStartFailed    = "start failed"
	PhaseStopped        = "stopped"
)

// ManagerOptions says what lease to take and how to keep it.
type ManagerOptions struct {
	PublicIP, PublicIPv6 netip.Addr
	BackendType          string
	BackendData          json.RawMessage
	PreviousSubnet       netip.Prefix  // from subnet.env, zero if none
	PreviousIPv6Subnet   netip.Prefix  // FLANNEL_IPV6_SUBNET from subnet.env, zero if none
	LeaseTTL             time.Duration // default 24h
	RenewMargin          time.Duration // default 60m; if >= LeaseTTL/2 renew at LeaseTTL/2
	StartTimeout         time.Duration // give up waiting for etcd at start (default 10m)
	// CheckConfig, if set, vets the network config before any lease is
	// taken (e.g. the backend type the caller carries); its error ends
	// Start, wrapped in ErrInvalidConfig.
	CheckConfig func(*Config) error
	// BackendDataFor, if set, gives the lease's BackendData for the
	// network config (features that depend on it, e.g. DirectRouting) in
	// place of BackendData.
	BackendDataFor func(*Config) json.RawMessage
	Logger         *slog.Logger
}

// ManagerStatus is what the daemon shows in logs, /readyz and metrics.
type ManagerStatus struct {
	Registry       RegistryStatus
	Lease          Lease // the current lease (also while re-acquiring)
	LeaseHeld      bool
	RenewFailures  uint64 // failed renewals and re-acquisitions since start
	LastRenewError error  // nil after a success
	Phase          string // one of the Phase* constants
	// RenewAt is when the lease is due for renewal (RenewMargin before it
	// expires); zero for a reservation or while no lease is held.
	RenewAt time.Time
}

// Manager takes this host's lease from a Registry, keeps it, and forwards
// lease events. Start, then Run; Status may be called at any time.
type Manager struct {
	reg  Registry
	opts ManagerOptions
	log  *slog.Logger

	mu            sync.Mutex
	cfg           *Config
	lease         Lease
	held          bool
	renewFailures uint64
	lastRenewErr  error
	phase         string
}

// NewManager returns a Manager for reg with opts' defaults applied.
func NewManager(reg Registry, opts ManagerOptions) *Manager {
	if opts.LeaseTTL <= 0 {
		opts.LeaseTTL = DefaultLeaseTTL
	}
	if opts.RenewMargin <= 0 {
		opts.RenewMargin = DefaultRenewMargin
	}
	if opts.RenewMargin >= opts.LeaseTTL/2 {
		opts.RenewMargin = opts.LeaseTTL / 2
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = DefaultStartTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Manager{reg: reg, opts: opts, log: opts.Logger, phase: PhaseNew}
}

// Start waits for the registry (capped backoff, each failure logged with
// its cause and shown in Status), reads the config, acquires the lease.
// It waits while etcd is unreachable or the config is missing, for at most
// StartTimeout, then fails with the last cause. An invalid config or a
// network without a free subnet fails at once; a refusal (ErrRefused: a
// wrong password, no permission, a certificate refused) after 3 attempts.
func (m *Manager) Start(ctx context.Context) (*Config, Lease, error) {
	if !m.opts.PublicIP.Is4() {
		return nil, Lease{}, fmt.Errorf("start: public IP %v: must be an IPv4 address", m.opts.PublicIP)
	}
	attrs := LeaseAttrs{PublicIP: m.opts.PublicIP, PublicIPv6: m.opts.PublicIPv6, BackendType: m.opts.BackendType, BackendData: m.opts.BackendData}
	if _, err := attrs.MarshalJSON(); err != nil {
		return nil, Lease{}, fmt.Errorf("start: %w", err)
	}
	deadline := time.Now().Add(m.opts.StartTimeout)
	sctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	bo := backoff.Backoff{Min: 100 * time.Millisecond, Max: 10 * time.Second}
	var lastErr error
	refusals := 0
	for attempt := 1; ; attempt++ {
		m.setPhase(PhaseWaitingEtcd)
		cfg, err := m.reg.GetNetworkConfig(sctx)
		if err == nil && m.opts.CheckConfig != nil {
			if cerr := m.opts.CheckConfig(cfg); cerr != nil {
				err = fmt.Errorf("%w: %w", ErrInvalidConfig, cerr)
			}
		}
		if err == nil {
			m.setPhase(PhaseAcquiring)
			if m.opts.BackendDataFor != nil {
				attrs.BackendData = m.opts.BackendDataFor(cfg)
			}
			// PublicIPv6 only in a dual-stack network, as flannel writes it.
			attrs.PublicIPv6 = netip.Addr{}
			if cfg.EnableIPv6 {
				attrs.PublicIPv6 = m.opts.PublicIPv6
			}
			prev := Allocation{Subnet: m.opts.PreviousSubnet, IPv6Subnet: m.opts.PreviousIPv6Subnet}
			var l Lease
			l, err = m.reg.AcquireLease(sctx, cfg, attrs, prev, m.opts.LeaseTTL)
			if err == nil {
				m.mu.Lock()
				m.cfg, m.lease, m.held, m.phase = cfg, l, true, PhaseHolding
				m.mu.Unlock()
				m.log.Info("lease acquired", "subnet", l.Subnet, "ipv6_subnet", l.IPv6Subnet, "public_ip", l.Attrs.PublicIP,
					"reservation", l.Reservation, "expires", l.Expiration)
				return cfg, l, nil
			}
		}
		if errors.Is(err, ErrInvalidConfig) || errors.Is(err, ErrNoFreeSubnet) {
			m.setPhase(PhaseStartFailed)
			return nil, Lease{}, fmt.Errorf("start: %w", err)
		}
		// A refusal (password, permission, certificates) is retried a few
		// times only, in case it was being fixed as we started.
		if errors.Is(err, ErrRefused) {
			if refusals++; refusals >= startRefusals {
				m.setPhase(PhaseStartFailed)
				return nil, Lease{}, fmt.Errorf("start: refused %d times: %w", refusals, err)
			}
		} else {
			refusals = 0
		}
		if ctx.Err() != nil {
			m.setPhase(PhaseStopped)
			return nil, Lease{}, ctx.Err()
		}
		if lastErr == nil || sctx.Err() == nil {
			lastErr = err // keep the informative cause, not the final deadline
		}
		remaining := time.Until(deadline)
		if sctx.Err() != nil || remaining <= 0 {
			m.setPhase(PhaseStartFailed)
			return nil, Lease{}, fmt.Errorf("start: gave up after %s: %w", m.opts.StartTimeout, lastErr)
		}
		phase := PhaseWaitingEtcd
		if errors.Is(err, ErrConfigNotFound) {
			phase = PhaseWaitingConfig
		}
		m.setPhase(phase)
		d := min(bo.Next(), remaining)
		m.log.Warn(phase, "error", err, "attempt", attempt, "retry_in", d.Round(time.Millisecond), "gives_up_in", remaining.Round(time.Second))
		backoff.Sleep(sctx, d)
	}
}

// Run keeps the lease (renews at the margin, retries with backoff; if the
// own key is deleted/expired re-acquires the same subnet) and forwards
// lease event batches (first batch = snapshot of all leases, as EventAdded;
// own lease included) to events. Own-key events are forwarded as they
// happen (a deleted own key: EventRemoved, then EventAdded once
// re-acquired). Returns nil when ctx is done, an error wrapping
// ErrLeaseLost if the own subnet can not be re-acquired (daemon exits
// non-zero).
func (m *Manager) Run(ctx context.Context, events chan<- []Event) error {
	m.mu.Lock()
	started := m.held
	m.mu.Unlock()
	if !started {
		return errors.New("run: Start has not acquired a lease")
	}
	wctx, cancel := context.WithCancel(ctx)
	internal := make(chan []Event)
	watchDone := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		watchDone <- m.reg.WatchLeases(wctx, internal)
	}()
	defer func() {
		cancel()
		wg.Wait()
	}()

	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	m.scheduleRenewal(timer)
	// Retry a failed renewal often enough to catch the grace etcd gives
	// leases when it comes back (a restarted etcd extends them by their TTL).
	minDelay := min(200*time.Millisecond, m.opts.LeaseTTL/10)
	bo := backoff.Backoff{Min: minDelay, Max: max(min(10*time.Second, m.opts.LeaseTTL/4), minDelay)}
	first := true
	for {
		select {
		case <-ctx.Done():
			m.setPhase(PhaseStopped)
			return nil
		case err := <-watchDone:
			if ctx.Err() != nil {
				m.setPhase(PhaseStopped)
				return nil
			}
			return fmt.Errorf("watch leases: stopped early: %v", err)
		case batch := <-internal:
			gone, lost := m.inspect(batch, first)
			first = false
			select {
			case events <- batch:
			case <-ctx.Done():
				m.setPhase(PhaseStopped)
				return nil
			}
			if lost != nil {
				m.setPhase(PhaseLeaseLost)
				m.log.Error("lease lost", "error", lost)
				return lost
			}
			if gone {
				timer.Reset(0)
			}
		case <-timer.C:
			if err := m.keep(ctx, timer, &bo); err != nil {
				if ctx.Err() != nil {
					m.setPhase(PhaseStopped)
					return nil
				}
				return err
			}
		}
	}
}

// keep renews the lease, or re-acquires it if it is gone, and schedules the
// next attempt. It returns only an ErrLeaseLost error.
func (m *Manager) keep(ctx context.Context, timer *time.Timer, bo *backoff.Backoff) error {
	m.mu.Lock()
	l, held := m.lease, m.held
	m.mu.Unlock()
	if held {
		nl, err := m.reg.RenewLease(ctx, l, m.opts.LeaseTTL)
		switch {
		case err == nil:
			bo.Reset()
			m.mu.Lock()
			m.lease, m.lastRenewErr, m.phase = nl, nil, PhaseHolding
			m.mu.Unlock()
			m.scheduleRenewal(timer)
			return nil
		case errors.Is(err, ErrLeaseGone):
			m.markGone(err)
			timer.Reset(0)
			return nil
		case ctx.Err() != nil:
			return ctx.Err()
		}
		d := bo.Next()
		m.failure(err, PhaseRenewalFailing)
		m.log.Warn("lease renewal failed; retrying", "subnet", l.Subnet, "error", err, "retry_in", d.Round(time.Millisecond),
			"expires", l.Expiration)
		timer.Reset(d)
		return nil
	}
	nl, err := m.reg.ReacquireLease(ctx, l, m.opts.LeaseTTL)
	switch {
	case err == nil:
		bo.Reset()
		m.mu.Lock()
		m.lease, m.held, m.lastRenewErr, m.phase = nl, true, nil, PhaseHolding
		m.mu.Unlock()
		m.log.Info("lease re-acquired", "subnet", nl.Subnet, "reservation", nl.Reservation, "expires", nl.Expiration)
		m.scheduleRenewal(timer)
		return nil
	case errors.Is(err, ErrSubnetTaken):
		m.setPhase(PhaseLeaseLost)
		m.log.Error("lease lost: another host holds our subnet", "subnet", l.Subnet, "error", err)
		return fmt.Errorf("lease %s: %w: %w", l.Subnet, ErrLeaseLost, err)
	case ctx.Err() != nil:
		return ctx.Err()
	}
	d := bo.Next()
	m.failure(err, PhaseReacquiring)
	m.log.Warn("re-acquiring lease failed; retrying", "subnet", l.Subnet, "error", err, "retry_in", d.Round(time.Millisecond))
	timer.Reset(d)
	return nil
}

// inspect looks for events about the own subnet: gone means the key was
// deleted, expired or moved to another etcd lease (re-acquire); lost means
// another host now holds it.
func (m *Manager) inspect(batch []Event, snapshot bool) (gone bool, lost error) {
	m.mu.Lock()
	l, held := m.lease, m.held
	m.mu.Unlock()
	seen := false
	var cause string
	for _, ev := range batch {
		if ev.Lease.Subnet != l.Subnet || ev.Lease.IPv6Subnet != l.IPv6Subnet {
			continue
		}
		seen = true
		switch {
		case ev.Type == EventRemoved:
			gone, cause = held, "own lease key deleted or expired"
		case ev.Lease.Attrs.PublicIP != l.Attrs.PublicIP:
			return false, fmt.Errorf("lease %s: %w: %w: now held by %s", l.Subnet, ErrLeaseLost, ErrSubnetTaken, ev.Lease.Attrs.PublicIP)
		case held && ev.Lease.LeaseID != l.LeaseID:
			// Someone re-put our key: take it over cleanly.
			gone, cause = true, fmt.Sprintf("own lease key moved to etcd lease %x (ours: %x)", ev.Lease.LeaseID, l.LeaseID)
		default:
			gone = false
		}
	}
	if snapshot && !seen {
		gone, cause = held, "own lease key missing from the first snapshot"
	}
	if gone {
		m.markGone(errors.New(cause))
	}
	return gone, nil
}

func (m *Manager) markGone(cause error) {
	m.mu.Lock()
	l := m.lease
	wasHeld := m.held
	m.held, m.phase = false, PhaseReacquiring
	m.mu.Unlock()
	if wasHeld {
		m.log.Warn("own lease is gone; re-acquiring the same subnet", "subnet", l.Subnet, "cause", cause)
	}
}

func (m *Manager) failure(err error, phase string) {
	m.mu.Lock()
	m.renewFailures++
	m.lastRenewErr = err
	m.phase = phase
	m.mu.Unlock()
}

// scheduleRenewal sets timer to the next renewal: RenewMargin before
// expiry (at most TTL/2 after acquiring); never for a reservation.
func (m *Manager) scheduleRenewal(timer *time.Timer) {
	m.mu.Lock()
	l := m.lease
	m.mu.Unlock()
	if l.Reservation {
		timer.Stop()
		return
	}
	timer.Reset(max(time.Until(l.Expiration)-m.opts.RenewMargin, 0))
}

func (m *Manager) setPhase(p string) {
	m.mu.Lock()
	m.phase = p
	m.mu.Unlock()
}

// Status reports the lease and the registry state.
func (m *Manager) Status() ManagerStatus {
	m.mu.Lock()
	st := ManagerStatus{Lease: m.lease, LeaseHeld: m.held, RenewFailures: m.renewFailures, LastRenewError: m.lastRenewErr, Phase: m.phase}
	if m.held && !m.lease.Reservation && !m.lease.Expiration.IsZero() {
		st.RenewAt = m.lease.Expiration.Add(-m.opts.RenewMargin)
	}
	m.mu.Unlock()
	st.Registry = m.reg.Status()
	return st
}

// Config returns the network config read by Start (nil before).
func (m *Manager) Config() *Config {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cfg
}
