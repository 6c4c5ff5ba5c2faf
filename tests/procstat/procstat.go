// Package procstat reads what /proc says of a process's CPU time and
// resident memory, for the harnesses that measure tulled (tests/bench,
// tests/scale).
package procstat

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times; it is 100 on
// every Linux architecture Go supports (sysconf(_SC_CLK_TCK) would need cgo).
const clockTicks = 100

// CPU returns the CPU time (user + system, all threads) process pid has
// used so far, from /proc/<pid>/stat.
func CPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu time of pid %d: %w", pid, err)
	}
	return ParseStatCPU(string(data))
}

// ParseStatCPU reads utime and stime (fields 14 and 15) from the text of
// /proc/<pid>/stat. The command name (field 2) may hold spaces and
// parentheses, so fields are counted from its last closing parenthesis.
func ParseStatCPU(stat string) (time.Duration, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		first, _, _ := strings.Cut(stat, "\n")
		return 0, fmt.Errorf("/proc stat %q: no command name", first)
	}
	f := strings.Fields(stat[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc stat: %d fields after the command name, want at least 13", len(f))
	}
	var ticks uint64
	for _, s := range f[11:13] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc stat: utime/stime %q: %w", s, err)
		}
		ticks += v
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

// Memory is what /proc/<pid>/status says of a process's resident memory.
type Memory struct {
	PeakRSS int64 `json:"peak_rss_bytes"` // VmHWM
	RSS     int64 `json:"rss_bytes"`      // VmRSS
}

// ReadMemory returns the resident memory of process pid.
func ReadMemory(pid int) (Memory, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Memory{}, fmt.Errorf("memory of pid %d: %w", pid, err)
	}
	m, err := ParseStatusMemory(string(data))
	if err != nil {
		return m, fmt.Errorf("memory of pid %d: %w", pid, err)
	}
	return m, nil
}

// ParseStatusMemory reads VmHWM and VmRSS from the text of
// /proc/<pid>/status.
func ParseStatusMemory(status string) (Memory, error) {
	var m Memory
	for _, f := range []struct {
		key string
		dst *int64
	}{{"VmHWM", &m.PeakRSS}, {"VmRSS", &m.RSS}} {
		v, err := StatusKB(bufio.NewScanner(strings.NewReader(status)), f.key)
		if err != nil {
			return m, fmt.Errorf("/proc status: %w", err)
		}
		*f.dst = v * 1024
	}
	return m, nil
}

// StatusKB returns the value of a "Key:   123 kB" line of /proc/<pid>/status.
func StatusKB(sc *bufio.Scanner, key string) (int64, error) {
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != key {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, fmt.Errorf("%s: %q: want \"<n> kB\"", key, rest)
		}
		return strconv.ParseInt(fields[0], 10, 64)
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no %s line", key)
}
