package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tulle-net/tulle/backend/udp"
	"github.com/tulle-net/tulle/daemon/config"
	"github.com/tulle-net/tulle/subnet"
	etcdreg "github.com/tulle-net/tulle/subnet/etcd"
)

// statusMain is `tulled status`: a read-only look at etcd.
func statusMain(args, env []string, stdout, stderr io.Writer) int {
	s, action, err := config.ParseStatus(args, env)
	if code, done := commandLineDone("tulled status", err, action, config.StatusUsage, stdout, stderr); done {
		return code
	}
	rep, err := readStatus(context.Background(), s.Etcd, s.Timeout)
	if err != nil {
		fmt.Fprintf(stderr, "tulled status: %v\n", err)
		return ExitCode(err) // 2 for a refusal or a bad TLS setup, as for the daemon
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
	IPv6SubnetMin string `json:"ipv6SubnetMin,omitempty"`
	IPv6SubnetMax string `json:"ipv6SubnetMax,omitempty"`
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
	// Features are those a Tulle host advertises (udp.HostInfo); IPv6 says
	// whether the host carries inner IPv6 (feature "ipv6"): in a
	// dual-stack network only those are sent IPv6.
	Features []string `json:"features,omitempty"`
	IPv6     bool     `json:"ipv6"`
}

type statusMalformed struct {
	Key   string `json:"key"`
	Error string `json:"error"`
}

// readStatus reads the config and every lease (with the expiration of its
// etcd lease) under e.Prefix. timeout bounds all of it: connecting, TLS,
// the login, every call.
func readStatus(ctx context.Context, e config.Etcd, timeout time.Duration) (*statusReport, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	reg, err := newRegistry(e, timeout, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, asConfigError(fmt.Errorf("etcd: %w", err))
	}
	defer reg.Close()
	c, err := reg.Contents(ctx)
	eps := strings.Join(e.Endpoints, ",")
	var ue *etcdreg.UnreachableError
	switch {
	case errors.Is(err, subnet.ErrRefused):
		return nil, asConfigError(fmt.Errorf("etcd at %s: %w", eps, err))
	case errors.As(err, &ue):
		return nil, fmt.Errorf("etcd at %s did not answer in time: %s", ue.Endpoints, ue.Cause)
	case ctx.Err() != nil:
		return nil, fmt.Errorf("etcd at %s did not answer within %s (--timeout); %s", eps, timeout, reg.Status().Detail)
	case err != nil:
		return nil, fmt.Errorf("etcd at %s: %w", eps, err)
	}

	rep := &statusReport{Endpoints: e.Endpoints, ConfigKey: c.ConfigKey, Leases: []statusLease{}}
	if c.Config == nil {
		rep.ConfigError = "no network config at " + rep.ConfigKey
	} else if cfg, err := subnet.ParseConfig(c.Config); err != nil {
		rep.ConfigError = fmt.Sprintf("invalid network config at %s: %v", rep.ConfigKey, err)
	} else {
		rep.Config = newStatusConfig(cfg)
	}
	for _, m := range c.Malformed {
		rep.Malformed = append(rep.Malformed, statusMalformed{Key: m.Key, Error: m.Err.Error()})
	}
	for _, l := range c.Leases {
		sl := statusLease{
			Subnet:      prefixString(l.Subnet),
			IPv6Subnet:  prefixString(l.IPv6Subnet),
			PublicIP:    addrString(l.Attrs.PublicIP),
			PublicIPv6:  addrString(l.Attrs.PublicIPv6),
			Reservation: l.Reservation,
			BackendType: l.Attrs.BackendType,
		}
		sl.Host, sl.Version = hostKind(l.Attrs)
		if info, ok := udp.ParseHostInfo(l.Attrs.BackendData); ok {
			sl.Features = info.Features
			sl.IPv6 = slices.Contains(info.Features, udp.FeatureIPv6)
		}
		if !l.Expiration.IsZero() {
			exp := l.Expiration.UTC().Truncate(time.Second)
			sl.Expiration = &exp
		}
		rep.Leases = append(rep.Leases, sl)
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
		sc.IPv6SubnetMin = c.IPv6SubnetMin.String()
		sc.IPv6SubnetMax = c.IPv6SubnetMax.String()
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
			fmt.Fprintf(tw, "IPv6 network:\t%s, subnets /%d from %s to %s\n", c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax)
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
			if r.Config != nil && r.Config.IPv6Network != "" && !l.IPv6 {
				host += " (IPv4 only)" // never sent IPv6, e.g. a flannel host
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
