package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
)

// Installed is Tulle's table as the kernel holds it, read back through
// netlink: what tests and `tulled policy` compare with a compiled Ruleset.
type Installed struct {
	Rules []InstalledRule
	// Sets: name -> the ranges it holds, "first-last" (addresses or
	// ports), sorted.
	Sets map[string][]string
}

// InstalledRule is one rule of the installed table.
type InstalledRule struct {
	Chain   string
	Comment string
	Count
}

// Read returns the installed table; nil (and no error) when there is none.
// The table is read in several netlink dumps; one that meets a table
// replaced meanwhile (a set gone) is read again.
func (e *Enforcer) Read() (*Installed, error) {
	c, err := e.conn()
	if err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		inst, err := read(c)
		if err != nil && isNotExist(err) && attempt < 5 {
			continue
		}
		return inst, err
	}
}

// isNotExist says whether err is the kernel's ENOENT. The library wraps
// some errors with %v, so the text is the only trace of it.
func isNotExist(err error) bool {
	return errors.Is(err, syscall.ENOENT) || strings.Contains(err.Error(), syscall.ENOENT.Error())
}

func read(c *nftables.Conn) (*Installed, error) {
	rules, err := readRules(c)
	if err != nil || rules == nil {
		return nil, err
	}
	out := &Installed{Rules: rules, Sets: map[string][]string{}}
	sets, err := c.GetSets(table)
	if err != nil {
		return nil, fmt.Errorf("read sets: %w", err)
	}
	for _, s := range sets {
		elems, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("read set %s: %w", s.Name, err)
		}
		kind := SetPorts
		switch s.KeyType.Bytes {
		case 4:
			kind = SetIPv4
		case 16:
			kind = SetIPv6
		}
		out.Sets[s.Name] = decodeIntervals(kind, elems)
	}
	return out, nil
}

// Ranges returns the set's ranges as Installed.Sets shows them.
func (s *Set) Ranges() []string {
	var out []string
	for _, r := range s.Addrs {
		out = append(out, r.From.String()+"-"+r.To.String())
	}
	for _, p := range s.Ports {
		out = append(out, strconv.Itoa(int(p.First))+"-"+strconv.Itoa(int(p.Last)))
	}
	return out
}

// readRules reads every rule of the installed table in chain order; nil
// (and no error) when the table does not exist.
func readRules(c *nftables.Conn) ([]InstalledRule, error) {
	if _, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil {
		if isNotExist(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("read table inet %s: %w", TableName, err)
	}
	out := []InstalledRule{}
	for _, ch := range []string{ChainForward, ChainEgress, ChainIngress} {
		rules, err := c.GetRules(table, &nftables.Chain{Name: ch, Table: table})
		if err != nil {
			if isNotExist(err) {
				continue // a table of another layout
			}
			return nil, fmt.Errorf("read chain %s: %w", ch, err)
		}
		for _, r := range rules {
			ir := InstalledRule{Chain: ch}
			ir.Comment, _ = userdata.GetString(r.UserData, userdata.TypeComment)
			for _, x := range r.Exprs {
				if cnt, ok := x.(*expr.Counter); ok {
					ir.Packets += cnt.Packets
					ir.Bytes += cnt.Bytes
				}
			}
			out = append(out, ir)
		}
	}
	return out, nil
}

// decodeIntervals turns the elements of an interval set (starts, and ends
// one past the range flagged as such) into "first-last" strings, sorted.
func decodeIntervals(kind SetKind, elems []nftables.SetElement) []string {
	type point struct {
		key []byte
		end bool
	}
	var ps []point
	for _, e := range elems {
		ps = append(ps, point{e.Key, e.IntervalEnd})
	}
	slices.SortFunc(ps, func(a, b point) int { return slices.Compare(a.key, b.key) })
	str := func(k []byte, delta int) string {
		if kind == SetPorts {
			return strconv.Itoa(int(binaryutil.BigEndian.Uint16(k)) + delta)
		}
		a, _ := netip.AddrFromSlice(k)
		if delta < 0 {
			a = a.Prev()
		}
		return a.String()
	}
	last := map[SetKind]string{SetPorts: "65535", SetIPv4: "255.255.255.255", SetIPv6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}[kind]
	var out []string
	for i, p := range ps {
		if p.end {
			continue
		}
		to := last
		if i+1 < len(ps) && ps[i+1].end {
			to = str(ps[i+1].key, -1)
		}
		out = append(out, str(p.key, 0)+"-"+to)
	}
	return out
}
