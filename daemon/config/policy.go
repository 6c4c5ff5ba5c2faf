package config

import (
	"fmt"
	"io"
	"net/netip"
	"slices"
	"time"
)

// Policy is the configuration of `tulled policy VERB`.
type Policy struct {
	Verb    string // apply, check, list, delete or ruleset
	Etcd    Etcd
	File    string     // apply, check: -f FILE, "-" for standard input
	JSON    bool       // list: JSON for scripts
	Netsets bool       // delete: the names are netsets, not policies
	Names   []string   // delete
	Host    netip.Addr // ruleset: the host (public IP) whose ruleset to print
	Timeout time.Duration
}

// PolicyVerbs are the verbs of `tulled policy`, with what each does.
var PolicyVerbs = []struct{ Verb, Args, Does string }{
	{"apply", "-f FILE|-", "validate policies and netsets, then write them to etcd"},
	{"check", "-f FILE|-", "validate only (nothing is written)"},
	{"list", "[--json]", "print the policies and netsets in etcd"},
	{"delete", "[--netset] NAME...", "delete policies (or netsets) from etcd"},
	{"ruleset", "--host PUBLICIP", "print the nftables ruleset that host installs"},
}

func policyFlagSet(p *Policy, endpoints, host *string) *FlagSet {
	fs := newFlagSet("tulled policy " + p.Verb)
	out := Group{Title: "command"}
	switch p.Verb {
	case "apply", "check":
		for _, n := range []string{"f", "file"} {
			fs.StringVar(&p.File, n, "", "read the documents from this `file` (- for standard input)")
		}
		fs.short = map[string]string{"file": "f"}
		out.Names = []string{"file"}
	case "list":
		fs.BoolVar(&p.JSON, "json", false, "print JSON for scripts instead of tables")
		out.Names = []string{"json"}
	case "delete":
		fs.BoolVar(&p.Netsets, "netset", false, "the names are netsets, not policies")
		out.Names = []string{"netset"}
	case "ruleset":
		fs.StringVar(host, "host", "", "the `public IP` of the host (as in its lease)")
		out.Names = []string{"host"}
	}
	fs.Groups = []Group{out}
	if p.Verb != "check" {
		addEtcdFlags(fs, &p.Etcd, endpoints)
		fs.DurationVar(&p.Timeout, "timeout", 10*time.Second, "give up if etcd does not answer within this `duration`")
		fs.Groups = append(fs.Groups, etcdGroup)
		fs.Groups[0].Names = append(fs.Groups[0].Names, "timeout")
	}
	fs.Groups[0].Names = append(fs.Groups[0].Names, "help")
	return fs
}

// ParsePolicy parses the arguments of `tulled policy` (after the word
// "policy"): a verb, then its flags. The etcd flags are the daemon's, also
// from the environment.
func ParsePolicy(args, env []string) (*Policy, Action, error) {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		return &Policy{}, ActionHelp, nil
	}
	p := &Policy{Verb: args[0]}
	if !slices.ContainsFunc(PolicyVerbs, func(v struct{ Verb, Args, Does string }) bool { return v.Verb == p.Verb }) {
		return nil, ActionRun, usagef("tulled policy: unknown command %q (apply, check, list, delete, ruleset)", p.Verb)
	}
	var endpoints, host string
	fs := policyFlagSet(p, &endpoints, &host)
	fromEnv := func(name string) bool { return slices.Contains(etcdGroup.Names, name) }
	if action, err := fs.parse(args[1:], env, fromEnv); action != ActionRun || err != nil {
		return p, action, err
	}
	switch p.Verb {
	case "apply", "check":
		if p.File == "" {
			return nil, ActionRun, usagef("tulled policy %s: -f FILE is required (- for standard input)", p.Verb)
		}
	case "delete":
		p.Names = fs.Args()
		if len(p.Names) == 0 {
			return nil, ActionRun, usagef("tulled policy delete: name at least one %s", map[bool]string{false: "policy", true: "netset"}[p.Netsets])
		}
	case "ruleset":
		a, err := netip.ParseAddr(host)
		if err != nil {
			return nil, ActionRun, usagef("tulled policy ruleset: --host %q: want the host's public IP", host)
		}
		p.Host = a
	}
	if p.Verb != "delete" && fs.NArg() > 0 {
		return nil, ActionRun, usagef("tulled policy %s: unexpected argument %q", p.Verb, fs.Arg(0))
	}
	if p.Verb != "check" {
		if err := p.Etcd.finish(fs, endpoints); err != nil {
			return nil, ActionRun, err
		}
		if p.Timeout <= 0 {
			return nil, ActionRun, usagef("invalid %s %v: must be positive", fs.Source("timeout"), p.Timeout)
		}
	}
	return p, ActionRun, nil
}

// PolicyUsage writes the help of `tulled policy` (verb "") or of one verb.
func PolicyUsage(w io.Writer, verb string) {
	if verb == "" {
		fmt.Fprint(w, "Usage: tulled policy COMMAND [flags]\n\nNetwork policy: documents in etcd at <prefix>/policies/NAME and <prefix>/netsets/NAME,\nenforced by every tulled with nftables.\n\n")
		for _, v := range PolicyVerbs {
			fmt.Fprintf(w, "  tulled policy %-8s %-20s %s\n", v.Verb, v.Args, v.Does)
		}
		fmt.Fprint(w, "\nRun 'tulled policy COMMAND --help' for the flags of a command.\n")
		return
	}
	p := Policy{Verb: verb}
	var endpoints, host string
	fs := policyFlagSet(&p, &endpoints, &host)
	for _, v := range PolicyVerbs {
		if v.Verb == verb {
			fmt.Fprintf(w, "Usage: tulled policy %s %s\n\n%s.\n\n", v.Verb, v.Args, v.Does)
		}
	}
	fs.printGroups(w)
	if verb != "check" {
		fmt.Fprint(w, "The etcd flags are also read from TULLED_<FLAG> and FLANNELD_<FLAG>, as for the daemon.\n")
	}
}
