//go:build race

package tundev_test

// raceEnabled: the race detector turns wireguard's append(b, make(...)...)
// in its GRO coalescing into a real allocation, so allocation counts under
// -race say nothing about the normal build.
const raceEnabled = true
