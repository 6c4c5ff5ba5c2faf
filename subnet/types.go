package subnet

import (
	"context"
	"encoding/json"
	"net/netip"
	"time"
)

// DefaultPrefix is flanneld's etcd prefix; keys live at <prefix>/config and
// <prefix>/subnets/<key>.
const DefaultPrefix = "/coreos.com/network"

// DefaultEnvFile is where flanneld (and so tulled, by default) writes the
// subnet.env that Docker and CNI read.
const DefaultEnvFile = "/run/flannel/subnet.env"

// DefaultPort is the UDP port of flannel's udp backend.
const DefaultPort = 8285

// Config is a network config as flannel stores it at <prefix>/config, with
// defaults applied and validated by ParseConfig.
type Config struct {
	EnableIPv4 bool
	EnableIPv6 bool

	Network   netip.Prefix // IPv4 overlay network, e.g. 198.18.0.0/16
	SubnetLen int          // length of every lease in Network
	SubnetMin netip.Addr   // first allocatable subnet (aligned)
	SubnetMax netip.Addr   // last allocatable subnet (aligned)

	IPv6Network   netip.Prefix
	IPv6SubnetLen int
	IPv6SubnetMin netip.Addr
	IPv6SubnetMax netip.Addr

	BackendType string          // "udp" when absent
	Port        int             // Backend.Port, DefaultPort when absent
	Backend     json.RawMessage // the raw Backend object, for fields Tulle ignores

	// DirectRouting is Backend.DirectRouting (flannel's vxlan option name;
	// false when absent): on-link Tulle peers are reached by a kernel route
	// instead of the UDP overlay (backend/udp, direct.go).
	DirectRouting bool
	// IPv6Underlay is Backend.IPv6Underlay (false when absent): hosts that
	// both have a PublicIPv6 and both advertise it send each other the
	// overlay's datagrams over the IPv6 underlay instead of the IPv4 one
	// (backend/udp). It does not depend on EnableIPv6: an IPv6 underlay
	// carries inner IPv4 packets too.
	IPv6Underlay bool
}

// LeaseAttrs is the JSON value of a lease key, byte-compatible with flannel:
// {"PublicIP":"192.0.2.1","PublicIPv6":null} for a udp host; BackendType and
// BackendData are omitted when empty. Unknown fields are ignored on read.
type LeaseAttrs struct {
	PublicIP    netip.Addr
	PublicIPv6  netip.Addr // invalid (zero) = null
	BackendType string
	BackendData json.RawMessage
}

// Lease is one subnet key in the registry.
type Lease struct {
	Subnet     netip.Prefix // IPv4 lease, e.g. 198.18.79.0/24
	IPv6Subnet netip.Prefix // zero unless the network is dual stack
	Attrs      LeaseAttrs
	// Expiration is when the etcd lease attached to the key runs out; zero
	// for a reservation.
	Expiration time.Time
	// Reservation is true for a key with no etcd lease attached: it never
	// expires and is never renewed or re-leased.
	Reservation bool
	// LeaseID is the etcd lease attached to the key (0 for a reservation).
	// Registry.RenewLease keeps this lease alive.
	LeaseID int64
}

// EventType says what happened to a lease.
type EventType int

const (
	// EventAdded: a lease appeared or its value changed.
	EventAdded EventType = iota
	// EventRemoved: a lease was deleted or expired.
	EventRemoved
)

// Event is one change of the set of leases.
type Event struct {
	Type  EventType
	Lease Lease
}

// Registry is the store of the network config and the leases (etcd in
// production: package subnet/etcd). Every method honours ctx and returns
// errors that name what failed.
type Registry interface {
	// GetNetworkConfig reads and parses <prefix>/config.
	GetNetworkConfig(ctx context.Context) (*Config, error)
	// AcquireLease takes a lease for attrs.PublicIP in flannel's order:
	// the key already ours, else previous (the subnets subnet.env recorded,
	// see Config.PreviousAllocation) if free, else a random pick among the
	// first 100 free subnets. ttl applies to a new
	// lease and to a reused leased key (moved to a new etcd lease of ttl);
	// a reservation of ours is returned as it is. No free subnet: an error
	// wrapping ErrNoFreeSubnet.
	AcquireLease(ctx context.Context, cfg *Config, attrs LeaseAttrs, previous Allocation, ttl time.Duration) (Lease, error)
	// RenewLease extends lease to ttl from now (a reservation is left as it
	// is) and returns the lease with its new Expiration. It fails with
	// ErrLeaseGone if the key no longer exists or is no longer ours (another
	// PublicIP or another etcd lease than lease.LeaseID).
	RenewLease(ctx context.Context, lease Lease, ttl time.Duration) (Lease, error)
	// ReacquireLease takes lease's subnet again after its key vanished
	// (deleted, expired, or no longer held by lease.LeaseID): a key that
	// holds lease.Attrs.PublicIP is taken over, a missing key is created
	// with the same If Version(key)==0 transaction as AcquireLease. It
	// never picks another subnet: if another host holds the subnet it fails
	// with ErrSubnetTaken.
	ReacquireLease(ctx context.Context, lease Lease, ttl time.Duration) (Lease, error)
	// WatchLeases sends the current set of leases as one batch of
	// EventAdded (possibly empty), then every change, to events, until ctx is
	// done. It resumes after errors (from the last revision seen, re-listing
	// and diffing after compaction) and only returns when ctx is done.
	// Leases in events carry LeaseID and Reservation but no Expiration.
	WatchLeases(ctx context.Context, events chan<- []Event) error
	// Status says how the registry connection is, for logs, /readyz and
	// metrics.
	Status() RegistryStatus
	// Close releases the connection.
	Close() error
}

// RegistryStatus is the registry's connection and watch state.
type RegistryStatus struct {
	Connected bool
	// Detail says what it is doing, e.g.
	// "waiting for etcd at http://127.0.0.1:2379: connection refused".
	Detail        string
	LastError     error
	WatchRevision int64 // last etcd revision the watch has seen
	// MalformedLeases counts lease keys or values written by someone else
	// that could not be parsed and were skipped (each version once).
	MalformedLeases uint64
	// WatchAttempts counts how often the watch was started or restarted
	// (first start included); it grows slowly while etcd is down.
	WatchAttempts uint64
	// WatchDownSince is when the lease watch stopped working (or was
	// started and has not yet been confirmed by etcd); zero while it works.
	WatchDownSince time.Time
}
