package main

import (
	"fmt"

	"github.com/vishvananda/netlink"

	"github.com/tulle-net/tulle/tests/testbed"
)

// linkBytes returns the bytes received and sent by link in namespace ns:
// on a host's underlay link, its etcd traffic (nothing else flows there in
// this harness).
func linkBytes(ns, link string) (rx, tx uint64, err error) {
	err = testbed.InNetns(ns, func() error {
		l, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		s := l.Attrs().Statistics
		if s == nil {
			return fmt.Errorf("no statistics")
		}
		rx, tx = s.RxBytes, s.TxBytes
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("byte counters of %s in netns %s: %w", link, ns, err)
	}
	return rx, tx, nil
}
