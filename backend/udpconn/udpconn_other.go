//go:build !linux

package udpconn

import (
	"fmt"
	"net/netip"
	"runtime"
)

type readState struct{}
type writeState struct{}

// Listen is only implemented on Linux.
func Listen(laddr netip.AddrPort, opts Options) (*Conn, error) {
	return nil, fmt.Errorf("udp listen %s: batched UDP is only supported on Linux, not %s", laddr, runtime.GOOS)
}

// ReadBatch is only implemented on Linux.
func (c *Conn) ReadBatch(msgs []Message) (int, error) {
	return 0, fmt.Errorf("udp receive batch: not supported on %s", runtime.GOOS)
}

// WriteBatch is only implemented on Linux.
func (c *Conn) WriteBatch(msgs []Message) (int, error) {
	return 0, fmt.Errorf("udp send batch: not supported on %s", runtime.GOOS)
}

// Close is only implemented on Linux.
func (c *Conn) Close() error { return nil }

// TryReadBatch is only implemented on Linux.
func (c *Conn) TryReadBatch(msgs []Message) (int, error) { return c.ReadBatch(msgs) }

// Fd is only implemented on Linux.
func (c *Conn) Fd() int { return -1 }

// Interrupt is only implemented on Linux.
func (c *Conn) Interrupt() {}

// Drops is only implemented on Linux.
func (c *Conn) Drops() (uint64, error) {
	return 0, fmt.Errorf("udp drop count: not supported on %s", runtime.GOOS)
}
