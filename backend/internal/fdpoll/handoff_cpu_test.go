//go:build linux

package fdpoll

import (
	"errors"
	"fmt"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkHandOffPlacement is BenchmarkHandOff with both threads pinned
// on the same CPU (the waker and the woken share it: the wakeup needs no
// IPI) or on two CPUs (the woken thread's CPU may be idle: an IPI, and in a
// VM an exit to wake the vCPU), or left to the scheduler; each waiting
// with Wait (the P handed back) or WaitHot (kept); with gaps between
// hand-offs that let the CPUs go idle, up to longer than sysmon waits
// before it takes a P from a thread blocked in a system call (10 ms).
func BenchmarkHandOffPlacement(b *testing.B) {
	if runtime.NumCPU() < 2 {
		b.Skip("needs 2 CPUs")
	}
	for _, place := range []string{"same-cpu", "two-cpus", "unpinned"} {
		for _, wait := range []string{"wait", "hot"} {
			for _, gap := range []time.Duration{0, time.Millisecond, 10 * time.Millisecond, 50 * time.Millisecond} {
				b.Run(fmt.Sprintf("%s/%s/gap=%v", place, wait, gap), func(b *testing.B) {
					handOff(b, place, wait == "hot", gap)
				})
			}
		}
	}
}

func pin(b *testing.B, cpu int) {
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		b.Fatal(err)
	}
}

// handOff times hand-offs between this thread and an echo thread, both
// locked, over two pipes: place is "same-cpu", "two-cpus" or "unpinned";
// hot waits with WaitHot instead of Wait; gap is the idle time between
// round trips.
func handOff(b *testing.B, place string, hot bool, gap time.Duration) {
	var ab, ba [2]int
	for _, p := range []*[2]int{&ab, &ba} {
		if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
			b.Fatal(err)
		}
	}
	defer func() {
		for _, fd := range []int{ab[0], ab[1], ba[0], ba[1]} {
			unix.Close(fd)
		}
	}()
	s, err := NewStop()
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	recv := func(fd int) bool {
		var buf [1]byte
		for {
			if _, err := unix.Read(fd, buf[:]); err == nil {
				return true
			}
			var err error
			if hot {
				err = s.WaitHot(fd, unix.POLLIN, time.Second)
			} else {
				err = s.Wait(fd, unix.POLLIN, time.Time{})
			}
			if errors.Is(err, ErrStopped) {
				return false
			}
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // exits with the goroutine: the pin dies with it
		switch place {
		case "same-cpu":
			pin(b, 0)
		case "two-cpus":
			pin(b, 1)
		}
		for recv(ab[0]) {
			unix.Write(ba[1], []byte{1})
		}
	}()
	runtime.LockOSThread()
	if place != "unpinned" {
		pin(b, 0)
	}
	var total time.Duration
	for b.Loop() {
		if gap > 0 {
			time.Sleep(gap)
		}
		start := time.Now()
		unix.Write(ab[1], []byte{1})
		recv(ba[0])
		total += time.Since(start)
	}
	b.ReportMetric(float64(total.Nanoseconds())/1e3/float64(b.N)/2, "us/hand-off")
	s.Signal()
	<-done
	var all unix.CPUSet
	for i := range runtime.NumCPU() {
		all.Set(i)
	}
	unix.SchedSetaffinity(0, &all)
	runtime.UnlockOSThread()
}
