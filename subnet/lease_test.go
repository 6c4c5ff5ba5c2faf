package subnet

import (
	"encoding/json"
	"net/netip"
	"testing"
)

func TestLeaseKeyIsFlannels(t *testing.T) {
	for _, tc := range []struct {
		l    Lease
		want string
	}{
		{Lease{Subnet: netip.MustParsePrefix("198.18.79.0/24")}, "198.18.79.0-24"},
		{Lease{Subnet: netip.MustParsePrefix("198.18.79.0/24"), IPv6Subnet: netip.MustParsePrefix("2001:db8:0:4f::/64")}, "198.18.79.0-24&2001:db8:0:4f::-64"},
		{Lease{IPv6Subnet: netip.MustParsePrefix("2001:db8:0:4f::/64")}, "0.0.0.0-0&2001:db8:0:4f::-64"},
	} {
		if got := tc.l.Key(); got != tc.want {
			t.Errorf("Key() = %q, want %q", got, tc.want)
		}
		v4, v6, err := ParseLeaseKey(tc.want)
		if err != nil || v4 != tc.l.Subnet || v6 != tc.l.IPv6Subnet {
			t.Errorf("ParseLeaseKey(%q) = %v %v %v", tc.want, v4, v6, err)
		}
	}
}

func TestParseLeaseKeyRejectsMalformedKeys(t *testing.T) {
	for _, s := range []string{
		"", "garbage", "198.18.79.0", "198.18.79.0/24", "198.18.79.0-", "198.18.79.0-33", "198.18.79.1-24",
		"198.18.79.0-024", "198.18.79.0-+4", "2001:db8::-64", "198.18.79.0-24&", "198.18.79.0-24&198.18.0.0-16",
		"198.18.79.0-24&2001:db8::1-64", "0.0.0.0-0", "::ffff:198.18.79.0-24", "198.18.79.0-24&fe80::%eth0-64",
	} {
		if v4, v6, err := ParseLeaseKey(s); err == nil {
			t.Errorf("ParseLeaseKey(%q) = %v %v, want error", s, v4, v6)
		}
	}
}

func TestLeaseValueBytesAreFlannels(t *testing.T) {
	for _, tc := range []struct {
		a    LeaseAttrs
		want string
	}{
		{LeaseAttrs{PublicIP: netip.MustParseAddr("192.0.2.1")}, `{"PublicIP":"192.0.2.1","PublicIPv6":null}`},
		{LeaseAttrs{PublicIP: netip.MustParseAddr("192.0.2.1"), PublicIPv6: netip.MustParseAddr("2001:db8::1")}, `{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8::1"}`},
		{LeaseAttrs{PublicIP: netip.MustParseAddr("192.0.2.1"), BackendType: "vxlan", BackendData: json.RawMessage(`{ "VNI": 1, "VtepMAC": "02:00:00:00:00:01" }`)},
			`{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}`},
	} {
		b, err := json.Marshal(tc.a)
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != tc.want {
			t.Errorf("got  %s\nwant %s", b, tc.want)
		}
		var back LeaseAttrs
		if err := json.Unmarshal(b, &back); err != nil || !back.Equal(func() LeaseAttrs { a := tc.a; a.BackendData = compact(a.BackendData); return a }()) {
			t.Errorf("round trip of %s: %+v %v", b, back, err)
		}
	}
	if _, err := json.Marshal(LeaseAttrs{}); err == nil {
		t.Error("a value without PublicIP marshals")
	}
}

func compact(b json.RawMessage) json.RawMessage {
	if b == nil {
		return nil
	}
	var c LeaseAttrs
	if err := json.Unmarshal([]byte(`{"PublicIP":"192.0.2.1","BackendData":`+string(b)+`}`), &c); err != nil {
		panic(err)
	}
	return c.BackendData
}

func TestLeaseValueReaderIsTolerant(t *testing.T) {
	var a LeaseAttrs
	in := `{"publicip":"192.0.2.7","BackendType":"udp","Extra":{"x":[1]},"BackendV6Data":null,"BackendData":null}`
	if err := json.Unmarshal([]byte(in), &a); err != nil {
		t.Fatal(err)
	}
	if a.PublicIP != netip.MustParseAddr("192.0.2.7") || a.PublicIPv6.IsValid() || a.BackendType != "udp" || a.BackendData != nil {
		t.Errorf("got %+v", a)
	}
	for _, bad := range []string{`{}`, `{"PublicIP":null}`, `{"PublicIP":"2001:db8::1"}`, `{"PublicIP":"192.0.2.1","PublicIPv6":"192.0.2.2"}`, `"x"`, `{"PublicIP":1}`} {
		if err := json.Unmarshal([]byte(bad), &a); err == nil {
			t.Errorf("Unmarshal(%s) succeeded: %+v", bad, a)
		}
	}
}
