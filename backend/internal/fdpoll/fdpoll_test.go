//go:build linux

package fdpoll

import (
	"errors"
	"os"
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
	go func() {
		time.Sleep(20 * time.Millisecond)
		unix.Write(w, []byte{1})
	}()
	if err := s.Wait(r, unix.POLLIN, time.Now().Add(5*time.Second)); err != nil {
		t.Fatalf("Wait on a pipe that became readable: %v", err)
	}
}

func TestSignalWakesEveryWaitNowAndLater(t *testing.T) {
	s := newStop(t)
	r, _ := pipe(t)
	done := make(chan error, 2)
	for range 2 {
		go func() { done <- s.Wait(r, unix.POLLIN, time.Time{}) }()
	}
	time.Sleep(20 * time.Millisecond)
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
