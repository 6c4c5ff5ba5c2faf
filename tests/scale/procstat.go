package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tulle-net/tulle/tests/testbed"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times (100 on every
// Linux architecture Go supports).
const clockTicks = 100

// processCPU returns the CPU time (user + system, all threads) process pid
// has used, from /proc/<pid>/stat.
func processCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu time of pid %d: %w", pid, err)
	}
	return parseStatCPU(string(data))
}

// parseStatCPU reads utime and stime (fields 14 and 15) of a
// /proc/<pid>/stat text; fields are counted from the closing parenthesis
// of the command name, which may hold spaces.
func parseStatCPU(stat string) (time.Duration, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc stat: no command name")
	}
	f := strings.Fields(stat[i+1:]) // f[0] is field 3
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

// memory is what /proc/<pid>/status says of a process's resident memory.
type memory struct {
	PeakRSS int64 `json:"peak_rss_bytes"` // VmHWM
	RSS     int64 `json:"rss_bytes"`      // VmRSS
}

func processMemory(pid int) (memory, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memory{}, fmt.Errorf("memory of pid %d: %w", pid, err)
	}
	return parseStatusMemory(string(data))
}

func parseStatusMemory(status string) (memory, error) {
	var m memory
	found := 0
	sc := bufio.NewScanner(strings.NewReader(status))
	for sc.Scan() {
		name, rest, _ := strings.Cut(sc.Text(), ":")
		var dst *int64
		switch name {
		case "VmHWM":
			dst = &m.PeakRSS
		case "VmRSS":
			dst = &m.RSS
		default:
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return m, fmt.Errorf("/proc status %s: %q: want \"<n> kB\"", name, rest)
		}
		v, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return m, fmt.Errorf("/proc status %s: %w", name, err)
		}
		*dst = v * 1024
		found++
	}
	if found != 2 {
		return m, fmt.Errorf("/proc status: no VmHWM or VmRSS line")
	}
	return m, nil
}

// linkBytes returns the bytes received and sent by link in namespace ns:
// on a host's underlay link, its etcd traffic (nothing else flows there in
// this harness).
func linkBytes(ns, link string) (rx, tx uint64, err error) {
	err = testbed.InNetns(ns, func() error {
		l, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		s := l.Attrs().Statistics
		if s == nil {
			return fmt.Errorf("no statistics")
		}
		rx, tx = s.RxBytes, s.TxBytes
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("byte counters of %s in netns %s: %w", link, ns, err)
	}
	return rx, tx, nil
}
