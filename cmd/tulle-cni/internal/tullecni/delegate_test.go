package tullecni

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/tulle-net/tulle/subnet"
)

func testEnv() subnet.Env {
	return subnet.Env{
		Network: netip.MustParsePrefix("198.18.0.0/16"),
		Subnet:  netip.MustParsePrefix("198.18.79.0/24"),
		MTU:     1472,
		IPMasq:  true,
	}
}

func mustParse(t *testing.T, conf string) *NetConf {
	t.Helper()
	n, err := ParseNetConf([]byte(conf))
	if err != nil {
		t.Fatalf("ParseNetConf(%s): %v", conf, err)
	}
	return n
}

// jsonEq compares a generated config with the expected JSON text.
func jsonEq(t *testing.T, got any, want string) {
	t.Helper()
	gb, err := json.Marshal(got)
	if err != nil {
		t.Fatal(err)
	}
	var g, w any
	if err := json.Unmarshal(gb, &g); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad want JSON: %v", err)
	}
	gn, _ := json.Marshal(g)
	wn, _ := json.Marshal(w)
	if string(gn) != string(wn) {
		t.Errorf("delegate config\n got: %s\nwant: %s", gn, wn)
	}
}

func TestDelegateIsFlannelsBridgeWithHostLocal(t *testing.T) {
	n := mustParse(t, `{"cniVersion":"1.0.0","name":"tulle","type":"tulle-cni"}`)
	d, err := BuildDelegate(n, testEnv())
	if err != nil {
		t.Fatal(err)
	}
	jsonEq(t, d, `{
		"cniVersion":"1.0.0","name":"tulle","type":"bridge",
		"ipMasq":false,"mtu":1472,"isGateway":true,
		"ipam":{"type":"host-local",
			"ranges":[[{"subnet":"198.18.79.0/24"}]],
			"routes":[{"dst":"198.18.0.0/16","gw":"198.18.79.1"}]}}`)
}

func TestDelegateMasqueradesWhenTulledDoesNot(t *testing.T) {
	n := mustParse(t, `{"name":"tulle","type":"tulle-cni"}`)
	env := testEnv()
	env.IPMasq = false
	d, err := BuildDelegate(n, env)
	if err != nil {
		t.Fatal(err)
	}
	if d["ipMasq"] != true {
		t.Errorf("ipMasq = %v with FLANNEL_IPMASQ=false, want true", d["ipMasq"])
	}
}

func TestDelegateUserKeysWin(t *testing.T) {
	n := mustParse(t, `{"cniVersion":"1.0.0","name":"tulle","type":"tulle-cni",
		"delegate":{"bridge":"cni0","hairpinMode":true,"isDefaultGateway":true,
			"ipMasq":true,"mtu":1400,"isGateway":false,"name":"ignored","cniVersion":"0.1.0"}}`)
	d, err := BuildDelegate(n, testEnv())
	if err != nil {
		t.Fatal(err)
	}
	jsonEq(t, d, `{
		"cniVersion":"1.0.0","name":"tulle","type":"bridge",
		"bridge":"cni0","hairpinMode":true,"isDefaultGateway":true,
		"ipMasq":true,"mtu":1400,"isGateway":false,
		"ipam":{"type":"host-local",
			"ranges":[[{"subnet":"198.18.79.0/24"}]],
			"routes":[{"dst":"198.18.0.0/16","gw":"198.18.79.1"}]}}`)
	if n.Delegate["name"] != "ignored" {
		t.Error("BuildDelegate modified the NetConf's delegate map")
	}
}

func TestDelegateKeepsUserIPAMKeysAndRoutes(t *testing.T) {
	n := mustParse(t, `{"name":"tulle","type":"tulle-cni",
		"ipam":{"dataDir":"/var/lib/cni/networks/x","routes":[{"dst":"192.0.2.0/24"},{"dst":"198.18.0.0/16"}]}}`)
	d, err := BuildDelegate(n, testEnv())
	if err != nil {
		t.Fatal(err)
	}
	jsonEq(t, d["ipam"], `{"type":"host-local","dataDir":"/var/lib/cni/networks/x",
		"ranges":[[{"subnet":"198.18.79.0/24"}]],
		"routes":[{"dst":"192.0.2.0/24"},{"dst":"198.18.0.0/16"}]}`)
}

func TestDelegateDualStackGetsBothRangesAndRoutes(t *testing.T) {
	n := mustParse(t, `{"name":"tulle","type":"tulle-cni"}`)
	env := testEnv()
	env.IPv6Network = netip.MustParsePrefix("2001:db8::/48")
	env.IPv6Subnet = netip.MustParsePrefix("2001:db8:0:4f::/64")
	d, err := BuildDelegate(n, env)
	if err != nil {
		t.Fatal(err)
	}
	jsonEq(t, d["ipam"], `{"type":"host-local",
		"ranges":[[{"subnet":"198.18.79.0/24"}],[{"subnet":"2001:db8:0:4f::/64"}]],
		"routes":[{"dst":"198.18.0.0/16","gw":"198.18.79.1"},{"dst":"2001:db8::/48","gw":"2001:db8:0:4f::1"}]}`)
}

func TestDelegateOtherMainPluginGetsNoIsGateway(t *testing.T) {
	n := mustParse(t, `{"name":"tulle","type":"tulle-cni","delegate":{"type":"ptp"}}`)
	d, err := BuildDelegate(n, testEnv())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := d["isGateway"]; ok {
		t.Errorf("ptp delegate got isGateway: %v", d)
	}
	if d["type"] != "ptp" || d["mtu"] != 1472 {
		t.Errorf("type/mtu = %v/%v, want ptp/1472", d["type"], d["mtu"])
	}
}

func TestDelegatePassesRuntimeConfig(t *testing.T) {
	n := mustParse(t, `{"name":"tulle","type":"tulle-cni","runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}}`)
	d, err := BuildDelegate(n, testEnv())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := d["runtimeConfig"]; !ok {
		t.Errorf("runtimeConfig not passed on: %v", d)
	}
}

func TestDelegateNeedsALease(t *testing.T) {
	n := mustParse(t, `{"name":"tulle","type":"tulle-cni"}`)
	_, err := BuildDelegate(n, subnet.Env{MTU: 1472})
	if err == nil || !strings.Contains(err.Error(), "FLANNEL_SUBNET") {
		t.Errorf("err = %v, want one naming FLANNEL_SUBNET", err)
	}
}

func TestParseNetConfDefaults(t *testing.T) {
	n := mustParse(t, `{"name":"tulle","type":"tulle-cni"}`)
	if n.SubnetFile != DefaultSubnetFile || n.DataDir != DefaultDataDir || n.DelegateType() != "bridge" {
		t.Errorf("defaults: subnetFile %q dataDir %q type %q", n.SubnetFile, n.DataDir, n.DelegateType())
	}
}

func TestParseNetConfRejectsSettingsTheLeaseOwns(t *testing.T) {
	for _, tc := range []struct{ conf, want string }{
		{`{"name":"t","type":"tulle-cni","ipam":{"ranges":[[{"subnet":"198.18.1.0/24"}]]}}`, "ipam.ranges"},
		{`{"name":"t","type":"tulle-cni","ipam":{"subnet":"198.18.1.0/24"}}`, "ipam.subnet"},
		{`{"name":"t","type":"tulle-cni","ipam":{"gateway":"198.18.1.1"}}`, "ipam.gateway"},
		{`{"name":"t","type":"tulle-cni","delegate":{"ipam":{"type":"static"}}}`, "delegate.ipam"},
		{`{"name":"t","type":"tulle-cni","delegate":{"type":7}}`, "delegate.type"},
		{`{"name":"t","type":"tulle-cni","ipam":{"type":""}}`, "ipam.type"},
		{`{"type":"tulle-cni"}`, "name is missing"},
		{`{"name":`, "parse network config"},
	} {
		_, err := ParseNetConf([]byte(tc.conf))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseNetConf(%s) = %v, want an error naming %q", tc.conf, err, tc.want)
		}
	}
}

func TestParseNetConfRejectsMalformedRoutes(t *testing.T) {
	n := mustParse(t, `{"name":"t","type":"tulle-cni","ipam":{"routes":[{"gw":"198.18.0.1"}]}}`)
	if _, err := BuildDelegate(n, testEnv()); err == nil || !strings.Contains(err.Error(), "ipam.routes[0]") {
		t.Errorf("err = %v, want one naming ipam.routes[0]", err)
	}
}
