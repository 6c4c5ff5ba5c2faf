package etcd

import (
	"encoding/json"
	"testing"

	"github.com/tulle-net/tulle/subnet"
)

// The lease's BackendData may depend on the network config (a feature such
// as direct routing is offered only when the config turns it on): the
// Manager asks BackendDataFor with the config it read and writes the answer.
func TestLeaseBackendDataFollowsTheNetworkConfig(t *testing.T) {
	t.Parallel()
	s, c, prefix := startEtcdWithConfig(t, `{"Network":"198.18.0.0/16","Backend":{"Type":"udp","DirectRouting":true}}`)
	r := newRegistry(t, s.Endpoint(), prefix, nil)
	var seen *subnet.Config
	_, _, l := startManager(t, r, subnet.ManagerOptions{
		BackendData: json.RawMessage(`{"ignored":true}`),
		BackendDataFor: func(cfg *subnet.Config) json.RawMessage {
			seen = cfg
			if cfg.DirectRouting {
				return json.RawMessage(`{"direct":true}`)
			}
			return json.RawMessage(`{"direct":false}`)
		},
	})
	if seen == nil || !seen.DirectRouting {
		t.Fatalf("BackendDataFor saw config %+v, want the one in etcd (DirectRouting true)", seen)
	}
	if got := string(l.Attrs.BackendData); got != `{"direct":true}` {
		t.Errorf("lease BackendData %s, want {\"direct\":true}", got)
	}
	kv := getKV(t, c, prefix+"/subnets/"+l.Key()).Kvs[0]
	if want := `{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendData":{"direct":true}}`; string(kv.Value) != want {
		t.Errorf("lease value in etcd %s, want %s", kv.Value, want)
	}
}
