package subnet

import (
	"encoding/json"
	"net/netip"
	"testing"
)

func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		`{"Network":"198.18.0.0/16","SubnetLen":24,"SubnetMin":"198.18.1.0","SubnetMax":"198.18.254.0","Backend":{"Type":"udp","Port":8285}}`,
		`{"Network":"198.18.0.0/28"}`,
		`{"Network":"0.0.0.0/0","SubnetLen":2}`,
		`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/48","IPv6SubnetLen":120}`,
		`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/0","IPv6SubnetLen":2}`,
		`{"Network":"198.18.0.0/16","SubnetLen":31}`,
		`{"Network":"198.18.0.0/16","Backend":{"Port":1e3}}`,
		`{"network":"198.18.0.0/16","subnetmin":"198.18.255.0"}`,
		`[]`, `null`, `{`, `{"Network":"198.18.0.0/16","SubnetLen":2147483648}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b)
		if err != nil {
			if _, ok := err.(*ConfigError); !ok {
				t.Fatalf("error %T %v is not a *ConfigError", err, err)
			}
			return
		}
		if !c.EnableIPv4 && !c.EnableIPv6 {
			t.Fatal("accepted with neither family")
		}
		if c.Port < 1 || c.Port > 65535 || c.BackendType == "" {
			t.Fatalf("backend %q port %d", c.BackendType, c.Port)
		}
		if c.EnableIPv4 {
			if !c.Network.Addr().Is4() || c.Network.Masked() != c.Network || c.SubnetLen > 30 || c.SubnetLen < c.Network.Bits()+2 {
				t.Fatalf("bad IPv4 network %s /%d", c.Network, c.SubnetLen)
			}
			for _, a := range []netip.Addr{c.SubnetMin, c.SubnetMax} {
				if !c.ContainsSubnet(netip.PrefixFrom(a, c.SubnetLen)) || !c.Network.Contains(a) {
					t.Fatalf("limit %s outside network %s or unaligned", a, c.Network)
				}
			}
			n := c.SubnetCount()
			if n < 1 {
				t.Fatalf("SubnetCount %d", n)
			}
			first, _ := c.AllocationAt(0)
			last, ok := c.AllocationAt(n - 1)
			if !ok || first.Subnet.Addr() != c.SubnetMin || (!c.EnableIPv6 && last.Subnet.Addr() != c.SubnetMax) {
				t.Fatalf("allocations %v .. %v do not span %s .. %s", first, last, c.SubnetMin, c.SubnetMax)
			}
			if !c.Fits(Lease{Subnet: last.Subnet, IPv6Subnet: last.IPv6Subnet}) {
				t.Fatalf("last allocation %v does not fit", last)
			}
		}
		if c.EnableIPv6 {
			if !c.IPv6Network.Addr().Is6() || c.IPv6Network.Masked() != c.IPv6Network || c.IPv6SubnetLen > 126 || c.IPv6SubnetLen < c.IPv6Network.Bits()+2 {
				t.Fatalf("bad IPv6 network %s /%d", c.IPv6Network, c.IPv6SubnetLen)
			}
			for _, a := range []netip.Addr{c.IPv6SubnetMin, c.IPv6SubnetMax} {
				if !c.ContainsIPv6Subnet(netip.PrefixFrom(a, c.IPv6SubnetLen)) || !c.IPv6Network.Contains(a) {
					t.Fatalf("limit %s outside network %s or unaligned", a, c.IPv6Network)
				}
			}
		}
	})
}

func FuzzParseLeaseKey(f *testing.F) {
	for _, s := range []string{
		"198.18.79.0-24", "198.18.79.0-24&2001:db8:0:4f::-64", "0.0.0.0-0&2001:db8::-32", "198.18.79.1-24",
		"198.18.79.0-33", "garbage", "1.2.3.4-032", "::-0", "198.18.79.0-24&2001:DB8:0:4F::-64", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v4, v6, err := ParseLeaseKey(s)
		if err != nil {
			return
		}
		if !v4.IsValid() && !v6.IsValid() {
			t.Fatal("no subnet and no error")
		}
		if (v4.IsValid() && (!v4.Addr().Is4() || v4.Masked() != v4)) || (v6.IsValid() && (!v6.Addr().Is6() || v6.Addr().Is4In6() || v6.Masked() != v6)) {
			t.Fatalf("bad prefixes %v %v", v4, v6)
		}
		key := Lease{Subnet: v4, IPv6Subnet: v6}.Key()
		b4, b6, err := ParseLeaseKey(key)
		if err != nil || b4 != v4 || b6 != v6 {
			t.Fatalf("Key() %q of %q does not parse back: %v %v %v", key, s, b4, b6, err)
		}
	})
}

func FuzzLeaseAttrs(f *testing.F) {
	for _, s := range []string{
		`{"PublicIP":"192.0.2.1","PublicIPv6":null}`,
		`{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"},"BackendV6Data":null}`,
		`{"publicip":"::ffff:192.0.2.1"}`,
		`{"PublicIP":"192.0.2.1","BackendData":null}`,
		`{"PublicIP":"192.0.2.1","BackendData":[1, 2 ,3]}`,
		`{"PublicIP":""}`, `{}`, `null`, `"x"`, `{"PublicIP":"192.0.2.1","PublicIPv6":"fe80::1%eth0"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var a LeaseAttrs
		if err := json.Unmarshal(b, &a); err != nil {
			return
		}
		if !a.PublicIP.Is4() {
			t.Fatalf("accepted PublicIP %v", a.PublicIP)
		}
		out, err := json.Marshal(a)
		if err != nil {
			t.Fatalf("Marshal of an accepted value %+v: %v", a, err)
		}
		var back LeaseAttrs
		if err := json.Unmarshal(out, &back); err != nil || !back.Equal(a) {
			t.Fatalf("round trip %s -> %s -> %+v (%v), want %+v", b, out, back, err, a)
		}
		again, _ := json.Marshal(back)
		if string(again) != string(out) {
			t.Fatalf("marshal not stable: %s vs %s", out, again)
		}
	})
}
