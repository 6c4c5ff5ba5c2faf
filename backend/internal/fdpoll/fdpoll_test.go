//go:build linux

package fdpoll

import (
	"errors"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func pipe(t *testing.T) (r, w int) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	return p[0], p[1]
}

func newStop(t *testing.T) *Stop {
	t.Helper()
	s, err := NewStop()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestWaitReturnsWhenTheDescriptorIsReady(t *testing.T) {
	s := newStop(t)
	r, w := pipe(t)
	before := waiting(t)
	wrote := writeOnceWaiting(w, before+1) // once the Wait below blocks
	if err := s.Wait(r, unix.POLLIN, time.Now().Add(5*time.Second)); err != nil {
		t.Fatalf("Wait on a pipe that became readable: %v", err)
	}
	if err := <-wrote; err != nil {
		t.Fatalf("the Wait did not block before the write: %v", err)
	}
}

func TestSignalWakesEveryWaitNowAndLater(t *testing.T) {
	s := newStop(t)
	r, _ := pipe(t)
	done := make(chan error, 2)
	before := waiting(t)
	for range 2 {
		go func() {
			runtime.LockOSThread() // two waits, two threads
			defer runtime.UnlockOSThread()
			done <- s.Wait(r, unix.POLLIN, time.Time{})
		}()
	}
	if err := AwaitWaiting(before+2, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	s.Signal()
	s.Signal() // idempotent
	for range 2 {
		select {
		case err := <-done:
			if !errors.Is(err, ErrStopped) {
				t.Fatalf("Wait after Signal: %v, want ErrStopped", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Wait not woken by Signal")
		}
	}
	if err := s.Wait(r, unix.POLLIN, time.Time{}); !errors.Is(err, ErrStopped) || !s.Signalled() {
		t.Fatalf("Wait after Signal: %v", err)
	}
}

// writeOnceWaiting writes a byte to w once n threads wait in ppoll (or
// after 5 s), and then sends what AwaitWaiting returned.
func writeOnceWaiting(w, n int) <-chan error {
	wrote := make(chan error, 1)
	go func() {
		err := AwaitWaiting(n, 5*time.Second)
		unix.Write(w, []byte{1})
		wrote <- err
	}()
	return wrote
}

// waiting returns how many threads wait in ppoll now.
func waiting(t *testing.T) int {
	t.Helper()
	n, err := Waiting()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestWaitingCountsThreadsBlockedInWait(t *testing.T) {
	s := newStop(t)
	r, _ := pipe(t)
	before := waiting(t)
	done := make(chan error, 1)
	go func() { done <- s.Wait(r, unix.POLLIN, time.Time{}) }()
	if err := AwaitWaiting(before+1, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	s.Signal()
	if err := <-done; !errors.Is(err, ErrStopped) {
		t.Fatalf("Wait: %v", err)
	}
	if n := waiting(t); n != before {
		t.Fatalf("%d threads counted in ppoll after the Wait returned, want %d", n, before)
	}
}

func TestWaitHonoursTheDeadline(t *testing.T) {
	s := newStop(t)
	r, _ := pipe(t)
	start := time.Now()
	err := s.Wait(r, unix.POLLIN, start.Add(30*time.Millisecond))
	if !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(start) < 25*time.Millisecond {
		t.Fatalf("Wait with a deadline: %v after %v", err, time.Since(start))
	}
	if err := s.Wait(r, unix.POLLIN, start.Add(-time.Second)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Wait past its deadline: %v", err)
	}
}

// BenchmarkHandOff measures what one data-plane hop costs before any
// packet work: a thread blocked in Wait is woken by a write from another
// locked thread, reads, and wakes the first one back (two hand-offs per
// op). A ping through Tulle crosses four such hand-offs (TX and RX on
// each host), which kernel VXLAN does not (it runs in the softirq of the
// sender); docs/PERFORMANCE.md sets the two side by side. The idle gap
// between ops lets both CPUs go idle, as between pings.
func BenchmarkHandOff(b *testing.B) {
	for _, gap := range []time.Duration{0, time.Millisecond} {
		b.Run("gap="+gap.String(), func(b *testing.B) { handOff(b, "unpinned", false, gap) })
	}
}
