//go:build !linux

package tundev

import (
	"fmt"
	"runtime"
)

// Open is only implemented on Linux.
func Open(opts Options) (*Device, error) {
	return nil, fmt.Errorf("tun %s: TUN devices are only supported on Linux, not %s", opts.Name, runtime.GOOS)
}
