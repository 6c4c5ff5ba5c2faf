package daemon

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/tulle-net/tulle/subnet"
)

// In a dual-stack network `tulled status` shows the IPv6 network and, per
// lease, both subnets and both public addresses.
func TestStatusShowsBothFamilies(t *testing.T) {
	ep, cli := loopbackEtcd(t)
	p := subnet.DefaultPrefix
	putKeys(t, cli, false, map[string]string{
		p + "/config": `{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"2001:db8:1::/48","Backend":{"Type":"udp"}}`,
	})
	putKeys(t, cli, true, map[string]string{
		p + "/subnets/198.18.1.0-24&2001:db8:1:1::-64": `{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8:ffff::1","BackendData":{"tulle":{"version":"v0.1.0","features":["ipv6"]}}}`,
		p + "/subnets/198.18.2.0-24&2001:db8:1:2::-64": `{"PublicIP":"192.0.2.2","PublicIPv6":null}`,
	})
	var out, errOut bytes.Buffer
	if code := Main([]string{"status", "--etcd-endpoints=" + ep}, nil, &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	for _, re := range []string{
		`\nIPv6 network: +2001:db8:1::/48, subnets /64 from 2001:db8:1:1:: to 2001:db8:1:ffff::\n`,
		`\n198\.18\.1\.0/24 2001:db8:1:1::/64 +192\.0\.2\.1 2001:db8:ffff::1 +20\d\d-.* +lease +tulle v0\.1\.0\n`,
		`\n198\.18\.2\.0/24 2001:db8:1:2::/64 +192\.0\.2\.2 +20\d\d-.* +lease +flannel \(IPv4 only\)\n`,
	} {
		if !matches(re, out.String()) {
			t.Errorf("output lacks /%s/:\n%s", re, out.String())
		}
	}

	out.Reset()
	if code := Main([]string{"status", "--json", "--etcd-endpoints=" + ep}, nil, &out, &errOut); code != 0 {
		t.Fatalf("--json: exit %d: %s", code, errOut.String())
	}
	var rep statusReport
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Config == nil || rep.Config.IPv6Network != "2001:db8:1::/48" || rep.Config.IPv6SubnetLen != 64 || len(rep.Leases) != 2 {
		t.Fatalf("--json: %s", out.String())
	}
	if l := rep.Leases[0]; l.IPv6Subnet != "2001:db8:1:1::/64" || l.PublicIPv6 != "2001:db8:ffff::1" || !l.IPv6 || strings.Join(l.Features, ",") != "ipv6" {
		t.Errorf("lease %+v", l)
	}
	if l := rep.Leases[1]; l.IPv6Subnet != "2001:db8:1:2::/64" || l.PublicIPv6 != "" || l.IPv6 || !strings.HasPrefix(l.Subnet, "198.18.2.") {
		t.Errorf("lease %+v", l)
	}
}
