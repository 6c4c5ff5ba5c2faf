package subnet

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Env is the content of flannel's subnet.env (/run/flannel/subnet.env),
// which Docker, CNI and Mesos read.
type Env struct {
	Network     netip.Prefix // FLANNEL_NETWORK
	Subnet      netip.Prefix // the lease, masked; written as FLANNEL_SUBNET=<lease .1>/<len>
	MTU         int          // FLANNEL_MTU
	IPMasq      bool         // FLANNEL_IPMASQ
	IPv6Network netip.Prefix // FLANNEL_IPV6_NETWORK, zero if none
	IPv6Subnet  netip.Prefix // FLANNEL_IPV6_SUBNET (<lease ::1>/<len>), zero if none
}

// Format renders e in flannel's format and order:
//
//	FLANNEL_NETWORK=198.18.0.0/16
//	FLANNEL_SUBNET=198.18.79.1/24
//	FLANNEL_IPV6_NETWORK=...   (dual stack only)
//	FLANNEL_IPV6_SUBNET=...    (dual stack only)
//	FLANNEL_MTU=1472
//	FLANNEL_IPMASQ=false
func (e Env) Format() ([]byte, error) {
	if !e.Subnet.IsValid() && !e.IPv6Subnet.IsValid() {
		return nil, fmt.Errorf("subnet.env: no subnet to write")
	}
	if e.MTU <= 0 {
		return nil, fmt.Errorf("subnet.env: MTU %d: must be positive", e.MTU)
	}
	var b bytes.Buffer
	if e.Network.IsValid() {
		fmt.Fprintf(&b, "FLANNEL_NETWORK=%s\n", e.Network.Masked())
	}
	if e.Subnet.IsValid() {
		fmt.Fprintf(&b, "FLANNEL_SUBNET=%s\n", FirstHost(e.Subnet))
	}
	if e.IPv6Network.IsValid() {
		fmt.Fprintf(&b, "FLANNEL_IPV6_NETWORK=%s\n", e.IPv6Network.Masked())
	}
	if e.IPv6Subnet.IsValid() {
		fmt.Fprintf(&b, "FLANNEL_IPV6_SUBNET=%s\n", FirstHost(e.IPv6Subnet))
	}
	fmt.Fprintf(&b, "FLANNEL_MTU=%d\n", e.MTU)
	fmt.Fprintf(&b, "FLANNEL_IPMASQ=%t\n", e.IPMasq)
	return b.Bytes(), nil
}

// FirstHost is a lease's first host address with the lease's length, as
// FLANNEL_SUBNET holds it: the address of the bridge behind the lease
// (Docker's --bip, the CNI bridge's gateway).
func FirstHost(p netip.Prefix) netip.Prefix {
	p = p.Masked()
	return netip.PrefixFrom(p.Addr().Next(), p.Bits())
}

// WriteEnv writes e to path atomically: a temporary file in the same
// directory (created if missing), synced, then renamed over path, so a
// reader sees the old file or the new one, never a part.
func WriteEnv(path string, e Env) error {
	b, err := e.Format()
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := WriteFileAtomic(path, b, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// WriteFileAtomic replaces the file at path with data, mode perm, so that
// a reader sees the old content or the new, never a part: it writes a
// temporary file in the same directory, syncs it and renames it over path
// (then syncs the directory, best effort). The directory must exist. On an
// error no temporary file is left behind.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	err = f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if d, err := os.Open(dir); err == nil { // make the rename durable
		d.Sync()
		d.Close()
	}
	return nil
}

// ReadEnv reads a subnet.env written by WriteEnv or by flanneld. Subnet and
// IPv6Subnet come back masked (the lease). Unknown variables, blank lines
// and # comments are ignored; values may be quoted. A missing file returns
// an error wrapping fs.ErrNotExist; a corrupt one an error naming the file
// and the line (the caller reports it and goes on without it).
func ReadEnv(path string) (Env, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Env{}, fmt.Errorf("read %s: %w", path, err)
	}
	e, err := ParseEnv(b)
	if err != nil {
		return Env{}, fmt.Errorf("read %s: %w", path, err)
	}
	return e, nil
}

// ParseEnv parses the content of a subnet.env (see ReadEnv).
func ParseEnv(b []byte) (Env, error) {
	var e Env
	sc := bufio.NewScanner(bytes.NewReader(b))
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || s[0] == '#' {
			continue
		}
		k, v, ok := strings.Cut(s, "=")
		if !ok {
			return Env{}, fmt.Errorf("line %d: %q: want NAME=value", line, truncate(s, 64))
		}
		k = strings.TrimSpace(strings.TrimPrefix(k, "export "))
		v = unquote(strings.TrimSpace(v))
		var err error
		switch k {
		case "FLANNEL_NETWORK":
			e.Network, err = envPrefix(v, false)
		case "FLANNEL_SUBNET":
			e.Subnet, err = envPrefix(v, false)
		case "FLANNEL_IPV6_NETWORK":
			e.IPv6Network, err = envPrefix(v, true)
		case "FLANNEL_IPV6_SUBNET":
			e.IPv6Subnet, err = envPrefix(v, true)
		case "FLANNEL_MTU":
			e.MTU, err = strconv.Atoi(v)
			if err == nil && (e.MTU <= 0 || e.MTU > 65535) {
				err = fmt.Errorf("must be between 1 and 65535")
			}
		case "FLANNEL_IPMASQ":
			e.IPMasq, err = strconv.ParseBool(v)
		}
		if err != nil {
			return Env{}, fmt.Errorf("line %d: %s=%s: %w", line, k, truncate(v, 64), err)
		}
	}
	if err := sc.Err(); err != nil {
		return Env{}, err
	}
	if !e.Subnet.IsValid() && !e.IPv6Subnet.IsValid() {
		return Env{}, fmt.Errorf("no FLANNEL_SUBNET")
	}
	return e, nil
}

func envPrefix(s string, six bool) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	if six != (p.Addr().Is6() && !p.Addr().Is4In6()) || p.Addr().Zone() != "" {
		if six {
			return netip.Prefix{}, fmt.Errorf("not an IPv6 prefix")
		}
		return netip.Prefix{}, fmt.Errorf("not an IPv4 prefix")
	}
	return p.Masked(), nil
}

func unquote(s string) string {
	if len(s) >= 2 && (s[0] == '"' || s[0] == '\'') && s[len(s)-1] == s[0] {
		return s[1 : len(s)-1]
	}
	return s
}
