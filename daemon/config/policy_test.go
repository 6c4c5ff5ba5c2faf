package config

import (
	"errors"
	"strings"
	"testing"
)

func TestParsePolicyVerbs(t *testing.T) {
	p, _, err := ParsePolicy([]string{"apply", "-f", "-", "--etcd-endpoints", "http://192.0.2.250:2379"}, nil)
	if err != nil || p.File != "-" || p.Etcd.Endpoints[0] != "http://192.0.2.250:2379" {
		t.Errorf("apply: %+v %v", p, err)
	}
	p, _, err = ParsePolicy([]string{"check", "--file", "x.json"}, []string{"TULLED_ETCD_ENDPOINTS=nonsense"})
	if err != nil || p.File != "x.json" {
		t.Errorf("check needs no etcd: %+v %v", p, err)
	}
	p, _, err = ParsePolicy([]string{"delete", "--netset", "a", "b"}, []string{"TULLED_ETCD_PREFIX=/x"})
	if err != nil || !p.Netsets || strings.Join(p.Names, ",") != "a,b" || p.Etcd.Prefix != "/x" {
		t.Errorf("delete: %+v %v", p, err)
	}
	p, _, err = ParsePolicy([]string{"ruleset", "--host", "192.0.2.2"}, nil)
	if err != nil || p.Host.String() != "192.0.2.2" {
		t.Errorf("ruleset: %+v %v", p, err)
	}
	if _, a, err := ParsePolicy(nil, nil); err != nil || a != ActionHelp {
		t.Errorf("no verb: %v %v", a, err)
	}
	if _, a, err := ParsePolicy([]string{"list", "--help"}, nil); err != nil || a != ActionHelp {
		t.Errorf("list --help: %v %v", a, err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"show"}, `unknown command "show"`},
		{[]string{"apply"}, "-f FILE is required"},
		{[]string{"delete"}, "name at least one policy"},
		{[]string{"ruleset", "--host", "h2"}, `--host "h2": want the host's public IP`},
		{[]string{"list", "extra"}, `unexpected argument "extra"`},
		{[]string{"list", "--timeout", "0s"}, "must be positive"},
	} {
		_, _, err := ParsePolicy(tc.args, nil)
		var ue *UsageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want a usage error with %q", tc.args, err, tc.want)
		}
	}
}
