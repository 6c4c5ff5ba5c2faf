// Package config turns tulled's command line and environment into a
// validated Config.
//
// Flags are flanneld's where they mean the same thing, with the same names
// and defaults, and they are parsed with Go's standard flag package as
// flanneld's are, so a flanneld command line works unchanged: both
// "-etcd-endpoints=..." and "--etcd-endpoints ..." are accepted.
//
// Every flag can also come from the environment: TULLED_<FLAG>, then, for
// migration, FLANNELD_<FLAG> (upper case, '-' as '_'). The command line wins
// over TULLED_, which wins over FLANNELD_. A TULLED_ or FLANNELD_ variable
// that names no tulled flag is reported as a warning, not silently ignored.
//
// Every error returned by Parse is a *UsageError: the daemon exits with
// status 2 and prints it.
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tulle-net/tulle/subnet"
)

// Env prefixes, strongest first.
const (
	EnvPrefix        = "TULLED_"
	FlannelEnvPrefix = "FLANNELD_"
)

// Defaults (flanneld's where flanneld has the flag).
const (
	DefaultEtcdEndpoints = "http://127.0.0.1:2379"
	DefaultSubnetFile    = subnet.DefaultEnvFile
	DefaultRenewMargin   = 60 // minutes
	DefaultLeaseTTL      = 24 * time.Hour
	DefaultStartTimeout  = 10 * time.Minute
	DefaultTunName       = "tulle0"
	DefaultMetricsAddr   = ":9285"
	DefaultHealthzIP     = "0.0.0.0"
	DefaultPprofAddr     = "127.0.0.1:6060"
)

// Etcd is how to reach the registry. Shared by the daemon and `tulled status`.
type Etcd struct {
	Endpoints []string // from a comma-separated --etcd-endpoints
	Prefix    string
	CAFile    string
	CertFile  string
	KeyFile   string
	Username  string
	Password  string // from --etcd-password, or read from PasswordFile
	// PasswordFile is where the password was read from ("" if not).
	PasswordFile string
}

// Config is the daemon's validated configuration.
type Config struct {
	Etcd         Etcd
	StartTimeout time.Duration // give up waiting for etcd at start-up

	Ifaces       []string // --iface: names, IPv4 or IPv6 addresses, in order of preference
	IfaceRegexes []*regexp.Regexp
	PublicIP     netip.Addr // advertised underlay address; zero = the interface's
	// PublicIPv6 is the advertised IPv6 underlay address (--public-ipv6);
	// zero = the interface's global IPv6 address, if any.
	PublicIPv6 netip.Addr

	SubnetFile  string
	RenewMargin time.Duration
	LeaseTTL    time.Duration
	IPMasq      bool

	HealthzIP   string
	HealthzPort int    // 0 = off
	MetricsAddr string // "" = off
	DebugPprof  bool   // serve Go's profiler on DebugPprofAddr
	// DebugPprofAddr is the profiler's own listener; always a loopback
	// address: the profiler never shares a listener the network reaches.
	DebugPprofAddr string

	TunName   string
	TunDriver string // "offload" or "water"
	Workers   int    // 0 = runtime.NumCPU()
	// PartialChecksums: advertise the "partial-checksum" feature in our
	// lease, so Tulle peers that also advertise it skip checksumming
	// payloads with us (flannel peers are never affected).
	PartialChecksums bool

	LogLevel  slog.Level
	LogFormat string // "text" or "json"

	// Warnings are things worth a log line once logging is set up, such as
	// an environment variable that names no flag.
	Warnings []string
}

// Action is what the command line asked for.
type Action int

const (
	// ActionRun: run the daemon.
	ActionRun Action = iota
	// ActionHelp: print Usage to stdout and exit 0.
	ActionHelp
	// ActionVersion: print the version and exit 0.
	ActionVersion
)

// UsageError is a command line or environment that can not be used. The
// daemon exits with status 2.
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

func usagef(format string, a ...any) error {
	return &UsageError{Err: fmt.Errorf(format, a...)}
}

// listFlag is a repeatable flag whose values may also be comma-separated
// (so TULLED_IFACE=eth0,eth1 works as two --iface flags).
type listFlag struct{ values *[]string }

func (l listFlag) String() string {
	if l.values == nil {
		return ""
	}
	return strings.Join(*l.values, ",")
}

func (l listFlag) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l.values = append(*l.values, v)
		}
	}
	return nil
}

// Group is a titled set of flags for --help.
type Group struct {
	Title string
	Names []string
}

// FlagSet is a flag.FlagSet with the knowledge Parse needs: which flags came
// from where, and how to print help in groups.
type FlagSet struct {
	*flag.FlagSet
	Groups []Group
	short  map[string]string // long name -> one-letter alias
	source map[string]string // flag name -> "--name", "TULLED_NAME" or "FLANNELD_NAME"
	help   bool              // --help, which every command has
}

func newFlagSet(name string) *FlagSet {
	f := flag.NewFlagSet(name, flag.ContinueOnError)
	f.SetOutput(io.Discard)
	f.Usage = func() {}
	fs := &FlagSet{FlagSet: f, short: map[string]string{}, source: map[string]string{}}
	fs.BoolVar(&fs.help, "help", false, "print this help and exit")
	return fs
}

// Source names where a flag's value came from, for error messages:
// "--workers", "TULLED_WORKERS", or "--workers (default)".
func (fs *FlagSet) Source(name string) string {
	if s, ok := fs.source[name]; ok {
		return s
	}
	return "--" + name + " (default)"
}

// EnvName is the environment variable for a flag under prefix:
// EnvName("TULLED_", "etcd-endpoints") == "TULLED_ETCD_ENDPOINTS".
func EnvName(prefix, flagName string) string {
	return prefix + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parse parses args, then fills every flag not given on the command line
// from TULLED_<FLAG> or FLANNELD_<FLAG> in env ("KEY=value" strings, as
// os.Environ returns). Only flags for which useEnv is true are read from env.
// It returns ActionHelp for -h or --help, else ActionRun.
func (fs *FlagSet) parse(args []string, env []string, useEnv func(name string) bool) (Action, error) {
	if err := fs.FlagSet.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) { // -h
			return ActionHelp, nil
		}
		return ActionRun, usagef("%v", err)
	}
	fs.Visit(func(f *flag.Flag) {
		if len(f.Name) == 1 {
			fs.source[f.Name] = "-" + f.Name
		} else {
			fs.source[f.Name] = "--" + f.Name
		}
	})
	for long, short := range fs.short { // -f given: --subnet-file is given
		if src, ok := fs.source[short]; ok {
			fs.source[long] = src
		}
	}
	vars := envMap(env)
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || !useEnv(f.Name) || fs.source[f.Name] != "" {
			return
		}
		for _, prefix := range []string{EnvPrefix, FlannelEnvPrefix} {
			key := EnvName(prefix, f.Name)
			v, ok := vars[key]
			if !ok {
				continue
			}
			if serr := fs.Set(f.Name, v); serr != nil {
				err = usagef("invalid value %q for %s: %v", v, key, serr)
				return
			}
			fs.source[f.Name] = key
			return
		}
	})
	if err != nil {
		return ActionRun, err
	}
	if fs.help {
		return ActionHelp, nil
	}
	return ActionRun, nil
}

func envMap(env []string) map[string]string {
	m := make(map[string]string, len(env))
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}

// unknownEnv lists TULLED_ and FLANNELD_ variables that name no flag of fs.
func (fs *FlagSet) unknownEnv(env []string) []string {
	known := map[string]bool{}
	fs.VisitAll(func(f *flag.Flag) {
		known[EnvName(EnvPrefix, f.Name)] = true
		known[EnvName(FlannelEnvPrefix, f.Name)] = true
	})
	var out []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if (strings.HasPrefix(k, EnvPrefix) || strings.HasPrefix(k, FlannelEnvPrefix)) && !known[k] {
			out = append(out, k)
		}
	}
	return out
}

// AddEtcdFlags registers the etcd flags (flanneld's names and defaults) on
// fs, filling e and endpoints (comma-separated, split by Etcd.finish).
func addEtcdFlags(fs *FlagSet, e *Etcd, endpoints *string) {
	fs.StringVar(endpoints, "etcd-endpoints", DefaultEtcdEndpoints, "etcd `URLs`, comma-separated")
	fs.StringVar(&e.Prefix, "etcd-prefix", subnet.DefaultPrefix, "key `prefix` of the network config and the leases")
	fs.StringVar(&e.CAFile, "etcd-cafile", "", "CA certificate `file` to verify etcd (TLS)")
	fs.StringVar(&e.CertFile, "etcd-certfile", "", "client certificate `file` for etcd (TLS)")
	fs.StringVar(&e.KeyFile, "etcd-keyfile", "", "client key `file` for etcd (TLS)")
	fs.StringVar(&e.Username, "etcd-username", "", "etcd `user` name (authentication)")
	fs.StringVar(&e.Password, "etcd-password", "", "etcd `password` (better --etcd-password-file, or the environment: TULLED_ETCD_PASSWORD)")
	fs.StringVar(&e.PasswordFile, "etcd-password-file", "", "read the etcd password from this `file` (refused if group or others may read it)")
}

var etcdGroup = Group{Title: "etcd", Names: []string{
	"etcd-endpoints", "etcd-prefix", "etcd-cafile", "etcd-certfile", "etcd-keyfile",
	"etcd-username", "etcd-password", "etcd-password-file",
}}

func (e *Etcd) finish(fs *FlagSet, endpoints string) error {
	e.Endpoints = nil
	for _, ep := range strings.Split(endpoints, ",") {
		ep = strings.TrimSpace(ep)
		if ep == "" {
			continue
		}
		u, err := parseEndpoint(ep)
		if err != nil {
			return usagef("invalid etcd endpoint %q in %s: %v", ep, fs.Source("etcd-endpoints"), err)
		}
		e.Endpoints = append(e.Endpoints, u)
	}
	if len(e.Endpoints) == 0 {
		return usagef("%s is empty: give at least one etcd URL, e.g. %s", fs.Source("etcd-endpoints"), DefaultEtcdEndpoints)
	}
	if e.Prefix == "" || !strings.HasPrefix(e.Prefix, "/") {
		return usagef("invalid %s %q: must start with '/'", fs.Source("etcd-prefix"), e.Prefix)
	}
	e.Prefix = strings.TrimRight(e.Prefix, "/")
	if e.Prefix == "" {
		return usagef("invalid %s \"/\": the prefix must name a directory below the root", fs.Source("etcd-prefix"))
	}
	if (e.CertFile == "") != (e.KeyFile == "") {
		return usagef("--etcd-certfile and --etcd-keyfile go together: give both or neither")
	}
	if e.PasswordFile != "" {
		if e.Password != "" {
			return usagef("%s and %s both given: give the password one way", fs.Source("etcd-password"), fs.Source("etcd-password-file"))
		}
		pw, err := readPasswordFile(e.PasswordFile)
		if err != nil {
			return usagef("%s: %v", fs.Source("etcd-password-file"), err)
		}
		e.Password = pw
	}
	if e.Password != "" && e.Username == "" {
		return usagef("an etcd password given without --etcd-username")
	}
	return nil
}

// readPasswordFile reads a password from path: the file's content without
// its trailing newline. A file that its group or others may read is
// refused: the password would not be secret on this host.
func readPasswordFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("%s is not a regular file", path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("%s has mode %04o: group or others may read the password; chmod 600 %s", path, perm, path)
	}
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return "", err
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return pw, nil
}

// secretFlags are the flags whose values RedactArgs hides.
var secretFlags = []string{"etcd-password"}

// RedactArgs returns a copy of a command line (os.Args) with the values
// of secret flags (--etcd-password, in every spelling) replaced by
// "REDACTED", for anything that shows the command line (the profiler's
// /debug/pprof/cmdline).
func RedactArgs(args []string) []string {
	out := slices.Clone(args)
	for i := 0; i < len(out); i++ {
		a := out[i]
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !slices.Contains(secretFlags, name) {
			continue
		}
		if hasValue {
			out[i] = a[:strings.Index(a, "=")+1] + "REDACTED"
		} else if i+1 < len(out) {
			out[i+1] = "REDACTED"
			i++
		}
	}
	return out
}

func parseEndpoint(ep string) (string, error) {
	scheme, rest, ok := strings.Cut(ep, "://")
	if !ok { // host:port, as the etcd client takes it
		if _, port, err := net.SplitHostPort(ep); err != nil || port == "" {
			return "", errors.New("want scheme://host:port (or host:port), e.g. http://127.0.0.1:2379")
		}
		return ep, nil
	}
	switch scheme {
	case "http", "https", "unix", "unixs":
	default:
		return "", fmt.Errorf("scheme %q: want http, https, unix or unixs", scheme)
	}
	if rest == "" {
		return "", errors.New("no host")
	}
	return ep, nil
}

// rawFlags holds flag values that need converting before they go into
// Config.
type rawFlags struct {
	endpoints, publicIP, publicIPv6, tunDriver, logLevel string
	ifaceRegexes                                         []string
	renewMargin                                          int
	version                                              bool
}

func daemonFlagSet(c *Config, r *rawFlags) *FlagSet {
	fs := newFlagSet("tulled")
	addEtcdFlags(fs, &c.Etcd, &r.endpoints)

	fs.Var(listFlag{&c.Ifaces}, "iface", "underlay interface, by `name|IP`; repeatable, first found wins (default: that of the default route)")
	fs.Var(listFlag{&r.ifaceRegexes}, "iface-regex", "`regexp` matched against interface names, IPv4 and IPv6 addresses, after --iface; repeatable")
	fs.StringVar(&r.publicIP, "public-ip", "", "IPv4 `address` other hosts send to, e.g. behind NAT (default: the interface's)")
	fs.StringVar(&r.publicIPv6, "public-ipv6", "", "IPv6 `address` other hosts send to over the IPv6 underlay, in a dual-stack network with Backend.IPv6Underlay on (default: the interface's global IPv6 address)")
	fs.StringVar(&c.SubnetFile, "subnet-file", DefaultSubnetFile, "`file` telling Docker and CNI the lease (flannel's subnet.env)")
	fs.IntVar(&r.renewMargin, "subnet-lease-renew-margin", DefaultRenewMargin, "renew the lease this many `minutes` before it expires")
	fs.DurationVar(&c.LeaseTTL, "subnet-lease-ttl", DefaultLeaseTTL, "`lifetime` of the lease in etcd; renewed while tulled runs")
	fs.DurationVar(&c.StartTimeout, "etcd-start-timeout", DefaultStartTimeout, "at start-up, exit 1 if etcd does not answer within this `duration`")
	fs.BoolVar(&c.IPMasq, "ip-masq", false, "masquerade traffic leaving the overlay (flannel's rules, chain TULLE-POSTRTG)")

	fs.StringVar(&r.tunDriver, "tun-driver", "offload", "TUN `driver`: offload (batched, TSO/GRO) or water (portable, slower)")
	fs.StringVar(&c.TunName, "tun-name", DefaultTunName, "`name` of the TUN device")
	fs.IntVar(&c.Workers, "workers", 0, "data plane `workers` (0 = one per CPU)")
	fs.BoolVar(&c.PartialChecksums, "partial-checksums", true, "between Tulle hosts that both allow it, carry TCP/UDP checksums partial (the outer UDP checksum covers the packet); false makes every packet fully checksummed, as flannel's")

	fs.StringVar(&c.MetricsAddr, "metrics-addr", DefaultMetricsAddr, "`host:port` for /metrics, /healthz and /readyz (empty = off)")
	fs.StringVar(&c.HealthzIP, "healthz-ip", DefaultHealthzIP, "`IP` of flannel's health endpoint (see --healthz-port)")
	fs.IntVar(&c.HealthzPort, "healthz-port", 0, "`port` of flannel's health endpoint; serves as --metrics-addr (0 = off)")
	fs.BoolVar(&c.DebugPprof, "debug-pprof", false, "serve Go's profiler at /debug/pprof/ on --debug-pprof-addr (for performance work)")
	fs.StringVar(&c.DebugPprofAddr, "debug-pprof-addr", DefaultPprofAddr, "loopback `host:port` of the profiler's own listener (never the metrics one)")
	fs.StringVar(&r.logLevel, "log-level", "info", "log `level`: debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", "text", "log `format`: text or json")
	fs.BoolVar(&r.version, "version", false, "print the version and exit")

	fs.Groups = []Group{
		etcdGroup,
		{Title: "network", Names: []string{"iface", "iface-regex", "public-ip", "public-ipv6", "subnet-file", "subnet-lease-renew-margin", "subnet-lease-ttl", "etcd-start-timeout", "ip-masq"}},
		{Title: "data plane", Names: []string{"tun-driver", "tun-name", "workers", "partial-checksums"}},
		{Title: "observability", Names: []string{"metrics-addr", "debug-pprof", "debug-pprof-addr", "healthz-ip", "healthz-port", "log-level", "log-format"}},
		{Title: "other", Names: []string{"version", "help"}},
	}
	return fs
}

// Parse parses the daemon's command line (without the program name) and
// env (os.Environ format). On ActionHelp or ActionVersion the Config is nil.
// Errors are *UsageError.
func Parse(args []string, env []string) (*Config, Action, error) {
	c := &Config{}
	var r rawFlags
	fs := daemonFlagSet(c, &r)
	noEnv := func(name string) bool { return name != "help" && name != "version" }
	if action, err := fs.parse(args, env, noEnv); action != ActionRun || err != nil {
		return nil, action, err
	}
	if r.version {
		return nil, ActionVersion, nil
	}
	if fs.NArg() > 0 {
		return nil, ActionRun, usagef("unexpected argument %q (subcommands: status, docker-opts; they come first)", fs.Arg(0))
	}

	if err := c.Etcd.finish(fs, r.endpoints); err != nil {
		return nil, ActionRun, err
	}
	if c.StartTimeout <= 0 {
		return nil, ActionRun, usagef("invalid %s %v: must be positive", fs.Source("etcd-start-timeout"), c.StartTimeout)
	}
	for _, s := range c.Ifaces {
		if a, err := netip.ParseAddr(s); err == nil {
			if a.Is6() && !usableIPv6(a) {
				return nil, ActionRun, usagef("invalid %s %q: want a global IPv6 address (not link-local), an IPv4 address or a name", fs.Source("iface"), s)
			}
		} else if len(s) > 15 || strings.ContainsAny(s, "/ \t") {
			return nil, ActionRun, usagef("invalid %s %q: want an interface name (at most 15 characters) or an IPv4 or IPv6 address", fs.Source("iface"), s)
		}
	}
	for _, s := range r.ifaceRegexes {
		re, err := regexp.Compile(s)
		if err != nil {
			return nil, ActionRun, usagef("invalid %s %q: %v", fs.Source("iface-regex"), s, err)
		}
		c.IfaceRegexes = append(c.IfaceRegexes, re)
	}
	if r.publicIP != "" {
		a, err := netip.ParseAddr(r.publicIP)
		if err != nil || !a.Is4() || a.IsUnspecified() || a.IsMulticast() {
			return nil, ActionRun, usagef("invalid %s %q: want a unicast IPv4 address", fs.Source("public-ip"), r.publicIP)
		}
		c.PublicIP = a
	}
	if r.publicIPv6 != "" {
		a, err := netip.ParseAddr(r.publicIPv6)
		if err != nil || !a.Is6() || !usableIPv6(a) {
			return nil, ActionRun, usagef("invalid %s %q: want a global unicast IPv6 address (not link-local)", fs.Source("public-ipv6"), r.publicIPv6)
		}
		c.PublicIPv6 = a
	}
	if c.SubnetFile == "" {
		return nil, ActionRun, usagef("%s is empty", fs.Source("subnet-file"))
	}
	if r.renewMargin < 1 {
		return nil, ActionRun, usagef("invalid %s %d: must be at least 1 (minutes)", fs.Source("subnet-lease-renew-margin"), r.renewMargin)
	}
	c.RenewMargin = time.Duration(r.renewMargin) * time.Minute
	if c.LeaseTTL < 2*time.Second {
		return nil, ActionRun, usagef("invalid %s %v: must be at least 2s", fs.Source("subnet-lease-ttl"), c.LeaseTTL)
	}
	if c.LeaseTTL%time.Second != 0 {
		return nil, ActionRun, usagef("invalid %s %v: etcd counts leases in whole seconds", fs.Source("subnet-lease-ttl"), c.LeaseTTL)
	}

	switch r.tunDriver {
	case "offload", "water":
		c.TunDriver = r.tunDriver
	default:
		return nil, ActionRun, usagef("invalid %s %q: want offload or water", fs.Source("tun-driver"), r.tunDriver)
	}
	if c.TunName == "" || len(c.TunName) > 15 || strings.ContainsAny(c.TunName, "/ %:") || c.TunName == "." || c.TunName == ".." {
		return nil, ActionRun, usagef("invalid %s %q: an interface name has 1 to 15 characters, none of '/', ' ', '%%' or ':'", fs.Source("tun-name"), c.TunName)
	}
	if c.Workers < 0 || c.Workers > 1024 {
		return nil, ActionRun, usagef("invalid %s %d: want 0 (one per CPU) to 1024", fs.Source("workers"), c.Workers)
	}

	if c.MetricsAddr != "" {
		if err := checkHostPort(c.MetricsAddr); err != nil {
			return nil, ActionRun, usagef("invalid %s %q: %v", fs.Source("metrics-addr"), c.MetricsAddr, err)
		}
	}
	if err := checkLoopback(c.DebugPprofAddr); err != nil {
		return nil, ActionRun, usagef("invalid %s %q: %v", fs.Source("debug-pprof-addr"), c.DebugPprofAddr, err)
	}
	if _, err := netip.ParseAddr(c.HealthzIP); err != nil {
		return nil, ActionRun, usagef("invalid %s %q: want an IP address", fs.Source("healthz-ip"), c.HealthzIP)
	}
	if c.HealthzPort < 0 || c.HealthzPort > 65535 {
		return nil, ActionRun, usagef("invalid %s %d: want 0 (off) to 65535", fs.Source("healthz-port"), c.HealthzPort)
	}
	if err := c.LogLevel.UnmarshalText([]byte(r.logLevel)); err != nil {
		return nil, ActionRun, usagef("invalid %s %q: want debug, info, warn or error", fs.Source("log-level"), r.logLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		return nil, ActionRun, usagef("invalid %s %q: want text or json", fs.Source("log-format"), c.LogFormat)
	}

	for _, k := range fs.unknownEnv(env) {
		c.Warnings = append(c.Warnings, fmt.Sprintf("environment variable %s names no tulled flag; ignored", k))
	}
	if fs.source["etcd-password"] == "--etcd-password" {
		c.Warnings = append(c.Warnings, "--etcd-password on the command line is visible to every user in the process list; prefer --etcd-password-file or TULLED_ETCD_PASSWORD")
	}
	return c, ActionRun, nil
}

// usableIPv6 says whether a can be an IPv6 underlay address: unicast, not
// link-local (a lease can not carry its zone), not an IPv4-mapped one.
func usableIPv6(a netip.Addr) bool {
	return a.Is6() && !a.Is4In6() && a.Zone() == "" && a.IsGlobalUnicast()
}

func checkHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return err
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil && host != "localhost" {
			return fmt.Errorf("host %q: want an IP address (or empty for all)", host)
		}
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("port %q: want 0 to 65535", port)
	}
	return nil
}

// checkLoopback accepts a host:port whose host is a loopback address or
// localhost: the profiler shows the process's memory and must not be
// reachable from the network.
func checkLoopback(s string) error {
	if err := checkHostPort(s); err != nil {
		return err
	}
	host, _, _ := net.SplitHostPort(s)
	if host == "localhost" {
		return nil
	}
	if a, err := netip.ParseAddr(host); err != nil || !a.IsLoopback() {
		return errors.New("must be a loopback address (127.0.0.1, ::1): the profiler must not be reachable from the network")
	}
	return nil
}

// HealthzAddr is flannel's health listener address, or "" when
// --healthz-port is 0.
func (c *Config) HealthzAddr() string {
	if c.HealthzPort == 0 {
		return ""
	}
	return net.JoinHostPort(c.HealthzIP, strconv.Itoa(c.HealthzPort))
}
