package procstat

import (
	"bufio"
	"os"
	"strings"
	"testing"
	"time"
)

func TestParseStatCPUCountsUserAndSystemTime(t *testing.T) {
	for _, c := range []struct {
		stat string
		want time.Duration
	}{
		// Command names with spaces and parentheses must not shift the fields.
		{"1234 (tulled (x)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0", 3 * time.Second},
		{"4242 (tull ed) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 100 123456 789 18446744073709551615", 3250 * time.Millisecond},
	} {
		if got, err := ParseStatCPU(c.stat); err != nil || got != c.want {
			t.Errorf("ParseStatCPU(%q) = %v, %v; want %v", c.stat, got, err, c.want)
		}
	}
	for _, bad := range []string{"4242 (short) S 1", "no command name", "1 (x) S 1 2 3 4 5 6 7 8 9 10 many 50 0"} {
		if got, err := ParseStatCPU(bad); err == nil {
			t.Errorf("ParseStatCPU(%q) = %v, want an error", bad, got)
		}
	}
	if self, err := CPU(os.Getpid()); err != nil || self < 0 {
		t.Errorf("own cpu time = %v, %v", self, err)
	}
}

func TestParseStatusMemory(t *testing.T) {
	m, err := ParseStatusMemory("Name:\ttulled\nVmPeak:\t  800000 kB\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\n")
	if err != nil || m.PeakRSS != 2<<20 || m.RSS != 1<<20 {
		t.Errorf("memory = %+v, %v", m, err)
	}
	for _, bad := range []string{"Name:\tx\n", "VmHWM:\t1 kB\n", "VmHWM:\t1 MB\nVmRSS:\t1 kB\n"} {
		if m, err := ParseStatusMemory(bad); err == nil {
			t.Errorf("ParseStatusMemory(%q) = %+v, want an error", bad, m)
		}
	}
	if v, err := StatusKB(bufio.NewScanner(strings.NewReader("VmHWM:\t   23456 kB\n")), "VmHWM"); err != nil || v != 23456 {
		t.Errorf("VmHWM = %d, %v; want 23456", v, err)
	}
	if m, err := ReadMemory(os.Getpid()); err != nil || m.PeakRSS <= 0 || m.RSS <= 0 || m.RSS > m.PeakRSS {
		t.Errorf("own memory = %+v, %v", m, err)
	}
}
