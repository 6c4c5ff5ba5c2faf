//go:build !linux

package fdpoll

import (
	"errors"
	"fmt"
	"runtime"
	"time"
)

// ErrStopped is returned by Wait once the Stop was signalled.
var ErrStopped = errors.New("stopped")

// Stop is only implemented on Linux.
type Stop struct{}

// NewStop is only implemented on Linux.
func NewStop() (*Stop, error) { return nil, fmt.Errorf("fdpoll: not supported on %s", runtime.GOOS) }

func (s *Stop) Signal()                          {}
func (s *Stop) Signalled() bool                  { return true }
func (s *Stop) Close() error                     { return nil }
func (s *Stop) Wait(int, int16, time.Time) error { return ErrStopped }

// WaitHot is only implemented on Linux.
func (s *Stop) WaitHot(int, int16, time.Duration) error { return ErrStopped }

// Waiting is only implemented on Linux.
func Waiting() (int, error) { return 0, fmt.Errorf("fdpoll: not supported on %s", runtime.GOOS) }

// AwaitWaiting is only implemented on Linux.
func AwaitWaiting(int, time.Duration) error { _, err := Waiting(); return err }
