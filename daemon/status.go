package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tulle-net/tulle/daemon/config"
	"github.com/tulle-net/tulle/subnet"
)

// statusMain is `tulled status`: a read-only look at etcd.
func statusMain(args, env []string, stdout, stderr io.Writer) int {
	s, action, err := config.ParseStatus(args, env)
	switch {
	case err != nil:
		fmt.Fprintf(stderr, "tulled status: %v\nRun 'tulled status --help' for the flags.\n", err)
		return ExitUsage
	case action == config.ActionHelp:
		config.StatusUsage(stdout)
		return ExitOK
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.Timeout)
	defer cancel()
	rep, err := readStatus(ctx, s.Etcd, time.Now())
	if err != nil {
		fmt.Fprintf(stderr, "tulled status: %v\n", err)
		return ExitFailure
	}
	if s.JSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		err = enc.Encode(rep)
	} else {
		err = rep.writeTable(stdout, time.Now())
	}
	if err != nil {
		fmt.Fprintf(stderr, "tulled status: %v\n", err)
		return ExitFailure
	}
	return ExitOK
}

// statusReport is what `tulled status` shows; its JSON form is for scripts.
type statusReport struct {
	Endpoints   []string          `json:"endpoints"`
	ConfigKey   string            `json:"configKey"`
	Config      *statusConfig     `json:"config"`                // null when absent or invalid
	ConfigError string            `json:"configError,omitempty"` // why Config is null
	Leases      []statusLease     `json:"leases"`
	Malformed   []statusMalformed `json:"malformed,omitempty"`
}

type statusConfig struct {
	Network       string `json:"network,omitempty"`
	SubnetLen     int    `json:"subnetLen,omitempty"`
	SubnetMin     string `json:"subnetMin,omitempty"`
	SubnetMax     string `json:"subnetMax,omitempty"`
	IPv6Network   string `json:"ipv6Network,omitempty"`
	IPv6SubnetLen int    `json:"ipv6SubnetLen,omitempty"`
	BackendType   string `json:"backendType"`
	Port          int    `json:"port"`
}

type statusLease struct {
	Subnet      string     `json:"subnet"`
	IPv6Subnet  string     `json:"ipv6Subnet,omitempty"`
	PublicIP    string     `json:"publicIP"`
	PublicIPv6  string     `json:"publicIPv6,omitempty"`
	Reservation bool       `json:"reservation"`
	Expiration  *time.Time `json:"expiration"` // null for a reservation
	Host        string     `json:"host"`       // "tulle" or "flannel" (or "flannel vxlan", ...)
	Version     string     `json:"version,omitempty"`
	BackendType string     `json:"backendType,omitempty"`
}

type statusMalformed struct {
	Key   string `json:"key"`
	Error string `json:"error"`
}

// newEtcdClient connects to etcd as the daemon's flags say (TLS, user).
func newEtcdClient(e config.Etcd, dialTimeout time.Duration) (*clientv3.Client, error) {
	cc := clientv3.Config{
		Endpoints:   e.Endpoints,
		DialTimeout: dialTimeout,
		Username:    e.Username,
		Password:    e.Password,
		Logger:      zap.NewNop(),
	}
	if e.CAFile != "" || e.CertFile != "" {
		tlsInfo := transport.TLSInfo{CertFile: e.CertFile, KeyFile: e.KeyFile, TrustedCAFile: e.CAFile}
		tc, err := tlsInfo.ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("etcd TLS (ca %q, cert %q, key %q): %w", e.CAFile, e.CertFile, e.KeyFile, err)
		}
		cc.TLS = tc
	}
	c, err := clientv3.New(cc)
	if err != nil {
		return nil, fmt.Errorf("etcd client for %s: %w", strings.Join(e.Endpoints, ","), err)
	}
	return c, nil
}

// readStatus reads the config and every lease (with the remaining time of
// its etcd lease) under e.Prefix.
func readStatus(ctx context.Context, e config.Etcd, now time.Time) (*statusReport, error) {
	cli, err := newEtcdClient(e, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	rep := &statusReport{Endpoints: e.Endpoints, ConfigKey: e.Prefix + "/config", Leases: []statusLease{}}

	resp, err := cli.Get(ctx, rep.ConfigKey)
	if err != nil {
		return nil, etcdErr(ctx, e.Endpoints, fmt.Errorf("get %s: %w", rep.ConfigKey, err))
	}
	if len(resp.Kvs) == 0 {
		rep.ConfigError = "no network config at " + rep.ConfigKey
	} else if cfg, err := subnet.ParseConfig(resp.Kvs[0].Value); err != nil {
		rep.ConfigError = fmt.Sprintf("invalid network config at %s: %v", rep.ConfigKey, err)
	} else {
		rep.Config = newStatusConfig(cfg)
	}

	dir := e.Prefix + "/subnets/"
	resp, err = cli.Get(ctx, dir, clientv3.WithPrefix())
	if err != nil {
		return nil, etcdErr(ctx, e.Endpoints, fmt.Errorf("list %s: %w", dir, err))
	}
	ttls := map[int64]time.Duration{}
	for _, kv := range resp.Kvs {
		key := strings.TrimPrefix(string(kv.Key), dir)
		v4, v6, err := subnet.ParseLeaseKey(key)
		if err != nil {
			rep.Malformed = append(rep.Malformed, statusMalformed{Key: string(kv.Key), Error: err.Error()})
			continue
		}
		var attrs subnet.LeaseAttrs
		if err := json.Unmarshal(kv.Value, &attrs); err != nil {
			rep.Malformed = append(rep.Malformed, statusMalformed{Key: string(kv.Key), Error: err.Error()})
			continue
		}
		l := statusLease{
			Subnet:      prefixString(v4),
			IPv6Subnet:  prefixString(v6),
			PublicIP:    addrString(attrs.PublicIP),
			PublicIPv6:  addrString(attrs.PublicIPv6),
			Reservation: kv.Lease == 0,
			BackendType: attrs.BackendType,
		}
		l.Host, l.Version = hostKind(attrs)
		if kv.Lease != 0 {
			ttl, ok := ttls[kv.Lease]
			if !ok {
				r, err := cli.TimeToLive(ctx, clientv3.LeaseID(kv.Lease))
				if err != nil {
					return nil, etcdErr(ctx, e.Endpoints, fmt.Errorf("time to live of etcd lease %x (%s): %w", kv.Lease, kv.Key, err))
				}
				ttl = time.Duration(r.TTL) * time.Second // -1: expired just now
				ttls[kv.Lease] = ttl
			}
			if ttl >= 0 {
				exp := now.Add(ttl).UTC().Truncate(time.Second)
				l.Expiration = &exp
			}
		}
		rep.Leases = append(rep.Leases, l)
	}
	sort.Slice(rep.Leases, func(i, j int) bool {
		a, _ := netip.ParsePrefix(rep.Leases[i].Subnet)
		b, _ := netip.ParsePrefix(rep.Leases[j].Subnet)
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c < 0
		}
		return rep.Leases[i].IPv6Subnet < rep.Leases[j].IPv6Subnet
	})
	return rep, nil
}

func etcdErr(ctx context.Context, endpoints []string, err error) error {
	where := strings.Join(endpoints, ",")
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		if cause := dialProbe(endpoints); cause != nil {
			return fmt.Errorf("etcd at %s did not answer in time: %w", where, cause)
		}
		return fmt.Errorf("etcd at %s did not answer in time (see --timeout): %w", where, err)
	}
	return fmt.Errorf("etcd at %s: %w", where, err)
}

// dialProbe tries a TCP connection to each endpoint and returns the first
// failure (such as "connection refused"), which the etcd client hides
// behind its deadline; nil if one connects or none can be probed.
func dialProbe(endpoints []string) error {
	var first error
	for _, ep := range endpoints {
		hostport := ep
		if scheme, rest, ok := strings.Cut(ep, "://"); ok {
			if scheme != "http" && scheme != "https" {
				continue
			}
			hostport, _, _ = strings.Cut(rest, "/")
		}
		c, err := net.DialTimeout("tcp", hostport, 2*time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if first == nil {
			first = err
		}
	}
	return first
}

func newStatusConfig(c *subnet.Config) *statusConfig {
	sc := &statusConfig{BackendType: c.BackendType, Port: c.Port}
	if c.EnableIPv4 && c.Network.IsValid() {
		sc.Network = c.Network.String()
		sc.SubnetLen = c.SubnetLen
		sc.SubnetMin = c.SubnetMin.String()
		sc.SubnetMax = c.SubnetMax.String()
	}
	if c.EnableIPv6 && c.IPv6Network.IsValid() {
		sc.IPv6Network = c.IPv6Network.String()
		sc.IPv6SubnetLen = c.IPv6SubnetLen
	}
	return sc
}

func prefixString(p netip.Prefix) string {
	if !p.IsValid() {
		return ""
	}
	return p.String()
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// writeTable prints the report for a person.
func (r *statusReport) writeTable(w io.Writer, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "etcd:\t%s\n", strings.Join(r.Endpoints, ", "))
	if r.Config == nil {
		fmt.Fprintf(tw, "network config:\t%s\n", r.ConfigError)
	} else {
		c := r.Config
		if c.Network != "" {
			fmt.Fprintf(tw, "network:\t%s, subnets /%d from %s to %s\n", c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax)
		}
		if c.IPv6Network != "" {
			fmt.Fprintf(tw, "IPv6 network:\t%s, subnets /%d\n", c.IPv6Network, c.IPv6SubnetLen)
		}
		fmt.Fprintf(tw, "backend:\t%s, port %d\n", c.BackendType, c.Port)
	}
	tulle, flannel := 0, 0
	for _, l := range r.Leases {
		if l.Host == hostTulle {
			tulle++
		} else {
			flannel++
		}
	}
	fmt.Fprintf(tw, "leases:\t%d (%d Tulle, %d flannel)\n", len(r.Leases), tulle, flannel)
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(r.Leases) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "SUBNET\tPUBLIC IP\tEXPIRES\tKIND\tHOST")
		for _, l := range r.Leases {
			subnetText, ipText := l.Subnet, l.PublicIP
			if l.IPv6Subnet != "" {
				subnetText += " " + l.IPv6Subnet
			}
			if l.PublicIPv6 != "" {
				ipText += " " + l.PublicIPv6
			}
			kind, expires := "lease", "expired"
			switch {
			case l.Reservation:
				kind, expires = "reservation", "never"
			case l.Expiration != nil:
				expires = l.Expiration.Format("2006-01-02 15:04:05 UTC") + " (in " + shortDuration(l.Expiration.Sub(now)) + ")"
			}
			host := l.Host
			if l.Version != "" {
				host += " " + l.Version
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", subnetText, ipText, expires, kind, host)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(r.Malformed) > 0 {
		fmt.Fprintf(w, "\n%d key(s) under the subnets prefix could not be read (flannel and Tulle skip them):\n", len(r.Malformed))
		for _, m := range r.Malformed {
			fmt.Fprintf(w, "  %s: %s\n", m.Key, m.Error)
		}
	}
	return nil
}

// shortDuration is "23h59m", "4m10s" or "9s".
func shortDuration(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	d = d.Round(time.Second)
	switch {
	case d >= time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	case d >= time.Minute:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	default:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	}
}
