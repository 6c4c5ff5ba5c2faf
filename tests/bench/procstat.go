package main

import "github.com/tulle-net/tulle/tests/procstat"

// The /proc readers are tests/procstat's, shared with tests/scale.
var (
	processCPU   = procstat.CPU
	parseStatCPU = procstat.ParseStatCPU
	statusKB     = procstat.StatusKB
)

// processPeakRSS returns the process's peak resident set size in bytes
// (VmHWM of /proc/<pid>/status).
func processPeakRSS(pid int) (int64, error) {
	m, err := procstat.ReadMemory(pid)
	return m.PeakRSS, err
}
