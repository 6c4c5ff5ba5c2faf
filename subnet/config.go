package subnet

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
)

// rawConfig holds each field of <prefix>/config as written, so that a
// rejection can quote it. encoding/json matches the names case-insensitively,
// as flannel's reader does; unknown fields are ignored.
type rawConfig struct {
	EnableIPv4    json.RawMessage
	EnableIPv6    json.RawMessage
	Network       json.RawMessage
	SubnetLen     json.RawMessage
	SubnetMin     json.RawMessage
	SubnetMax     json.RawMessage
	IPv6Network   json.RawMessage
	IPv6SubnetLen json.RawMessage
	IPv6SubnetMin json.RawMessage
	IPv6SubnetMax json.RawMessage
	Networks      json.RawMessage
	IPv6Networks  json.RawMessage
	Backend       json.RawMessage
}

// ParseConfig parses a network config as flannel stores it at
// <prefix>/config and applies flannel's defaults:
//   - EnableIPv4 true, EnableIPv6 false;
//   - SubnetLen 24 when Network is /22 or larger, else Network's length + 2;
//     a Network smaller than /28 is rejected;
//   - SubnetMin = Network + one subnet (the first subnet is skipped),
//     SubnetMax = the last subnet; both must lie in Network and be aligned;
//   - IPv6: IPv6SubnetLen 64 when IPv6Network is /62 or larger, else its
//     length + 2 (smaller than /124 rejected), limits as for IPv4;
//   - Backend absent (or without Type): type "udp"; Backend.Port absent or 0:
//     DefaultPort; Backend.DirectRouting and Backend.IPv6Underlay absent:
//     false.
//
// Network and IPv6Network are masked as flannel does. Every rejection is a
// *ConfigError naming the field, the value and the rule, and wraps
// ErrInvalidConfig.
func ParseConfig(b []byte) (*Config, error) {
	var raw rawConfig
	if err := json.Unmarshal(b, &raw); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field == "" {
			return nil, &ConfigError{Field: "network config", Rule: "must be a JSON object"}
		}
		return nil, &ConfigError{Field: "network config", Rule: "invalid JSON: " + err.Error()}
	}
	cfg := &Config{}
	var err error
	if cfg.EnableIPv4, err = boolField("EnableIPv4", raw.EnableIPv4, true); err != nil {
		return nil, err
	}
	if cfg.EnableIPv6, err = boolField("EnableIPv6", raw.EnableIPv6, false); err != nil {
		return nil, err
	}
	if !cfg.EnableIPv4 && !cfg.EnableIPv6 {
		return nil, &ConfigError{Field: "EnableIPv4", Value: "false", Rule: "EnableIPv4 or EnableIPv6 must be true"}
	}
	for _, f := range []struct {
		name string
		raw  json.RawMessage
	}{{"Networks", raw.Networks}, {"IPv6Networks", raw.IPv6Networks}} {
		if present(f.raw) && !bytes.Equal(bytes.TrimSpace(f.raw), []byte("[]")) {
			return nil, &ConfigError{Field: f.name, Value: quote(f.raw), Rule: "several networks are not supported: use Network / IPv6Network"}
		}
	}
	if cfg.EnableIPv4 {
		if err := parseIPv4(cfg, &raw); err != nil {
			return nil, err
		}
	}
	if cfg.EnableIPv6 {
		if err := parseIPv6(cfg, &raw); err != nil {
			return nil, err
		}
	}
	if err := parseBackend(cfg, raw.Backend); err != nil {
		return nil, err
	}
	return cfg, nil
}

func parseIPv4(cfg *Config, raw *rawConfig) error {
	if !present(raw.Network) {
		return &ConfigError{Field: "Network", Rule: "required when EnableIPv4 is true, e.g. \"198.18.0.0/16\""}
	}
	s, err := stringField("Network", raw.Network)
	if err != nil {
		return err
	}
	nw, err := netip.ParsePrefix(s)
	if err != nil || !nw.Addr().Is4() {
		return &ConfigError{Field: "Network", Value: truncate(s, 64), Rule: "must be an IPv4 prefix like 198.18.0.0/16"}
	}
	nw = nw.Masked()
	cfg.Network = nw
	sl, err := intField("SubnetLen", raw.SubnetLen)
	if err != nil {
		return err
	}
	switch {
	case sl != 0 && sl > 30:
		return &ConfigError{Field: "SubnetLen", Value: strconv.Itoa(sl), Rule: "must be at most 30"}
	case sl != 0 && sl < nw.Bits()+2:
		return &ConfigError{Field: "SubnetLen", Value: strconv.Itoa(sl),
			Rule: fmt.Sprintf("must be at least %d (Network /%d + 2: room for four subnets)", nw.Bits()+2, nw.Bits())}
	case sl == 0 && nw.Bits() > 28:
		return &ConfigError{Field: "Network", Value: nw.String(), Rule: "must be /28 or larger"}
	case sl == 0 && nw.Bits() <= 22:
		sl = 24
	case sl == 0:
		sl = nw.Bits() + 2
	}
	cfg.SubnetLen = sl
	size := uint32(1) << (32 - sl)
	base := v4num(nw.Addr())
	last := base + uint32(uint64(1)<<(32-nw.Bits())-1) - (size - 1)
	if cfg.SubnetMin, err = v4Limit("SubnetMin", raw.SubnetMin, nw, sl, base+size); err != nil {
		return err
	}
	if cfg.SubnetMax, err = v4Limit("SubnetMax", raw.SubnetMax, nw, sl, last); err != nil {
		return err
	}
	if cfg.SubnetMax.Less(cfg.SubnetMin) {
		return &ConfigError{Field: "SubnetMax", Value: cfg.SubnetMax.String(), Rule: "must not be below SubnetMin " + cfg.SubnetMin.String()}
	}
	return nil
}

// v4Limit parses SubnetMin or SubnetMax; absent, "" or "0.0.0.0" means def.
func v4Limit(field string, raw json.RawMessage, nw netip.Prefix, sl int, def uint32) (netip.Addr, error) {
	if !present(raw) {
		return v4addr(def), nil
	}
	s, err := stringField(field, raw)
	if err != nil {
		return netip.Addr{}, err
	}
	if s == "" {
		return v4addr(def), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !a.Is4() {
		return netip.Addr{}, &ConfigError{Field: field, Value: truncate(s, 64), Rule: "must be an IPv4 address"}
	}
	if a == netip.IPv4Unspecified() {
		return v4addr(def), nil
	}
	if !nw.Contains(a) {
		return netip.Addr{}, &ConfigError{Field: field, Value: s, Rule: "must lie in Network " + nw.String()}
	}
	if p := netip.PrefixFrom(a, sl).Masked(); p.Addr() != a {
		return netip.Addr{}, &ConfigError{Field: field, Value: s,
			Rule: fmt.Sprintf("must be aligned to SubnetLen %d (like %s)", sl, p.Addr())}
	}
	return a, nil
}

func parseIPv6(cfg *Config, raw *rawConfig) error {
	if !present(raw.IPv6Network) {
		return &ConfigError{Field: "IPv6Network", Rule: "required when EnableIPv6 is true, e.g. \"2001:db8::/48\""}
	}
	s, err := stringField("IPv6Network", raw.IPv6Network)
	if err != nil {
		return err
	}
	nw, err := netip.ParsePrefix(s)
	if err != nil || !isIPv6(nw.Addr()) {
		return &ConfigError{Field: "IPv6Network", Value: truncate(s, 64), Rule: "must be an IPv6 prefix like 2001:db8::/48"}
	}
	nw = nw.Masked()
	cfg.IPv6Network = nw
	sl, err := intField("IPv6SubnetLen", raw.IPv6SubnetLen)
	if err != nil {
		return err
	}
	switch {
	case sl != 0 && sl > 126:
		return &ConfigError{Field: "IPv6SubnetLen", Value: strconv.Itoa(sl), Rule: "must be at most 126"}
	case sl != 0 && sl < nw.Bits()+2:
		return &ConfigError{Field: "IPv6SubnetLen", Value: strconv.Itoa(sl),
			Rule: fmt.Sprintf("must be at least %d (IPv6Network /%d + 2: room for four subnets)", nw.Bits()+2, nw.Bits())}
	case sl == 0 && nw.Bits() > 124:
		return &ConfigError{Field: "IPv6Network", Value: nw.String(), Rule: "must be /124 or larger"}
	case sl == 0 && nw.Bits() <= 62:
		sl = 64
	case sl == 0:
		sl = nw.Bits() + 2
	}
	cfg.IPv6SubnetLen = sl
	size := pow2(128 - sl)
	base := u128Of(nw.Addr())
	first, _ := base.add(size)
	last, _ := base.add(lowMask(128 - nw.Bits()))
	last = last.sub(size.sub(u128{lo: 1}))
	if cfg.IPv6SubnetMin, err = v6Limit("IPv6SubnetMin", raw.IPv6SubnetMin, nw, sl, first); err != nil {
		return err
	}
	if cfg.IPv6SubnetMax, err = v6Limit("IPv6SubnetMax", raw.IPv6SubnetMax, nw, sl, last); err != nil {
		return err
	}
	if cfg.IPv6SubnetMax.Less(cfg.IPv6SubnetMin) {
		return &ConfigError{Field: "IPv6SubnetMax", Value: cfg.IPv6SubnetMax.String(), Rule: "must not be below IPv6SubnetMin " + cfg.IPv6SubnetMin.String()}
	}
	return nil
}

func v6Limit(field string, raw json.RawMessage, nw netip.Prefix, sl int, def u128) (netip.Addr, error) {
	if !present(raw) {
		return def.addr(), nil
	}
	s, err := stringField(field, raw)
	if err != nil {
		return netip.Addr{}, err
	}
	if s == "" {
		return def.addr(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !isIPv6(a) {
		return netip.Addr{}, &ConfigError{Field: field, Value: truncate(s, 64), Rule: "must be an IPv6 address"}
	}
	if !nw.Contains(a) {
		return netip.Addr{}, &ConfigError{Field: field, Value: s, Rule: "must lie in IPv6Network " + nw.String()}
	}
	if p := netip.PrefixFrom(a, sl).Masked(); p.Addr() != a {
		return netip.Addr{}, &ConfigError{Field: field, Value: s,
			Rule: fmt.Sprintf("must be aligned to IPv6SubnetLen %d (like %s)", sl, p.Addr())}
	}
	return a, nil
}

func parseBackend(cfg *Config, raw json.RawMessage) error {
	cfg.BackendType = "udp"
	cfg.Port = DefaultPort
	if !present(raw) {
		return nil
	}
	var be struct {
		Type          json.RawMessage
		Port          json.RawMessage
		DirectRouting json.RawMessage
		IPv6Underlay  json.RawMessage
	}
	if err := json.Unmarshal(raw, &be); err != nil {
		return &ConfigError{Field: "Backend", Value: quote(raw), Rule: "must be a JSON object"}
	}
	if present(be.Type) {
		t, err := stringField("Backend.Type", be.Type)
		if err != nil {
			return err
		}
		if t != "" {
			cfg.BackendType = t
		}
	}
	port, err := intField("Backend.Port", be.Port)
	if err != nil {
		return err
	}
	if port < 0 || port > 65535 {
		return &ConfigError{Field: "Backend.Port", Value: strconv.Itoa(port), Rule: "must be between 1 and 65535"}
	}
	if port != 0 {
		cfg.Port = port
	}
	if cfg.DirectRouting, err = boolField("Backend.DirectRouting", be.DirectRouting, false); err != nil {
		return err
	}
	if cfg.IPv6Underlay, err = boolField("Backend.IPv6Underlay", be.IPv6Underlay, false); err != nil {
		return err
	}
	var c bytes.Buffer
	if err := json.Compact(&c, raw); err == nil {
		cfg.Backend = c.Bytes()
	}
	return nil
}

// present reports whether a field was given with a non-null value.
func present(raw json.RawMessage) bool {
	t := bytes.TrimSpace(raw)
	return len(t) > 0 && !bytes.Equal(t, []byte("null"))
}

func boolField(name string, raw json.RawMessage, def bool) (bool, error) {
	if !present(raw) {
		return def, nil
	}
	var v bool
	if err := json.Unmarshal(raw, &v); err != nil {
		return false, &ConfigError{Field: name, Value: quote(raw), Rule: "must be true or false"}
	}
	return v, nil
}

func stringField(name string, raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", &ConfigError{Field: name, Value: quote(raw), Rule: "must be a string"}
	}
	return s, nil
}

// intField parses a whole JSON number; absent or null is 0.
func intField(name string, raw json.RawMessage) (int, error) {
	if !present(raw) {
		return 0, nil
	}
	var n json.Number
	if t := bytes.TrimSpace(raw); t[0] != '-' && (t[0] < '0' || t[0] > '9') {
		return 0, &ConfigError{Field: name, Value: quote(raw), Rule: "must be a number"}
	}
	if err := json.Unmarshal(raw, &n); err != nil {
		return 0, &ConfigError{Field: name, Value: quote(raw), Rule: "must be a number"}
	}
	v, err := strconv.ParseInt(n.String(), 10, 32)
	if err != nil {
		f, ferr := strconv.ParseFloat(n.String(), 64)
		if ferr != nil || f != math.Trunc(f) || math.Abs(f) > math.MaxInt32 {
			return 0, &ConfigError{Field: name, Value: quote(raw), Rule: "must be a whole number"}
		}
		v = int64(f)
	}
	return int(v), nil
}

// quote renders a raw JSON value for an error message, compacted and short.
func quote(raw json.RawMessage) string {
	var c bytes.Buffer
	if json.Compact(&c, raw) != nil {
		return truncate(string(raw), 64)
	}
	return truncate(c.String(), 64)
}

func v4num(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

func v4addr(n uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], n)
	return netip.AddrFrom4(b)
}
