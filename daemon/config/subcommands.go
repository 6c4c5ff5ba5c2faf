package config

import (
	"fmt"
	"io"
	"slices"
	"time"
)

// Status is the configuration of `tulled status`.
type Status struct {
	Etcd    Etcd
	JSON    bool
	Timeout time.Duration
}

func statusFlagSet(s *Status, endpoints *string) *FlagSet {
	fs := newFlagSet("tulled status")
	addEtcdFlags(fs, &s.Etcd, endpoints)
	fs.BoolVar(&s.JSON, "json", false, "print JSON for scripts instead of a table")
	fs.DurationVar(&s.Timeout, "timeout", 10*time.Second, "give up if etcd does not answer within this `duration`")
	fs.Groups = []Group{etcdGroup, {Title: "output", Names: []string{"json", "timeout", "help"}}}
	return fs
}

// ParseStatus parses the arguments of `tulled status` (after the word
// "status"). The etcd flags are the daemon's, also from the environment.
func ParseStatus(args, env []string) (*Status, Action, error) {
	s := &Status{}
	var endpoints string
	fs := statusFlagSet(s, &endpoints)
	fromEnv := func(name string) bool { return slices.Contains(etcdGroup.Names, name) }
	if action, err := fs.parse(args, env, fromEnv); action != ActionRun || err != nil {
		return nil, action, err
	}
	if fs.NArg() > 0 {
		return nil, ActionRun, usagef("tulled status: unexpected argument %q", fs.Arg(0))
	}
	if err := s.Etcd.finish(fs, endpoints); err != nil {
		return nil, ActionRun, err
	}
	if s.Timeout <= 0 {
		return nil, ActionRun, usagef("invalid %s %v: must be positive", fs.Source("timeout"), s.Timeout)
	}
	return s, ActionRun, nil
}

// StatusUsage writes the help of `tulled status` to w.
func StatusUsage(w io.Writer) {
	var s Status
	var endpoints string
	fs := statusFlagSet(&s, &endpoints)
	fmt.Fprint(w, "Usage: tulled status [--json] [flags]\n\nPrints the network config in etcd and every lease: subnet, public IP,\nexpiry, reservation or not, and whether a Tulle or a flannel host holds it.\n\n")
	fs.printGroups(w)
	fmt.Fprint(w, "The etcd flags are also read from TULLED_<FLAG> and FLANNELD_<FLAG>, as for the daemon.\n")
}

// DockerOpts is the configuration of `tulled docker-opts`, whose short flags
// are those of flannel's mk-docker-opts.sh.
type DockerOpts struct {
	SubnetFile string // -f: flannel env file to read
	OutFile    string // -d: write here (atomically) instead of stdout
	Individual bool   // -i: DOCKER_OPT_* lines
	Combined   bool   // -c: the DOCKER_OPTS line
	Key        string // -k: name of the combined variable
	NoIPMasq   bool   // -m: leave out --ip-masq
	DaemonJSON bool   // --daemon-json: a daemon.json fragment instead
}

func dockerOptsFlagSet(d *DockerOpts) *FlagSet {
	fs := newFlagSet("tulled docker-opts")
	for _, n := range []string{"f", "subnet-file"} {
		fs.StringVar(&d.SubnetFile, n, DefaultSubnetFile, "subnet.env `file` written by tulled (or flanneld)")
	}
	for _, n := range []string{"d", "output"} {
		fs.StringVar(&d.OutFile, n, "", "write to this `file` (atomically), not standard output")
	}
	for _, n := range []string{"i", "individual"} {
		fs.BoolVar(&d.Individual, n, false, "print each option as its own variable, e.g. DOCKER_OPT_MTU")
	}
	for _, n := range []string{"c", "combined"} {
		fs.BoolVar(&d.Combined, n, false, "print them combined in one variable (neither -i nor -c: both)")
	}
	for _, n := range []string{"k", "key"} {
		fs.StringVar(&d.Key, n, "DOCKER_OPTS", "`name` of the combined variable; its value in the environment goes first")
	}
	for _, n := range []string{"m", "no-ip-masq"} {
		fs.BoolVar(&d.NoIPMasq, n, false, "leave out --ip-masq (older Docker)")
	}
	fs.BoolVar(&d.DaemonJSON, "daemon-json", false, "print a Docker daemon.json fragment (bip, mtu, ip-masq) instead")
	fs.short = map[string]string{"subnet-file": "f", "output": "d", "individual": "i", "combined": "c", "key": "k", "no-ip-masq": "m"}
	fs.Groups = []Group{
		{Title: "input and output", Names: []string{"subnet-file", "output", "daemon-json"}},
		{Title: "as mk-docker-opts.sh", Names: []string{"individual", "combined", "key", "no-ip-masq"}},
		{Title: "other", Names: []string{"help"}},
	}
	return fs
}

// ParseDockerOpts parses the arguments of `tulled docker-opts`. Only the
// subnet file is also read from the environment (TULLED_SUBNET_FILE,
// FLANNELD_SUBNET_FILE), so it matches the daemon's.
func ParseDockerOpts(args, env []string) (*DockerOpts, Action, error) {
	d := &DockerOpts{}
	fs := dockerOptsFlagSet(d)
	fromEnv := func(name string) bool { return name == "subnet-file" }
	if action, err := fs.parse(args, env, fromEnv); action != ActionRun || err != nil {
		return nil, action, err
	}
	if fs.NArg() > 0 {
		return nil, ActionRun, usagef("tulled docker-opts: unexpected argument %q", fs.Arg(0))
	}
	if d.SubnetFile == "" {
		return nil, ActionRun, usagef("tulled docker-opts: the subnet file (-f) is empty")
	}
	if d.Key == "" {
		return nil, ActionRun, usagef("tulled docker-opts: the key (-k) is empty")
	}
	if !d.Individual && !d.Combined {
		d.Individual, d.Combined = true, true
	}
	return d, ActionRun, nil
}

// DockerOptsUsage writes the help of `tulled docker-opts` to w.
func DockerOptsUsage(w io.Writer) {
	var d DockerOpts
	fs := dockerOptsFlagSet(&d)
	fmt.Fprint(w, `Usage: tulled docker-opts [flags]

Reads subnet.env and prints Docker daemon options as flannel's
mk-docker-opts.sh does:

  DOCKER_OPT_BIP="--bip=198.18.79.1/24"
  DOCKER_OPT_IPMASQ="--ip-masq=false"
  DOCKER_OPT_MTU="--mtu=1472"
  DOCKER_OPTS=" --bip=198.18.79.1/24 --ip-masq=false --mtu=1472"

or, with --daemon-json, {"bip":"198.18.79.1/24","ip-masq":false,"mtu":1472}.

`)
	fs.printGroups(w)
}
