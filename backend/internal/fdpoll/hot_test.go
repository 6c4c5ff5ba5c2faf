//go:build linux

package fdpoll

import (
	"errors"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestWaitHotReturnsWhenTheDescriptorIsReadyOrStopped(t *testing.T) {
	s := newStop(t)
	r, w := pipe(t)
	before := waiting(t)
	wrote := writeOnceWaiting(w, before+1)
	start := time.Now()
	// WaitHot returns nil early when a signal ends its ppoll (sysmon
	// preempts a thread that sits in a raw system call for 10 ms), so, like
	// the data-plane loops, wait until the pipe is readable.
	for !readable(t, r) {
		if err := s.WaitHot(r, unix.POLLIN, 10*time.Second); err != nil {
			t.Fatalf("WaitHot on a pipe that became readable: %v", err)
		}
		if time.Since(start) > 10*time.Second {
			t.Fatal("the pipe never became readable")
		}
	}
	if err := <-wrote; err != nil {
		t.Fatalf("WaitHot did not block before the write: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("WaitHot returned %v after the pipe became readable", d)
	}
	s.Signal()
	if err := s.WaitHot(r, unix.POLLIN, 10*time.Second); !errors.Is(err, ErrStopped) {
		t.Fatalf("WaitHot after Signal: %v, want ErrStopped", err)
	}
}

func TestWaitHotWakesOnSignalWhileBlocked(t *testing.T) {
	s := newStop(t)
	r, _ := pipe(t)
	before := waiting(t)
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		for {
			err := s.WaitHot(r, unix.POLLIN, 10*time.Second)
			if err != nil {
				done <- err
				return
			}
		}
	}()
	if err := AwaitWaiting(before+1, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	s.Signal()
	select {
	case err := <-done:
		if !errors.Is(err, ErrStopped) {
			t.Fatalf("WaitHot: %v, want ErrStopped", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("WaitHot not woken by Signal")
	}
}

func TestWaitHotReturnsWithinItsTimeout(t *testing.T) {
	s := newStop(t)
	r, _ := pipe(t)
	start := time.Now()
	// A signal (the runtime preempting) may end it earlier; never later.
	if err := s.WaitHot(r, unix.POLLIN, 30*time.Millisecond); err != nil {
		t.Fatalf("WaitHot with nothing to read: %v, want nil (retry)", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("WaitHot returned after %v, its timeout is 30ms", d)
	}
}

// TestWaitHotLetsTheGarbageCollectorStopTheWorld: a thread blocked in a
// raw ppoll holds its P; the collector's stop-the-world must still reach
// it (its preemption signal ends the ppoll), not wait for the timeout.
func TestWaitHotLetsTheGarbageCollectorStopTheWorld(t *testing.T) {
	s := newStop(t)
	r, _ := pipe(t)
	before := waiting(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		for s.WaitHot(r, unix.POLLIN, time.Minute) == nil {
		}
	}()
	defer func() { s.Signal(); <-done }()
	if err := AwaitWaiting(before+1, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		start := time.Now()
		runtime.GC()
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("a garbage collection took %v while a thread waited hot", d)
		}
	}
}

// readable reports whether fd has data to read now.
func readable(t *testing.T, fd int) bool {
	t.Helper()
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	if err != nil && err != unix.EINTR {
		t.Fatal(err)
	}
	return n == 1
}
