package policy

import (
	"net/netip"
	"slices"
	"strings"
)

// AddrRange is an inclusive range of addresses of one family.
type AddrRange struct{ From, To netip.Addr }

// contains says whether a lies in r (a of r's family).
func (r AddrRange) contains(a netip.Addr) bool {
	return r.From.BitLen() == a.BitLen() && r.From.Compare(a) <= 0 && a.Compare(r.To) <= 0
}

// prefixRange is the range a prefix covers.
func prefixRange(p netip.Prefix) AddrRange {
	p = p.Masked()
	from := p.Addr()
	b := from.AsSlice()
	host := from.BitLen() - p.Bits()
	for i := len(b) - 1; host > 0; i-- {
		if host >= 8 {
			b[i] = 0xff
			host -= 8
			continue
		}
		b[i] |= byte(1<<host - 1)
		host = 0
	}
	to, _ := netip.AddrFromSlice(b)
	return AddrRange{from, to}
}

// normalize returns the ranges of the prefixes of one family (bits: 32 or
// 128), sorted, with overlapping and adjacent ranges merged: the form an
// interval set needs (the kernel refuses overlaps).
func normalize(ps []netip.Prefix, bits int) []AddrRange {
	var rs []AddrRange
	for _, p := range ps {
		if p.Addr().BitLen() == bits {
			rs = append(rs, prefixRange(p))
		}
	}
	slices.SortFunc(rs, func(a, b AddrRange) int { return a.From.Compare(b.From) })
	out := rs[:0]
	for _, r := range rs {
		if n := len(out); n > 0 {
			last := &out[n-1]
			next := last.To.Next() // invalid when last.To is the family's last address
			if !next.IsValid() || r.From.Compare(next) <= 0 {
				if r.To.Compare(last.To) > 0 {
					last.To = r.To
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// intersect returns the parts of the selected prefixes that lie in one of
// the local prefixes: a host enforces only for its own workloads.
func intersect(selected, local []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range selected {
		for _, l := range local {
			if !s.Overlaps(l) {
				continue
			}
			if s.Bits() >= l.Bits() {
				out = append(out, s)
			} else {
				out = append(out, l)
			}
		}
	}
	return out
}

// rangesKey identifies a list of ranges, to share one kernel set among the
// rules that use the same addresses.
func rangesKey(rs []AddrRange) string {
	var b strings.Builder
	for _, r := range rs {
		b.WriteString(r.From.String())
		b.WriteByte('-')
		b.WriteString(r.To.String())
		b.WriteByte(',')
	}
	return b.String()
}

// rangePrefixes splits r into the fewest prefixes that cover it exactly.
func rangePrefixes(r AddrRange) []netip.Prefix {
	var out []netip.Prefix
	from := r.From
	for {
		// the largest prefix starting at from that does not pass r.To
		bits := from.BitLen()
		for bits > 0 {
			p := netip.PrefixFrom(from, bits-1)
			if p.Masked().Addr() != from || prefixRange(p).To.Compare(r.To) > 0 {
				break
			}
			bits--
		}
		p := netip.PrefixFrom(from, bits)
		out = append(out, p)
		end := prefixRange(p).To
		if end.Compare(r.To) >= 0 {
			return out
		}
		from = end.Next()
	}
}
