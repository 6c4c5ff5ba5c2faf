// Package proto holds the bytes-on-the-wire rules of Tulle's overlay as pure
// functions: IPv4 and IPv6 header peeks and checks, the TTL decrement that
// flannel's udp backend applies (with an RFC 1624 incremental checksum fix),
// and ICMP error messages built into caller-supplied buffers.
//
// The encapsulation itself is trivial and flannel-compatible: the UDP payload
// is the bare inner IPv4 (or, between Tulle hosts in a dual-stack network,
// IPv6) packet, with no header of its own, so an inner packet costs
// EncapOverhead bytes (outer IPv4 + UDP) on the underlay, or
// EncapOverheadIPv6 on an IPv6 underlay.
//
// Guarantees: no function here allocates, keeps state, makes a syscall or
// panics on any input; every accessor that reads a header field documents the
// minimum length it needs, and Check* tells the caller whether that minimum is
// met. The package imports only the standard library.
package proto
