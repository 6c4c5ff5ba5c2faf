package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/tulle-net/tulle/subnet"
	"github.com/tulle-net/tulle/subnet/etcd/etcdtest"
)

// loopbackEtcd starts a real etcd on free 127.0.0.1 ports (no namespace
// needed) and returns its client URL and a client.
func loopbackEtcd(t *testing.T) (string, *clientv3.Client) {
	t.Helper()
	e := etcdtest.Start(t)
	return e.Endpoint(), e.Client()
}

// putKeys writes kv to etcd; if leased, on an etcd lease of an hour, as a
// live host's lease is (else as a reservation or the config are).
func putKeys(t *testing.T, cli *clientv3.Client, leased bool, kv map[string]string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var opts []clientv3.OpOption
	if leased {
		grant, err := cli.Grant(ctx, 3600)
		if err != nil {
			t.Fatal(err)
		}
		opts = append(opts, clientv3.WithLease(grant.ID))
	}
	for k, v := range kv {
		if _, err := cli.Put(ctx, k, v, opts...); err != nil {
			t.Fatal(err)
		}
	}
}

func TestStatusListsEveryLeaseAndTellsTulleFromFlannel(t *testing.T) {
	ep, cli := loopbackEtcd(t)
	p := subnet.DefaultPrefix
	putKeys(t, cli, false, map[string]string{
		p + "/config": `{"Network":"198.18.0.0/16","SubnetLen":24,"Backend":{"Type":"udp","Port":8285}}`,
		// a reservation (no etcd lease) held by a flannel host
		p + "/subnets/198.18.9.0-24": `{"PublicIP":"192.0.2.9","PublicIPv6":null}`,
		// a key nobody can read
		p + "/subnets/banana": `{"PublicIP":"192.0.2.66"}`,
	})
	putKeys(t, cli, true, map[string]string{
		p + "/subnets/198.18.2.0-24": `{"PublicIP":"192.0.2.2","PublicIPv6":null}`,
		p + "/subnets/198.18.1.0-24": `{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendData":{"tulle":{"version":"v0.1.0"}}}`,
	})

	var out, errOut bytes.Buffer
	if code := Main([]string{"status", "--etcd-endpoints=" + ep}, nil, &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	lines := strings.Split(out.String(), "\n")
	want := []string{
		"etcd:     " + ep,
		"network:  198.18.0.0/16, subnets /24 from 198.18.1.0 to 198.18.255.0",
		"backend:  udp, port 8285",
		"leases:   3 (1 Tulle, 2 flannel)",
	}
	for i, w := range want {
		if lines[i] != w {
			t.Errorf("line %d: %q, want %q", i, lines[i], w)
		}
	}
	table := strings.Join(lines[5:], "\n")
	for _, re := range []string{
		"SUBNET +PUBLIC IP +EXPIRES +KIND +HOST",
		`198\.18\.1\.0/24 +192\.0\.2\.1 +20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in (59m\d\ds|1h00m)\) +lease +tulle v0\.1\.0`,
		`198\.18\.2\.0/24 +192\.0\.2\.2 +20\d\d.*UTC \(in .*\) +lease +flannel\n`,
		`198\.18\.9\.0/24 +192\.0\.2\.9 +never +reservation +flannel`,
		`could not be read.*\n  /coreos.com/network/subnets/banana: `,
	} {
		if !matches(re, table) {
			t.Errorf("table lacks /%s/:\n%s", re, out.String())
		}
	}

	out.Reset()
	if code := Main([]string{"status", "--json"}, []string{"TULLED_ETCD_ENDPOINTS=" + ep}, &out, &errOut); code != 0 {
		t.Fatalf("--json: exit %d: %s", code, errOut.String())
	}
	var rep statusReport
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("--json output: %v\n%s", err, out.String())
	}
	if rep.Config == nil || rep.Config.Network != "198.18.0.0/16" || len(rep.Leases) != 3 || len(rep.Malformed) != 1 {
		t.Fatalf("--json: %s", out.String())
	}
	l := rep.Leases[0]
	if l.Subnet != "198.18.1.0/24" || l.Host != "tulle" || l.Version != "v0.1.0" || l.Reservation || l.Expiration == nil {
		t.Errorf("tulle lease %+v", l)
	}
	if r := rep.Leases[2]; r.Subnet != "198.18.9.0/24" || r.Host != "flannel" || !r.Reservation || r.Expiration != nil {
		t.Errorf("reservation %+v", r)
	}
}

func TestStatusWithoutConfigStillListsLeases(t *testing.T) {
	ep, _ := loopbackEtcd(t)
	var out, errOut bytes.Buffer
	if code := Main([]string{"status", "--etcd-endpoints=" + ep}, nil, &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	if !strings.Contains(out.String(), "network config:  no network config at /coreos.com/network/config") || !strings.Contains(out.String(), "leases:          0") {
		t.Errorf("got:\n%s", out.String())
	}
}

func TestStatusNamesTheCauseWhenEtcdIsDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens here now
	var out, errOut bytes.Buffer
	code := Main([]string{"status", "--timeout=1s", "--etcd-endpoints=http://" + addr}, nil, &out, &errOut)
	if code != ExitFailure || !strings.Contains(errOut.String(), "etcd at http://"+addr+" did not answer in time") || !strings.Contains(errOut.String(), "connection refused") {
		t.Errorf("exit %d: %q", code, errOut.String())
	}
}

func TestHostKindTellsTulleFromFlannel(t *testing.T) {
	for _, tc := range []struct {
		attrs         subnet.LeaseAttrs
		kind, version string
	}{
		{subnet.LeaseAttrs{}, "flannel", ""},
		{subnet.LeaseAttrs{BackendType: "udp"}, "flannel", ""},
		{subnet.LeaseAttrs{BackendType: "vxlan", BackendData: []byte(`{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}`)}, "flannel vxlan", ""},
		{subnet.LeaseAttrs{BackendData: []byte(`{"tulle":{"version":"v1.2.3"}}`)}, "tulle", "v1.2.3"},
		{subnet.LeaseAttrs{BackendData: backendData(true)}, "tulle", "devel"},
		{subnet.LeaseAttrs{BackendData: []byte(`"junk"`)}, "flannel", ""},
	} {
		kind, version := hostKind(tc.attrs)
		if kind != tc.kind || version != tc.version {
			t.Errorf("%+v: %q %q, want %q %q", tc.attrs, kind, version, tc.kind, tc.version)
		}
	}
	// Our mark survives flannel's lease value encoding.
	b, err := subnet.LeaseAttrs{PublicIP: netipMust("192.0.2.1"), BackendData: backendData(true)}.MarshalJSON()
	if err != nil || string(b) != `{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendData":{"tulle":{"version":"devel","features":["partial-checksum"]}}}` {
		t.Errorf("lease value %s %v", b, err)
	}
	// --partial-checksums=false: still a Tulle host, without the feature.
	if got, want := string(backendData(false)), `{"tulle":{"version":"devel"}}`; got != want {
		t.Errorf("BackendData with partial checksums off: %s, want %s", got, want)
	}
}

func matches(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }

func netipMust(s string) netip.Addr { return netip.MustParseAddr(s) }

// TestStatusTimeoutBoundsEverythingIncludingTheConnect: --timeout is the
// one bound (it once capped the TCP connect at half of it, and said "within
// 1s" for --timeout=2s).
func TestStatusTimeoutBoundsEverythingIncludingTheConnect(t *testing.T) {
	if !inDaemonNetns(t) {
		return
	}
	// 192.0.2.77 is on the underlay but nobody answers its ARP: the
	// connect hangs (until the kernel gives up after about 3s).
	silent := "http://192.0.2.77:2379"
	var out, errOut bytes.Buffer
	t0 := time.Now()
	code := Main([]string{"status", "--timeout=2s", "--etcd-endpoints=" + silent}, nil, &out, &errOut)
	took := time.Since(t0)
	if code != ExitFailure || !strings.Contains(errOut.String(), "etcd at "+silent) || !strings.Contains(errOut.String(), "2s") || strings.Contains(errOut.String(), "1s") {
		t.Errorf("exit %d: %q", code, errOut.String())
	}
	if took < 1900*time.Millisecond || took > 3*time.Second {
		t.Errorf("status --timeout=2s took %s", took.Round(time.Millisecond))
	}
	t.Logf("after %s: %s", took.Round(time.Millisecond), strings.TrimSpace(errOut.String()))
}

func TestStatusRefusedIsAConfigurationError(t *testing.T) {
	s := etcdtest.New(t, etcdtest.Options{Auth: &etcdtest.Auth{Users: []etcdtest.User{{Name: "tulle", Password: "tulle-secret", ReadWrite: []string{"/coreos.com/network/"}}}}})
	s.Start()
	var out, errOut bytes.Buffer
	code := Main([]string{"status", "--etcd-endpoints=" + s.Endpoint(), "--etcd-username=tulle"}, []string{"TULLED_ETCD_PASSWORD=wrong"}, &out, &errOut)
	if code != ExitUsage || !strings.Contains(errOut.String(), "etcd refused the password for user tulle") {
		t.Errorf("exit %d: %q", code, errOut.String())
	}
}
