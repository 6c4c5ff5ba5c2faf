package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Socket buffers of the netlink socket an apply uses. The whole ruleset
// goes to the kernel in one message batch (one transaction), which must fit
// the send buffer, and the kernel queues one acknowledgement per message,
// which must fit the receive buffer: both far above the defaults for a
// ruleset of thousands of rules and sets. They are limits, not allocations.
const (
	sendBuffer    = 64 << 20
	receiveBuffer = 64 << 20
	// elemsPerMessage keeps one message's element list well below the
	// 64 KiB a netlink attribute can hold.
	elemsPerMessage = 512
)

// Enforcer installs rulesets as the inet table "tulle" and reads its
// counters. Apply is safe to call from one goroutine at a time; Counters
// from any.
type Enforcer struct {
	netns int // 0: the caller's network namespace

	mu   sync.Mutex
	meta map[string]ruleMeta // comment -> what the rule is, of the installed ruleset
}

// ruleMeta is what a rule of the installed table stands for in metrics.
type ruleMeta struct {
	kind ruleKind
	id   RuleID    // kindPolicy
	dir  Direction // kindDefault
}

type ruleKind uint8

const (
	kindOther ruleKind = iota
	kindPolicy
	kindDefault
)

// NewEnforcer returns an Enforcer for the network namespace netnsFD (an
// open /proc/PID/ns/net or /run/netns/NAME), or for the caller's when 0.
func NewEnforcer(netnsFD int) *Enforcer {
	return &Enforcer{netns: netnsFD}
}

func (e *Enforcer) conn() (*nftables.Conn, error) {
	opts := []nftables.ConnOption{nftables.WithSockOptions(func(c *netlink.Conn) error {
		raw, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		err = raw.Control(func(fd uintptr) {
			// The *FORCE variants pass net.core.[rw]mem_max (CAP_NET_ADMIN).
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sendBuffer); serr != nil {
				return
			}
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, receiveBuffer)
		})
		return errors.Join(err, serr)
	})}
	if e.netns != 0 {
		opts = append(opts, nftables.WithNetNSFd(e.netns))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return c, nil
}

var table = &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}

// ApplyStats describes one apply.
type ApplyStats struct {
	Sets, Elements, Rules int
	Took                  time.Duration
}

// Apply replaces Tulle's table with rs in one netlink transaction: create
// the table if it is missing, delete it, create it again with every set,
// chain and rule of rs. The kernel commits the batch as a whole or not at
// all, so packets meet the old ruleset or the new one, never a mix and
// never none; on error the old table stays as it was. Rule counters are
// carried over (by rule comment) so that they only grow; packets counted
// between the read and the commit are lost.
func (e *Enforcer) Apply(rs *Ruleset) (ApplyStats, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	start := time.Now()
	old, _ := e.readCounters() // none on the first apply: the table may not exist

	c, err := e.conn()
	if err != nil {
		return ApplyStats{}, err
	}
	b := &batch{c: c, old: old, meta: map[string]ruleMeta{}}
	c.AddTable(table) // no-op if it exists, so that the delete never fails
	c.DelTable(table)
	c.AddTable(table)
	st := ApplyStats{Sets: len(rs.Sets)}
	for i, s := range rs.Sets {
		n, err := b.addSet(s, uint32(i+1))
		if err != nil {
			return ApplyStats{}, fmt.Errorf("set %s: %w", s.Name, err)
		}
		st.Elements += n
	}
	accept := nftables.ChainPolicyAccept
	fwd := c.AddChain(&nftables.Chain{Name: ChainForward, Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	egress := c.AddChain(&nftables.Chain{Name: ChainEgress, Table: table})
	ingress := c.AddChain(&nftables.Chain{Name: ChainIngress, Table: table})

	b.rule(fwd, CommentEstablished, ruleMeta{}, ctEstablished(), verdict(expr.VerdictAccept, ""))
	b.rule(fwd, CommentNeighbour, ruleMeta{}, neighbourDiscovery(), verdict(expr.VerdictAccept, ""))
	for _, j := range rs.jumps() {
		field := "saddr"
		if j.chain == ChainIngress {
			field = "daddr"
		}
		b.rule(fwd, j.comment(), ruleMeta{}, addrMatch(j.family, field, j.set), verdict(expr.VerdictJump, j.chain))
	}
	for _, ch := range []struct {
		chain *nftables.Chain
		rules []CompiledRule
		dir   Direction
		def   string
	}{{egress, rs.Egress, DirEgress, CommentDefaultEgress}, {ingress, rs.Ingress, DirIngress, CommentDefaultIngress}} {
		for _, r := range ch.rules {
			b.rule(ch.chain, r.Comment(), ruleMeta{kind: kindPolicy, id: r.RuleID}, ruleMatch(r), verdictOf(r))
		}
		b.rule(ch.chain, ch.def, ruleMeta{kind: kindDefault, dir: ch.dir}, nil, verdict(expr.VerdictDrop, ""))
	}
	st.Rules = b.rules
	if err := c.Flush(); err != nil {
		return ApplyStats{}, fmt.Errorf("nftables transaction (%d sets, %d elements, %d rules): %w", st.Sets, st.Elements, st.Rules, err)
	}
	e.meta = b.meta
	st.Took = time.Since(start)
	return st, nil
}

// Remove deletes Tulle's table (a missing table is no error). The daemon
// never calls it: rules stay in the kernel across a stop or a restart.
func (e *Enforcer) Remove() error {
	c, err := e.conn()
	if err != nil {
		return err
	}
	c.AddTable(table)
	c.DelTable(table)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("delete table inet %s: %w", TableName, err)
	}
	return nil
}

// batch builds one transaction.
type batch struct {
	c     *nftables.Conn
	old   map[string]Count
	meta  map[string]ruleMeta
	rules int
}

func (b *batch) addSet(s *Set, id uint32) (int, error) {
	ns := &nftables.Set{Table: table, Name: s.Name, ID: id, Interval: true}
	var elems []nftables.SetElement
	switch s.Kind {
	case SetIPv4, SetIPv6:
		ns.KeyType = nftables.TypeIPAddr
		if s.Kind == SetIPv6 {
			ns.KeyType = nftables.TypeIP6Addr
		}
		for _, r := range s.Addrs {
			elems = appendInterval(elems, r.From.AsSlice(), r.To.Next())
		}
	case SetPorts:
		ns.KeyType = nftables.TypeInetService
		for _, p := range s.Ports {
			elems = append(elems, nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(p.First)})
			if p.Last < 65535 {
				elems = append(elems, nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(p.Last + 1), IntervalEnd: true})
			}
		}
	}
	if err := b.c.AddSet(ns, nil); err != nil {
		return 0, err
	}
	for i := 0; i < len(elems); i += elemsPerMessage {
		if err := b.c.SetAddElements(ns, elems[i:min(i+elemsPerMessage, len(elems))]); err != nil {
			return 0, err
		}
	}
	return len(elems), nil
}

// appendInterval adds [from, end) as an interval set wants it: the start,
// and the first address after the range flagged as an interval end; a
// range that reaches the family's last address has no end (end invalid).
func appendInterval(elems []nftables.SetElement, from []byte, end netip.Addr) []nftables.SetElement {
	elems = append(elems, nftables.SetElement{Key: from})
	if end.IsValid() {
		elems = append(elems, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
	}
	return elems
}

// rule adds a rule: matches, a counter (starting where the installed
// rule of the same comment stands), the verdict, the comment.
func (b *batch) rule(ch *nftables.Chain, comment string, m ruleMeta, match []expr.Any, v expr.Any) {
	old := b.old[comment]
	exprs := append(match, &expr.Counter{Packets: old.Packets, Bytes: old.Bytes}, v)
	b.c.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: exprs,
		UserData: userdata.AppendString(nil, userdata.TypeComment, comment)})
	b.meta[comment] = m
	b.rules++
}

func verdict(k expr.VerdictKind, chain string) expr.Any { return &expr.Verdict{Kind: k, Chain: chain} }

func verdictOf(r CompiledRule) expr.Any {
	switch r.verdict() {
	case "drop":
		return verdict(expr.VerdictDrop, "")
	case "return":
		return verdict(expr.VerdictReturn, "")
	}
	return verdict(expr.VerdictAccept, "")
}

// ctEstablished is `ct state established,related`.
func ctEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

// neighbourDiscovery is `ip6 hoplimit 255 icmpv6 type {
// nd-neighbor-solicit, nd-neighbor-advert }`: IPv6's address resolution
// and reachability checks between two workloads on one bridge, which
// conntrack leaves untracked (they are no connection, so never
// "established"). Default deny must not drop them, as it never sees ARP:
// a workload that could not resolve its neighbours would lose its allowed
// connections too. Hop limit 255 is what a genuine one carries (RFC 4861
// drops any other), so a routed packet never passes as one.
func neighbourDiscovery() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 7, Len: 1}, // hop limit
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{255}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1}, // type
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{135}, ToData: []byte{136}},   // solicitation, advertisement
	}
}

// addrMatch is `ip saddr @set` (or daddr, or ip6): the family first, as
// nft itself compiles it in an inet table.
func addrMatch(f Family, field, set string) []expr.Any {
	proto, off, n := byte(unix.NFPROTO_IPV4), uint32(12), uint32(4)
	if f == IPv6 {
		proto, off, n = unix.NFPROTO_IPV6, 8, 16
	}
	if field == "daddr" {
		off += n
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
		&expr.Lookup{SourceRegister: 1, SetName: set},
	}
}

func ruleMatch(r CompiledRule) []expr.Any {
	wl, peer := "daddr", "saddr"
	if r.Direction == DirEgress {
		wl, peer = "saddr", "daddr"
	}
	m := addrMatch(r.Family, wl, r.Workloads)
	if r.Protocol != 0 {
		m = append(m, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(r.Protocol)}})
	}
	if r.Peers != "" {
		m = append(m, addrMatch(r.Family, peer, r.Peers)[2:]...) // the family is checked already
	}
	if r.Ports != "" {
		m = append(m, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Lookup{SourceRegister: 1, SetName: r.Ports})
	}
	return m
}

// Count is a packet and byte count.
type Count struct{ Packets, Bytes uint64 }

// RuleCount is the count of one policy rule, both families summed.
type RuleCount struct {
	RuleID
	Count
}

// Counters are the installed table's counters.
type Counters struct {
	Rules       []RuleCount
	DefaultDeny map[Direction]Count
	Installed   bool // Tulle's table exists
}

// Counters reads the counters of the installed table from the kernel.
// Rules are those of the last ruleset this Enforcer applied.
func (e *Enforcer) Counters() (Counters, error) {
	byComment, err := e.readCounters()
	if err != nil {
		return Counters{}, err
	}
	e.mu.Lock()
	meta := e.meta
	e.mu.Unlock()
	out := Counters{DefaultDeny: map[Direction]Count{}, Installed: byComment != nil}
	sums := map[RuleID]Count{}
	var order []RuleID
	for comment, c := range byComment {
		m, ok := meta[comment]
		switch {
		case !ok:
		case m.kind == kindPolicy:
			s, seen := sums[m.id]
			if !seen {
				order = append(order, m.id)
			}
			sums[m.id] = Count{s.Packets + c.Packets, s.Bytes + c.Bytes}
		case m.kind == kindDefault:
			out.DefaultDeny[m.dir] = c
		}
	}
	for _, id := range order {
		out.Rules = append(out.Rules, RuleCount{id, sums[id]})
	}
	return out, nil
}

// readCounters returns the counters of the installed table by rule
// comment; nil (and no error) when the table does not exist.
func (e *Enforcer) readCounters() (map[string]Count, error) {
	c, err := e.conn()
	if err != nil {
		return nil, err
	}
	rules, err := readRules(c)
	if rules == nil || err != nil {
		return nil, err
	}
	out := map[string]Count{}
	for _, r := range rules {
		prev := out[r.Comment]
		out[r.Comment] = Count{prev.Packets + r.Packets, prev.Bytes + r.Bytes}
	}
	return out, nil
}
