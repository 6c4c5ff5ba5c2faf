package daemon

import (
	"log/slog"
	"runtime/debug"
	"strings"
)

// gcPercent is tulled's GOGC unless the operator sets one. The data plane
// allocates nothing per packet; what allocates is the control plane, in
// bursts (the lease snapshot at start, a burst of lease changes, a
// /metrics scrape of every peer), and with Go's default of 100 the heap
// grows to twice what is live before a collection. 50 keeps the peak at
// 1.5 times, for a few more collections of a heap that is mostly idle.
const gcPercent = 50

// tuneGC sets gcPercent unless GOGC is in env (the operator's choice).
func tuneGC(env []string, log *slog.Logger) {
	for _, kv := range env {
		if strings.HasPrefix(kv, "GOGC=") {
			log.Debug("GOGC set in the environment; kept", "GOGC", strings.TrimPrefix(kv, "GOGC="))
			return
		}
	}
	debug.SetGCPercent(gcPercent)
}
