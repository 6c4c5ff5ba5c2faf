package subnet

import (
	"errors"
	"net/netip"
	"testing"
)

func TestParseConfigAppliesFlannelDefaults(t *testing.T) {
	for _, tc := range []struct {
		name, json           string
		network              string
		subnetLen            int
		subnetMin, subnetMax string
		backendType          string
		port                 int
	}{
		{"flannel example", `{"Network":"198.18.0.0/16","SubnetLen":24,"SubnetMin":"198.18.1.0","SubnetMax":"198.18.254.0","Backend":{"Type":"udp","Port":8285}}`,
			"198.18.0.0/16", 24, "198.18.1.0", "198.18.254.0", "udp", 8285},
		{"only Network /16", `{"Network":"198.18.0.0/16"}`, "198.18.0.0/16", 24, "198.18.1.0", "198.18.255.0", "udp", 8285},
		{"/22 still gets /24", `{"Network":"198.18.4.0/22"}`, "198.18.4.0/22", 24, "198.18.5.0", "198.18.7.0", "udp", 8285},
		{"/23 gets /25", `{"Network":"198.18.4.0/23"}`, "198.18.4.0/23", 25, "198.18.4.128", "198.18.5.128", "udp", 8285},
		{"/28 gets /30", `{"Network":"198.18.0.0/28"}`, "198.18.0.0/28", 30, "198.18.0.4", "198.18.0.12", "udp", 8285},
		{"/15 overlay", `{"Network":"198.18.0.0/15","SubnetLen":20}`, "198.18.0.0/15", 20, "198.18.16.0", "198.19.240.0", "udp", 8285},
		{"keys are case-insensitive", `{"network":"198.18.0.0/16","subnetlen":26,"backend":{"type":"udp","port":9000}}`,
			"198.18.0.0/16", 26, "198.18.0.64", "198.18.255.192", "udp", 9000},
		{"unmasked Network is masked", `{"Network":"198.18.7.9/16"}`, "198.18.0.0/16", 24, "198.18.1.0", "198.18.255.0", "udp", 8285},
		{"Backend without Type is udp", `{"Network":"198.18.0.0/16","Backend":{"Port":8300}}`, "198.18.0.0/16", 24, "198.18.1.0", "198.18.255.0", "udp", 8300},
		{"other backend kept", `{"Network":"198.18.0.0/16","Backend":{"Type":"vxlan","VNI":1}}`, "198.18.0.0/16", 24, "198.18.1.0", "198.18.255.0", "vxlan", 8285},
		{"zero SubnetMin means default", `{"Network":"198.18.0.0/16","SubnetMin":"0.0.0.0","SubnetLen":0}`, "198.18.0.0/16", 24, "198.18.1.0", "198.18.255.0", "udp", 8285},
		{"unknown fields tolerated", `{"Network":"198.18.0.0/16","EnableNFTables":false,"Whatever":[1,2]}`, "198.18.0.0/16", 24, "198.18.1.0", "198.18.255.0", "udp", 8285},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.json))
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			if !c.EnableIPv4 || c.EnableIPv6 {
				t.Errorf("EnableIPv4 %v EnableIPv6 %v, want true false", c.EnableIPv4, c.EnableIPv6)
			}
			if c.Network != netip.MustParsePrefix(tc.network) || c.SubnetLen != tc.subnetLen ||
				c.SubnetMin != netip.MustParseAddr(tc.subnetMin) || c.SubnetMax != netip.MustParseAddr(tc.subnetMax) {
				t.Errorf("got Network %s SubnetLen %d SubnetMin %s SubnetMax %s, want %s %d %s %s",
					c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax, tc.network, tc.subnetLen, tc.subnetMin, tc.subnetMax)
			}
			if c.BackendType != tc.backendType || c.Port != tc.port {
				t.Errorf("backend %q port %d, want %q %d", c.BackendType, c.Port, tc.backendType, tc.port)
			}
		})
	}
}

func TestParseConfigDirectRouting(t *testing.T) {
	for _, tc := range []struct {
		json string
		want bool
	}{
		{`{"Network":"198.18.0.0/16"}`, false},
		{`{"Network":"198.18.0.0/16","Backend":{"Type":"udp"}}`, false},
		{`{"Network":"198.18.0.0/16","Backend":{"Type":"udp","DirectRouting":null}}`, false},
		{`{"Network":"198.18.0.0/16","Backend":{"Type":"udp","DirectRouting":false}}`, false},
		{`{"Network":"198.18.0.0/16","Backend":{"Type":"udp","DirectRouting":true}}`, true},
		{`{"Network":"198.18.0.0/16","backend":{"type":"udp","directrouting":true}}`, true}, // flannel's reader ignores case
	} {
		c, err := ParseConfig([]byte(tc.json))
		if err != nil {
			t.Fatalf("ParseConfig(%s): %v", tc.json, err)
		}
		if c.DirectRouting != tc.want {
			t.Errorf("ParseConfig(%s): DirectRouting %v, want %v", tc.json, c.DirectRouting, tc.want)
		}
	}
}

func TestParseConfigIPv6Underlay(t *testing.T) {
	for _, tc := range []struct {
		json string
		want bool
	}{
		{`{"Network":"198.18.0.0/16"}`, false},
		{`{"Network":"198.18.0.0/16","Backend":{"Type":"udp","IPv6Underlay":null}}`, false},
		{`{"Network":"198.18.0.0/16","Backend":{"Type":"udp","IPv6Underlay":false}}`, false},
		{`{"Network":"198.18.0.0/16","Backend":{"Type":"udp","IPv6Underlay":true}}`, true}, // inner IPv4 over an IPv6 underlay
		{`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:1::/48","backend":{"ipv6underlay":true}}`, true},
	} {
		c, err := ParseConfig([]byte(tc.json))
		if err != nil {
			t.Fatalf("ParseConfig(%s): %v", tc.json, err)
		}
		if c.IPv6Underlay != tc.want || c.DirectRouting {
			t.Errorf("ParseConfig(%s): IPv6Underlay %v (DirectRouting %v), want %v", tc.json, c.IPv6Underlay, c.DirectRouting, tc.want)
		}
	}
}

func TestParseConfigIPv6Defaults(t *testing.T) {
	c, err := ParseConfig([]byte(`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/48"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.IPv6SubnetLen != 64 || c.IPv6SubnetMin != netip.MustParseAddr("2001:db8:0:1::") || c.IPv6SubnetMax != netip.MustParseAddr("2001:db8:0:ffff::") {
		t.Errorf("got %d %s %s", c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax)
	}
	c, err = ParseConfig([]byte(`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8::/120"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.EnableIPv4 || c.IPv6SubnetLen != 122 || c.IPv6SubnetMin != netip.MustParseAddr("2001:db8::40") || c.IPv6SubnetMax != netip.MustParseAddr("2001:db8::c0") {
		t.Errorf("got %v %d %s %s", c.EnableIPv4, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax)
	}
	c, err = ParseConfig([]byte(`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/0","IPv6SubnetLen":2}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.IPv6SubnetMin != netip.MustParseAddr("4000::") || c.IPv6SubnetMax != netip.MustParseAddr("c000::") {
		t.Errorf("got %s %s", c.IPv6SubnetMin, c.IPv6SubnetMax)
	}
}

func TestParseConfigRejectionsNameFieldValueAndRule(t *testing.T) {
	for _, tc := range []struct{ json, want string }{
		{`[]`, "network config: must be a JSON object"},
		{`{"Network":`, "network config: invalid JSON: unexpected end of JSON input"},
		{`{}`, `Network: required when EnableIPv4 is true, e.g. "198.18.0.0/16"`},
		{`{"Network":null}`, `Network: required when EnableIPv4 is true, e.g. "198.18.0.0/16"`},
		{`{"Network":16}`, "Network 16: must be a string"},
		{`{"Network":"198.18.0.0"}`, "Network 198.18.0.0: must be an IPv4 prefix like 198.18.0.0/16"},
		{`{"Network":"2001:db8::/32"}`, "Network 2001:db8::/32: must be an IPv4 prefix like 198.18.0.0/16"},
		{`{"Network":"198.18.0.0/29"}`, "Network 198.18.0.0/29: must be /28 or larger"},
		{`{"Network":"198.18.0.0/16","SubnetLen":31}`, "SubnetLen 31: must be at most 30"},
		{`{"Network":"198.18.0.0/16","SubnetLen":17}`, "SubnetLen 17: must be at least 18 (Network /16 + 2: room for four subnets)"},
		{`{"Network":"198.18.0.0/16","SubnetLen":-1}`, "SubnetLen -1: must be at least 18 (Network /16 + 2: room for four subnets)"},
		{`{"Network":"198.18.0.0/16","SubnetLen":"24"}`, `SubnetLen "24": must be a number`},
		{`{"Network":"198.18.0.0/16","SubnetLen":24.5}`, "SubnetLen 24.5: must be a whole number"},
		{`{"Network":"198.18.0.0/16","SubnetMin":"198.19.0.0"}`, "SubnetMin 198.19.0.0: must lie in Network 198.18.0.0/16"},
		{`{"Network":"198.18.0.0/16","SubnetMin":"198.18.1.5"}`, "SubnetMin 198.18.1.5: must be aligned to SubnetLen 24 (like 198.18.1.0)"},
		{`{"Network":"198.18.0.0/16","SubnetMin":"banana"}`, "SubnetMin banana: must be an IPv4 address"},
		{`{"Network":"198.18.0.0/16","SubnetMax":"198.17.255.0"}`, "SubnetMax 198.17.255.0: must lie in Network 198.18.0.0/16"},
		{`{"Network":"198.18.0.0/16","SubnetMax":"198.18.3.128"}`, "SubnetMax 198.18.3.128: must be aligned to SubnetLen 24 (like 198.18.3.0)"},
		{`{"Network":"198.18.0.0/16","SubnetMin":"198.18.9.0","SubnetMax":"198.18.8.0"}`, "SubnetMax 198.18.8.0: must not be below SubnetMin 198.18.9.0"},
		{`{"Network":"198.18.0.0/16","EnableIPv4":"yes"}`, `EnableIPv4 "yes": must be true or false`},
		{`{"EnableIPv4":false}`, "EnableIPv4 false: EnableIPv4 or EnableIPv6 must be true"},
		{`{"Network":"198.18.0.0/16","EnableIPv6":true}`, `IPv6Network: required when EnableIPv6 is true, e.g. "2001:db8::/48"`},
		{`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"198.18.0.0/16"}`, "IPv6Network 198.18.0.0/16: must be an IPv6 prefix like 2001:db8::/48"},
		{`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/125"}`, "IPv6Network 2001:db8::/125: must be /124 or larger"},
		{`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/48","IPv6SubnetLen":127}`, "IPv6SubnetLen 127: must be at most 126"},
		{`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/48","IPv6SubnetLen":49}`, "IPv6SubnetLen 49: must be at least 50 (IPv6Network /48 + 2: room for four subnets)"},
		{`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/48","IPv6SubnetMin":"2001:db9::"}`, "IPv6SubnetMin 2001:db9::: must lie in IPv6Network 2001:db8::/48"},
		{`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/48","IPv6SubnetMax":"2001:db8:0:5::1"}`, "IPv6SubnetMax 2001:db8:0:5::1: must be aligned to IPv6SubnetLen 64 (like 2001:db8:0:5::)"},
		{`{"Network":"198.18.0.0/16","Backend":"udp"}`, `Backend "udp": must be a JSON object`},
		{`{"Network":"198.18.0.0/16","Backend":{"Type":7}}`, "Backend.Type 7: must be a string"},
		{`{"Network":"198.18.0.0/16","Backend":{"Port":70000}}`, "Backend.Port 70000: must be between 1 and 65535"},
		{`{"Network":"198.18.0.0/16","Backend":{"Port":-5}}`, "Backend.Port -5: must be between 1 and 65535"},
		{`{"Network":"198.18.0.0/16","Backend":{"DirectRouting":"yes"}}`, `Backend.DirectRouting "yes": must be true or false`},
		{`{"Network":"198.18.0.0/16","Backend":{"IPv6Underlay":1}}`, `Backend.IPv6Underlay 1: must be true or false`},
		{`{"Networks":["198.18.0.0/16","198.19.0.0/16"]}`, `Networks ["198.18.0.0/16","198.19.0.0/16"]: several networks are not supported: use Network / IPv6Network`},
	} {
		t.Run(tc.want, func(t *testing.T) {
			c, err := ParseConfig([]byte(tc.json))
			if err == nil {
				t.Fatalf("ParseConfig(%s) = %+v, want error %q", tc.json, c, tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("ParseConfig(%s):\n got  %q\n want %q", tc.json, err, tc.want)
			}
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("error %v does not wrap ErrInvalidConfig", err)
			}
		})
	}
}

func TestAllocationsPairIPv4AndIPv6Subnets(t *testing.T) {
	c, err := ParseConfig([]byte(`{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8::/48"}`))
	if err != nil {
		t.Fatal(err)
	}
	a, ok := c.AllocationOf(netip.MustParsePrefix("198.18.79.0/24"))
	if !ok {
		t.Fatal("198.18.79.0/24 does not fit")
	}
	if got, want := a.Key(), "198.18.79.0-24&2001:db8:0:4f::-64"; got != want {
		t.Errorf("key %q, want %q", got, want)
	}
	if n := c.SubnetCount(); n != 255 {
		t.Errorf("SubnetCount %d, want 255", n)
	}
	if _, ok := c.AllocationAt(255); ok {
		t.Error("AllocationAt(255) exists")
	}
}

func TestFreeAllocationsSkipHeldAndOverlappingSubnets(t *testing.T) {
	c, err := ParseConfig([]byte(`{"Network":"198.18.0.0/16","SubnetMax":"198.18.6.0"}`))
	if err != nil {
		t.Fatal(err)
	}
	held := []Lease{
		{Subnet: netip.MustParsePrefix("198.18.1.0/24")},
		{Subnet: netip.MustParsePrefix("198.18.4.0/23")}, // another length: overlaps .4 and .5
		{Subnet: netip.MustParsePrefix("198.18.6.128/25")},
	}
	free := c.FreeAllocations(c.Occupancy(held), 100)
	var got []string
	for _, a := range free {
		got = append(got, a.Subnet.String())
	}
	if want := []string{"198.18.2.0/24", "198.18.3.0/24"}; len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("free %v, want %v", got, want)
	}
	if len(c.FreeAllocations(c.Occupancy(nil), 3)) != 3 {
		t.Error("limit not honoured")
	}
}

func TestFitsIsFlannelsReuseTest(t *testing.T) {
	c, err := ParseConfig([]byte(`{"Network":"198.18.0.0/16","SubnetMin":"198.18.10.0","SubnetMax":"198.18.20.0"}`))
	if err != nil {
		t.Fatal(err)
	}
	for s, want := range map[string]bool{
		"198.18.10.0/24": true, "198.18.20.0/24": true, "198.18.9.0/24": false, "198.18.21.0/24": false,
		"198.18.12.0/25": false, "198.19.12.0/24": false,
	} {
		if got := c.Fits(Lease{Subnet: netip.MustParsePrefix(s)}); got != want {
			t.Errorf("Fits(%s) = %v, want %v", s, got, want)
		}
	}
	if c.Fits(Lease{Subnet: netip.MustParsePrefix("198.18.12.0/24"), IPv6Subnet: netip.MustParsePrefix("2001:db8:0:1::/64")}) {
		t.Error("a dual-stack lease fits an IPv4-only network")
	}
}
