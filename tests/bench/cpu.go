package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// softirqThreads returns the PIDs of the kernel's ksoftirqd threads: the
// network processing that does not run in the context of the process
// that set it off runs there.
func softirqThreads() []int {
	comms, _ := filepath.Glob("/proc/[0-9]*/comm")
	var pids []int
	for _, c := range comms {
		data, err := os.ReadFile(c)
		if err != nil || !strings.HasPrefix(string(data), "ksoftirqd/") {
			continue
		}
		if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(c))); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// threadsCPU is the CPU time the processes pids have used so far; those
// that cannot be read count nothing.
func threadsCPU(pids []int) time.Duration {
	var total time.Duration
	for _, pid := range pids {
		if d, err := processCPU(pid); err == nil {
			total += d
		}
	}
	return total
}
