package config

import (
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// Usage writes the daemon's --help text to w.
func Usage(w io.Writer) {
	var c Config
	var r rawFlags
	fs := daemonFlagSet(&c, &r)
	fmt.Fprint(w, `tulled: the Tulle overlay daemon, a drop-in replacement for flanneld's udp backend.

Usage:
  tulled [flags]                 run the daemon
  tulled status [--json]         print the network config and every lease (from etcd)
  tulled docker-opts [flags]     print Docker options from subnet.env (as flannel's mk-docker-opts.sh)
  tulled policy COMMAND          network policy: apply, check, list, delete, ruleset
  tulled <subcommand> --help     flags of a subcommand

`)
	fs.printGroups(w)
	fmt.Fprint(w, envHelp)
}

const envHelp = `
Every flag can also be set in the environment as TULLED_<FLAG> or, for
migration from flanneld, FLANNELD_<FLAG> (upper case, '-' as '_'), e.g.
TULLED_ETCD_ENDPOINTS=https://192.0.2.250:2379. The command line wins over
TULLED_, which wins over FLANNELD_. flanneld's single-dash spelling
(-etcd-endpoints=...) works too.

Exit status: 0 after SIGTERM or SIGINT, 1 on a runtime failure (etcd not
reachable within --etcd-start-timeout, lease lost, data plane died), 2 on a
usage or configuration error.
`

// printGroups prints the flags of fs group by group, aligned.
func (fs *FlagSet) printGroups(w io.Writer) {
	for _, g := range fs.Groups {
		fmt.Fprintf(w, "%s:\n", g.Title)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, name := range g.Names {
			f := fs.Lookup(name)
			if f == nil {
				continue
			}
			arg, usage := flag.UnquoteUsage(f)
			left := "  --" + f.Name
			if short, ok := fs.short[f.Name]; ok {
				left = "  -" + short + ", --" + f.Name
			}
			if arg != "" {
				left += " " + strings.ToUpper(arg)
			}
			if def := defaultText(f); def != "" {
				usage += " (default " + def + ")"
			}
			fmt.Fprintf(tw, "%s\t%s\n", left, usage)
		}
		tw.Flush()
		fmt.Fprintln(w)
	}
}

func defaultText(f *flag.Flag) string {
	switch f.DefValue {
	case "", "0", "false", "0s":
		return ""
	}
	if d, err := time.ParseDuration(f.DefValue); err == nil {
		return durationText(d)
	}
	if strings.ContainsAny(f.DefValue, " ") {
		return fmt.Sprintf("%q", f.DefValue)
	}
	return f.DefValue
}

// durationText is d as time.Duration.String spells it without the zero
// units it appends to whole minutes and hours: 24h, 10m, 1h30m, 10s, 1m30s.
func durationText(d time.Duration) string {
	s := d.String()
	if t, ok := strings.CutSuffix(s, "m0s"); ok {
		s = t + "m"
	}
	if t, ok := strings.CutSuffix(s, "h0m"); ok {
		s = t + "h"
	}
	return s
}
