package daemon

import (
	"encoding/json"
	"testing"
)

// subnet.env of a dual-stack network, as tulled and flanneld write it.
const dualStackEnv = "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.79.1/24\n" +
	"FLANNEL_IPV6_NETWORK=2001:db8:1::/48\nFLANNEL_IPV6_SUBNET=2001:db8:1:4f::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"

// In a dual-stack network Docker's daemon.json gets the IPv6 lease too
// (the mk-docker-opts.sh format: TestDockerOptsPrintsWhatMkDockerOptsPrints).
func TestDockerOptsGiveDockerTheIPv6Lease(t *testing.T) {
	code, out, errOut := runMain(t, nil, "docker-opts", "--daemon-json", "-f", writeSubnetEnv(t, dualStackEnv))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if len(got) != 5 || got["bip"] != "198.18.79.1/24" || got["ipv6"] != true || got["fixed-cidr-v6"] != "2001:db8:1:4f::/64" ||
		got["mtu"] != 1472.0 || got["ip-masq"] != false {
		t.Errorf("got %s", out)
	}

	// An IPv4-only subnet.env says nothing of IPv6 (as before).
	_, out, _ = runMain(t, nil, "docker-opts", "--daemon-json", "-f", writeSubnetEnv(t, flannelEnv))
	got = nil
	if err := json.Unmarshal([]byte(out), &got); err != nil || got["ipv6"] != nil || got["fixed-cidr-v6"] != nil {
		t.Errorf("IPv4-only: %v %s", err, out)
	}
}
