//go:build race

package udp

// raceEnabled: the race detector allocates on its own (e.g. wireguard's
// append in GRO coalescing), so allocation counts under -race say nothing.
const raceEnabled = true
