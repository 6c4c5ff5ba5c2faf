package subnet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Key is the lease's key below <prefix>/subnets/, as flannel writes it:
// "198.18.79.0-24", or "198.18.79.0-24&2001:db8:0:4f::-64" for a dual-stack
// lease. A lease with only an IPv6 subnet is written "0.0.0.0-0&<v6>-<len>",
// as flannel does.
func (l Lease) Key() string {
	var b strings.Builder
	if l.Subnet.IsValid() {
		writeKeyPrefix(&b, l.Subnet)
	} else {
		b.WriteString("0.0.0.0-0")
	}
	if l.IPv6Subnet.IsValid() {
		b.WriteByte('&')
		writeKeyPrefix(&b, l.IPv6Subnet)
	}
	return b.String()
}

func writeKeyPrefix(b *strings.Builder, p netip.Prefix) {
	b.WriteString(p.Addr().String())
	b.WriteByte('-')
	b.WriteString(strconv.Itoa(p.Bits()))
}

// ParseLeaseKey parses a key below <prefix>/subnets/ ("198.18.79.0-24" or
// "198.18.79.0-24&2001:db8:0:4f::-64"). Both prefixes must be masked (no
// host bits). v4 is the zero Prefix for flannel's IPv6-only form
// "0.0.0.0-0&<v6>"; at least one of v4 and v6 is valid when err is nil.
func ParseLeaseKey(s string) (v4, v6 netip.Prefix, err error) {
	s4, s6, dual := strings.Cut(s, "&")
	v4, err = parseKeyPrefix(s4, false)
	if err != nil {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("lease key %q: %w", truncate(s, 80), err)
	}
	if v4.Bits() == 0 && v4.Addr() == netip.IPv4Unspecified() {
		v4 = netip.Prefix{}
	}
	if dual {
		v6, err = parseKeyPrefix(s6, true)
		if err != nil {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("lease key %q: %w", truncate(s, 80), err)
		}
	}
	if !v4.IsValid() && !v6.IsValid() {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("lease key %q: no subnet", truncate(s, 80))
	}
	return v4, v6, nil
}

func parseKeyPrefix(s string, six bool) (netip.Prefix, error) {
	i := strings.LastIndexByte(s, '-')
	if i < 0 {
		return netip.Prefix{}, errors.New("want <address>-<length>")
	}
	addr, err := netip.ParseAddr(s[:i])
	if err != nil {
		return netip.Prefix{}, err
	}
	if six {
		if !isIPv6(addr) {
			return netip.Prefix{}, fmt.Errorf("%s: not an IPv6 address", addr)
		}
	} else if !addr.Is4() {
		return netip.Prefix{}, fmt.Errorf("%s: not an IPv4 address", addr)
	}
	bits, ok := parseDecimal(s[i+1:])
	if !ok || bits > addr.BitLen() {
		return netip.Prefix{}, fmt.Errorf("prefix length %q: want 0 to %d", truncate(s[i+1:], 10), addr.BitLen())
	}
	p := netip.PrefixFrom(addr, bits)
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("%s: has host bits set (want %s)", p, p.Masked())
	}
	return p, nil
}

// parseDecimal accepts 1 to 3 plain digits without a leading zero ("0" is fine).
func parseDecimal(s string) (int, bool) {
	if len(s) == 0 || len(s) > 3 || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	n := 0
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

// MarshalJSON writes the value exactly as flannel does:
// {"PublicIP":"192.0.2.1","PublicIPv6":null} plus "BackendType" and
// "BackendData" when they are not empty, in that order. PublicIP must be an
// IPv4 address and PublicIPv6, if valid, an IPv6 address.
func (a LeaseAttrs) MarshalJSON() ([]byte, error) {
	if !a.PublicIP.Is4() {
		return nil, fmt.Errorf("lease value: PublicIP %v: must be an IPv4 address", a.PublicIP)
	}
	var b bytes.Buffer
	b.WriteString(`{"PublicIP":"`)
	b.WriteString(a.PublicIP.String())
	b.WriteString(`","PublicIPv6":`)
	if a.PublicIPv6.IsValid() {
		if !isIPv6(a.PublicIPv6) {
			return nil, fmt.Errorf("lease value: PublicIPv6 %v: must be an IPv6 address", a.PublicIPv6)
		}
		b.WriteByte('"')
		b.WriteString(a.PublicIPv6.String())
		b.WriteByte('"')
	} else {
		b.WriteString("null")
	}
	if a.BackendType != "" {
		t, _ := json.Marshal(a.BackendType) // a string always marshals
		b.WriteString(`,"BackendType":`)
		b.Write(t)
	}
	if len(a.BackendData) > 0 && !bytes.Equal(a.BackendData, []byte("null")) {
		b.WriteString(`,"BackendData":`)
		if err := json.Compact(&b, a.BackendData); err != nil {
			return nil, fmt.Errorf("lease value: BackendData: %w", err)
		}
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// UnmarshalJSON reads a lease value written by flannel or Tulle. Field
// names match case-insensitively and unknown fields are ignored (as
// flannel's reader does); PublicIP must be an IPv4 address, PublicIPv6 an
// IPv6 address, null or absent. BackendData is kept compacted; null is
// stored as nil.
func (a *LeaseAttrs) UnmarshalJSON(b []byte) error {
	var raw struct {
		PublicIP    *string
		PublicIPv6  *string
		BackendType string
		BackendData json.RawMessage
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return fmt.Errorf("lease value: %w", err)
	}
	var out LeaseAttrs
	if raw.PublicIP == nil {
		return errors.New("lease value: PublicIP: missing")
	}
	ip, err := netip.ParseAddr(*raw.PublicIP)
	if err != nil || !ip.Unmap().Is4() {
		return fmt.Errorf("lease value: PublicIP %q: must be an IPv4 address", truncate(*raw.PublicIP, 64))
	}
	out.PublicIP = ip.Unmap()
	if raw.PublicIPv6 != nil {
		ip6, err := netip.ParseAddr(*raw.PublicIPv6)
		if err != nil || !isIPv6(ip6) {
			return fmt.Errorf("lease value: PublicIPv6 %q: must be an IPv6 address", truncate(*raw.PublicIPv6, 64))
		}
		out.PublicIPv6 = ip6
	}
	out.BackendType = raw.BackendType
	if len(raw.BackendData) > 0 && !bytes.Equal(raw.BackendData, []byte("null")) {
		var c bytes.Buffer
		if err := json.Compact(&c, raw.BackendData); err != nil {
			return fmt.Errorf("lease value: BackendData: %w", err)
		}
		out.BackendData = c.Bytes()
	}
	*a = out
	return nil
}

// Equal reports whether a and b hold the same value.
func (a LeaseAttrs) Equal(b LeaseAttrs) bool {
	return a.PublicIP == b.PublicIP && a.PublicIPv6 == b.PublicIPv6 &&
		a.BackendType == b.BackendType && bytes.Equal(a.BackendData, b.BackendData)
}

// Equal reports whether l and o describe the same key in the same state
// (subnets, value, etcd lease, expiration, reservation).
func (l Lease) Equal(o Lease) bool {
	return l.Subnet == o.Subnet && l.IPv6Subnet == o.IPv6Subnet && l.Attrs.Equal(o.Attrs) &&
		l.LeaseID == o.LeaseID && l.Expiration.Equal(o.Expiration) && l.Reservation == o.Reservation
}

// String is for logs: "198.18.79.0/24 (192.0.2.1)".
func (l Lease) String() string {
	var s string
	switch {
	case l.Subnet.IsValid() && l.IPv6Subnet.IsValid():
		s = l.Subnet.String() + "+" + l.IPv6Subnet.String()
	case l.Subnet.IsValid():
		s = l.Subnet.String()
	default:
		s = l.IPv6Subnet.String()
	}
	if l.Attrs.PublicIP.IsValid() {
		s += " (" + l.Attrs.PublicIP.String() + ")"
	}
	return s
}

// isIPv6 reports whether a is an IPv6 address as flannel's IPv6 fields
// hold them: not IPv4-mapped, without a zone.
func isIPv6(a netip.Addr) bool { return a.Is6() && !a.Is4In6() && a.Zone() == "" }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
