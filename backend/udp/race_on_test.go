//go:build race

package udp

// allocWindow is the number of packets each way over which the
// zero-allocation tests count mallocs: fewer under the race detector,
// which runs the loops about ten times slower (the window stays far above
// the 100 packets one malloc per batch would cost).
const allocWindow = 20000
