//go:build !race

package udp

// allocWindow is the number of packets each way over which the
// zero-allocation tests count mallocs (see race_on_test.go).
const allocWindow = 100000
