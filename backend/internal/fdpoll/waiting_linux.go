package fdpoll

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Waiting returns how many threads of this process are blocked in ppoll(2)
// now, as the kernel reports them (/proc/self/task/*/syscall): every one
// is in a Wait, as nothing else in Tulle, nor the Go runtime, calls ppoll.
// It is for tests that must act while a loop waits (close a device under a
// blocked read) and wait for that condition instead of sleeping.
func Waiting() (int, error) {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return 0, fmt.Errorf("list threads: %w", err)
	}
	n := 0
	for _, task := range tasks {
		b, err := os.ReadFile("/proc/self/task/" + task.Name() + "/syscall")
		if err != nil {
			continue // the thread exited
		}
		nr, _, _ := strings.Cut(string(b), " ")
		if v, err := strconv.Atoi(strings.TrimSpace(nr)); err == nil && v == unix.SYS_PPOLL {
			n++
		}
	}
	return n, nil
}

// AwaitWaiting polls Waiting until at least n threads wait in ppoll, and
// fails after timeout naming how many did.
func AwaitWaiting(n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		got, err := Waiting()
		if err != nil {
			return err
		}
		if got >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d threads blocked in ppoll after %v, want %d", got, timeout, n)
		}
		time.Sleep(time.Millisecond)
	}
}
