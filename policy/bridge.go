package policy

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
)

// The br_netfilter switches that send bridged IPv4 and IPv6 through the
// inet hooks, and so traffic between two containers on one bridge through
// Tulle's forward chain (see the package doc).
var bridgeSysctls = []string{
	"/proc/sys/net/bridge/bridge-nf-call-iptables",
	"/proc/sys/net/bridge/bridge-nf-call-ip6tables",
}

// EnsureBridgeFiltering turns the br_netfilter switches on in the calling
// thread's network namespace where they are off, as Docker does, and
// returns the ones it turned on. Where they do not exist (no bridge support
// loaded) there is no bridge whose traffic could bypass the forward hook,
// and it does nothing. An error means same-bridge traffic is not filtered.
func EnsureBridgeFiltering() (changed []string, err error) {
	for _, p := range bridgeSysctls {
		b, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return changed, fmt.Errorf("read %s: %w", p, err)
		}
		if strings.TrimSpace(string(b)) == "1" {
			continue
		}
		if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
			return changed, fmt.Errorf("turn on %s (traffic between containers on one bridge is not filtered without it): %w", p, err)
		}
		changed = append(changed, strings.TrimPrefix(p, "/proc/sys/"))
	}
	return changed, nil
}
