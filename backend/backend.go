// Package backend defines what the daemon drives: a data plane that carries
// overlay traffic to the holders of other subnet leases. The daemon creates
// one (package backend/udp for flannel's udp backend), feeds it every lease
// event batch from the subnet manager, runs it, and closes it on shutdown.
package backend

import (
	"context"

	"github.com/tulle-net/tulle/subnet"
)

// Backend is a running data plane.
type Backend interface {
	// Run moves packets until ctx is done (it then returns nil) or until the
	// data plane fails (it returns the cause). It may be called once.
	Run(ctx context.Context) error
	// Apply takes one batch of lease events, in order (the first batch is the
	// snapshot of all leases, own lease included). It never blocks on the
	// data path and may be called before, during and after Run.
	Apply(events []subnet.Event)
	// Close releases the device and sockets; safe to call more than once and
	// after a failed Run.
	Close() error
}
