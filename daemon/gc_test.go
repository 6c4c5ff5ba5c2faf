package daemon

import (
	"io"
	"log/slog"
	"runtime/debug"
	"testing"
)

func TestGOGCIsTulledsUnlessTheOperatorSetsOne(t *testing.T) {
	prev := debug.SetGCPercent(100)
	defer debug.SetGCPercent(prev)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	tuneGC([]string{"GOGC=200"}, log)
	if got := debug.SetGCPercent(100); got != 100 {
		t.Errorf("with GOGC in the environment: GC percent %d, want it left at 100", got)
	}
	tuneGC([]string{"PATH=/usr/bin"}, log)
	if got := debug.SetGCPercent(100); got != gcPercent {
		t.Errorf("without GOGC: GC percent %d, want %d", got, gcPercent)
	}
}
