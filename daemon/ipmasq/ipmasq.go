// Package ipmasq installs, keeps and removes tulled's masquerade rules
// (--ip-masq): the rules flanneld installs, in a chain of Tulle's own.
//
// In the nat table, POSTROUTING jumps (first rule) to chain TULLE-POSTRTG:
//
//	-m mark --mark 0x4000/0x4000 -j RETURN      kube-proxy masquerades these itself
//	-s <Network> -d <Network> -j RETURN         overlay to overlay: keep the source
//	-s <Network> ! -d 224.0.0.0/4 -j MASQUERADE --random-fully
//	                                            overlay to the world (not multicast)
//	! -s <Network> -d <lease> -j RETURN         outside to our containers: keep it
//	! -s <Network> -d <Network> -j MASQUERADE --random-fully
//	                                            host to remote containers: use an
//	                                            overlay-routable source
//
// (--random-fully only where iptables supports it; every rule carries the
// comment "tulle masq".)
//
// In a dual-stack network a second Rules does the same for IPv6, with the
// IPv6 network, the IPv6 lease and ff00::/8 for multicast, in ip6tables'
// nat table (flannel's IPv6 rules are the same five).
//
// Why github.com/coreos/go-iptables and not nftables: go-iptables drives the
// iptables command, which on current distributions is iptables-nft, so the
// rules land in the same nf_tables "ip nat" table that Docker, kube-proxy and
// flanneld itself write through the same command, and on iptables-legacy
// hosts they land in the legacy tables those tools use there. A hand-made
// nftables table would be a separate base chain whose verdicts interact with
// theirs by hook priority (an accept in one table does not stop another), a
// cluster moving from flannel host by host mixes both, and on
// iptables-legacy hosts nftables rules and legacy rules run side by side
// with surprising results. Matching the neighbours' mechanism is the safe
// choice. The rules are few and change once per lease, so exec'ing iptables
// costs nothing that matters.
package ipmasq

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/coreos/go-iptables/iptables"
)

const (
	// Chain is Tulle's nat chain.
	Chain = "TULLE-POSTRTG"
	// Comment tags every rule Tulle owns.
	Comment = "tulle masq"
	// KubeProxyMasqMark is the mark kube-proxy puts on packets it
	// masquerades itself (flannel skips them too, to avoid double NAT).
	KubeProxyMasqMark = "0x4000/0x4000"

	table      = "nat"
	postrouted = "POSTROUTING"
	multicast  = "224.0.0.0/4"
	multicast6 = "ff00::/8"
)

// Rules is the masquerade rule set of one lease. Methods are not safe for
// concurrent use; one owner (the daemon) calls them.
type Rules struct {
	ipt     *iptables.IPTables
	family  string // "IPv4" or "IPv6", for logs and errors
	network netip.Prefix
	lease   netip.Prefix
	rules   [][]string
	jump    []string
	logger  *slog.Logger
}

// New prepares the rules for network (the overlay) and lease (our subnet),
// both IPv4 (iptables) or both IPv6 (ip6tables). It fails if the command
// is missing or unusable.
func New(network, lease netip.Prefix, logger *slog.Logger) (*Rules, error) {
	proto, family, command := iptables.ProtocolIPv4, "IPv4", "iptables"
	switch {
	case network.Addr().Is4() && lease.Addr().Is4():
	case network.Addr().Is6() && lease.Addr().Is6() && !network.Addr().Is4In6() && !lease.Addr().Is4In6():
		proto, family, command = iptables.ProtocolIPv6, "IPv6", "ip6tables"
	default:
		return nil, fmt.Errorf("ip-masq: network %s and lease %s must be both IPv4 or both IPv6", network, lease)
	}
	if logger == nil {
		logger = slog.Default()
	}
	// Timeout bounds the wait for the xtables lock (iptables-legacy), so a
	// stuck neighbour can not hang us forever.
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(10))
	if err != nil {
		return nil, fmt.Errorf("ip-masq: %s: %w", command, err)
	}
	r := &Rules{
		ipt:     ipt,
		family:  family,
		network: network.Masked(),
		lease:   lease.Masked(),
		logger:  logger.With("chain", Chain, "family", family),
	}
	r.jump = []string{"-m", "comment", "--comment", Comment, "-j", Chain}
	r.rules = RuleSpecs(r.network, r.lease, ipt.HasRandomFully())
	return r, nil
}

// RuleSpecs are the rules of chain Chain for network and lease (both IPv4
// or both IPv6), in order, as iptables arguments.
func RuleSpecs(network, lease netip.Prefix, randomFully bool) [][]string {
	n, s := network.String(), lease.String()
	mcast := multicast
	if network.Addr().Is6() {
		mcast = multicast6
	}
	c := []string{"-m", "comment", "--comment", Comment}
	masq := []string{"-j", "MASQUERADE"}
	if randomFully {
		masq = append(masq, "--random-fully")
	}
	return [][]string{
		slices.Concat([]string{"-m", "mark", "--mark", KubeProxyMasqMark}, c, []string{"-j", "RETURN"}),
		slices.Concat([]string{"-s", n, "-d", n}, c, []string{"-j", "RETURN"}),
		slices.Concat([]string{"-s", n, "!", "-d", mcast}, c, masq),
		slices.Concat([]string{"!", "-s", n, "-d", s}, c, []string{"-j", "RETURN"}),
		slices.Concat([]string{"!", "-s", n, "-d", n}, c, masq),
	}
}

// Specs returns the rules this set installs in Chain.
func (r *Rules) Specs() [][]string { return r.rules }

// Ensure makes the rules present and in order: it creates the chain, fills
// it if any rule is missing or extra, and puts the jump from POSTROUTING
// first if it is missing. It reports whether it changed anything.
func (r *Rules) Ensure() (changed bool, err error) {
	ok, err := r.chainIntact()
	if err != nil {
		return false, err
	}
	if !ok {
		if err := r.ipt.ClearChain(table, Chain); err != nil { // creates it if missing
			return false, r.errorf("reset chain %s: %w", Chain, err)
		}
		for _, rule := range r.rules {
			if err := r.ipt.Append(table, Chain, rule...); err != nil {
				return true, r.errorf("append to %s %q: %w", Chain, strings.Join(rule, " "), err)
			}
		}
		changed = true
	}
	exists, err := r.ipt.Exists(table, postrouted, r.jump...)
	if err != nil {
		return changed, r.errorf("check jump from %s to %s: %w", postrouted, Chain, err)
	}
	if !exists {
		if err := r.ipt.Insert(table, postrouted, 1, r.jump...); err != nil {
			return changed, r.errorf("insert jump from %s to %s: %w", postrouted, Chain, err)
		}
		changed = true
	}
	return changed, nil
}

// chainIntact says whether Chain exists with exactly our rules.
func (r *Rules) chainIntact() (bool, error) {
	exists, err := r.ipt.ChainExists(table, Chain)
	if err != nil {
		return false, r.errorf("look for chain %s: %w", Chain, err)
	}
	if !exists {
		return false, nil
	}
	listed, err := r.ipt.List(table, Chain)
	if err != nil {
		return false, r.errorf("list chain %s: %w", Chain, err)
	}
	n := 0
	for _, l := range listed {
		if strings.HasPrefix(l, "-A ") {
			n++
		}
	}
	if n != len(r.rules) {
		return false, nil
	}
	for _, rule := range r.rules {
		ok, err := r.ipt.Exists(table, Chain, rule...)
		if err != nil {
			return false, r.errorf("check rule in %s %q: %w", Chain, strings.Join(rule, " "), err)
		}
		if !ok {
			return false, nil
		}
	}
	return true, nil
}

// Keep calls Ensure every interval until ctx is done, logging when it had to
// put rules back (someone flushed them) and when it fails.
func (r *Rules) Keep(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		changed, err := r.Ensure()
		switch {
		case err != nil:
			if !failing {
				r.logger.Error("ip-masq rules could not be re-asserted; retrying", "error", err, "every", interval)
			}
			failing = true
		case changed:
			r.logger.Warn("ip-masq rules were missing or changed; put back", "network", r.network, "subnet", r.lease)
			failing = false
		default:
			if failing {
				r.logger.Info("ip-masq rules re-asserted again")
			}
			failing = false
		}
	}
}

// Remove deletes the jump and the chain. Missing ones are not an error.
func (r *Rules) Remove() error {
	exists, err := r.ipt.ChainExists(table, Chain)
	if err != nil {
		return r.errorf("look for chain %s: %w", Chain, err)
	}
	if !exists { // and so no jump to it either: iptables refuses a jump to nowhere
		return nil
	}
	var errs []error
	if err := r.ipt.DeleteIfExists(table, postrouted, r.jump...); err != nil {
		errs = append(errs, r.errorf("delete jump from %s to %s: %w", postrouted, Chain, err))
	}
	if err := r.ipt.ClearAndDeleteChain(table, Chain); err != nil {
		errs = append(errs, r.errorf("delete chain %s: %w", Chain, err))
	}
	return errors.Join(errs...)
}

// errorf is fmt.Errorf prefixed with "ip-masq" and, for IPv6, the family,
// so an error says which of the two rule sets failed.
func (r *Rules) errorf(format string, a ...any) error {
	prefix := "ip-masq: "
	if r.family == "IPv6" {
		prefix = "ip-masq (IPv6): "
	}
	return fmt.Errorf(prefix+format, a...)
}

// Family is "IPv4" or "IPv6".
func (r *Rules) Family() string { return r.family }
