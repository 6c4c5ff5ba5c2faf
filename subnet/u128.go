package subnet

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
)

// u128 is an IPv6 address as a number, for subnet arithmetic.
type u128 struct{ hi, lo uint64 }

func u128Of(a netip.Addr) u128 {
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

func (u u128) addr() netip.Addr {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], u.hi)
	binary.BigEndian.PutUint64(b[8:], u.lo)
	return netip.AddrFrom16(b)
}

// pow2 returns 1<<k for k in [0, 127].
func pow2(k int) u128 {
	if k >= 64 {
		return u128{hi: 1 << (k - 64)}
	}
	return u128{lo: 1 << k}
}

func (u u128) add(v u128) (u128, bool) {
	lo, c := bits.Add64(u.lo, v.lo, 0)
	hi, c := bits.Add64(u.hi, v.hi, c)
	return u128{hi, lo}, c != 0
}

func (u u128) sub(v u128) u128 {
	lo, b := bits.Sub64(u.lo, v.lo, 0)
	hi, _ := bits.Sub64(u.hi, v.hi, b)
	return u128{hi, lo}
}

// shr shifts right by k in [0, 127].
func (u u128) shr(k int) u128 {
	switch {
	case k == 0:
		return u
	case k >= 64:
		return u128{lo: u.hi >> (k - 64)}
	}
	return u128{hi: u.hi >> k, lo: u.lo>>k | u.hi<<(64-k)}
}

// shl shifts left by k in [0, 127] (bits shifted out are lost).
func (u u128) shl(k int) u128 {
	switch {
	case k == 0:
		return u
	case k >= 64:
		return u128{hi: u.lo << (k - 64)}
	}
	return u128{hi: u.hi<<k | u.lo>>(64-k), lo: u.lo << k}
}

// lowMask has the low k bits set, k in [0, 128].
func lowMask(k int) u128 {
	switch {
	case k >= 128:
		return u128{^uint64(0), ^uint64(0)}
	case k >= 64:
		return u128{hi: 1<<(k-64) - 1, lo: ^uint64(0)}
	}
	return u128{lo: 1<<k - 1}
}
