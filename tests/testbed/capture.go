package testbed

import (
	"errors"
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// Capture receives every Ethernet frame on one link of a node (an AF_PACKET
// socket, both directions), like `tcpdump -i <link>`, without a program to
// start and wait for.
type Capture struct {
	fd   int
	link string
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// Capture starts capturing on the node's link. Frames are queued from this
// call on (up to the socket buffer, 4 MiB); Close stops.
func (n *Node) Capture() (*Capture, error) {
	var fd int
	err := InNetns(n.NS, func() error {
		ifi, err := net.InterfaceByName(n.Link)
		if err != nil {
			return err
		}
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind to %s: %w", n.Link, err)
		}
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("capture on %s in netns %s: %w", n.Link, n.NS, err)
	}
	return &Capture{fd: fd, link: n.Link}, nil
}

// ErrCaptureTimeout is returned by Next when no frame came in time.
var ErrCaptureTimeout = errors.New("capture: no frame in time")

// Next returns the next frame (starting with the Ethernet header), waiting
// at most timeout; ErrCaptureTimeout if none came.
func (c *Capture) Next(timeout time.Duration) ([]byte, error) {
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 65536+14)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return nil, ErrCaptureTimeout
		}
		pfd := []unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, int(left.Milliseconds())+1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("capture on %s: poll: %w", c.link, err)
		}
		if n == 0 {
			continue
		}
		m, _, err := unix.Recvfrom(c.fd, buf, unix.MSG_DONTWAIT)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("capture on %s: %w", c.link, err)
		}
		return append([]byte(nil), buf[:m]...), nil
	}
}

// Close stops the capture.
func (c *Capture) Close() error { return unix.Close(c.fd) }
