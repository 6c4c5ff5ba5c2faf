package policy

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// issueExample is the policy of the model's description, word for word.
const issueExample = `{
  "Order": 100,
  "Selector": ["198.18.0.0/16"],
  "Ingress": [
    {"Action": "Allow", "Protocol": "TCP", "Source": ["set:web", "host:192.0.2.7"],
     "Ports": ["8080", "9000-9100"]}
  ],
  "Egress": [
    {"Action": "Deny", "Destination": ["198.18.9.0/24"]}
  ]
}`

func TestParsePolicyReadsTheModel(t *testing.T) {
	p, err := ParsePolicy("web", []byte(issueExample))
	if err != nil {
		t.Fatal(err)
	}
	if p.Name != "web" || p.Order == nil || *p.Order != 100 {
		t.Errorf("name/order: %q %v", p.Name, p.Order)
	}
	if len(p.Selector) != 1 || p.Selector[0] != (Match{Kind: MatchPrefix, Prefix: netip.MustParsePrefix("198.18.0.0/16")}) {
		t.Errorf("selector: %+v", p.Selector)
	}
	if len(p.Ingress) != 1 || len(p.Egress) != 1 {
		t.Fatalf("rules: %+v %+v", p.Ingress, p.Egress)
	}
	in := p.Ingress[0]
	wantPeers := []Match{{Kind: MatchSet, Name: "web"}, {Kind: MatchHost, Host: netip.MustParseAddr("192.0.2.7")}}
	if in.Action != Allow || in.Protocol != ProtoTCP || len(in.Peers) != 2 || in.Peers[0] != wantPeers[0] || in.Peers[1] != wantPeers[1] {
		t.Errorf("ingress rule: %+v", in)
	}
	if len(in.Ports) != 2 || in.Ports[0] != (PortRange{8080, 8080}) || in.Ports[1] != (PortRange{9000, 9100}) {
		t.Errorf("ports: %+v", in.Ports)
	}
	eg := p.Egress[0]
	if eg.Action != Deny || eg.Protocol != 0 || len(eg.Peers) != 1 || eg.Peers[0].Prefix != netip.MustParsePrefix("198.18.9.0/24") || eg.Ports != nil {
		t.Errorf("egress rule: %+v", eg)
	}
}

func TestPolicyJSONRoundTrips(t *testing.T) {
	for _, doc := range []string{
		issueExample,
		`{"Selector":["2001:db8:1::/48","198.18.3.4"],"Ingress":[]}`,
		`{"Order":-1.5,"Selector":["0.0.0.0/0","::/0"],"Egress":[{"Action":"Allow","Protocol":47},{"Action":"Allow","Protocol":"ICMPv6","Destination":[]}]}`,
	} {
		p, err := ParsePolicy("x", []byte(doc))
		if err != nil {
			t.Fatalf("%s: %v", doc, err)
		}
		b, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		q, err := ParsePolicy("x", b)
		if err != nil {
			t.Fatalf("re-read %s: %v", b, err)
		}
		b2, _ := json.Marshal(q)
		if string(b) != string(b2) {
			t.Errorf("not stable:\n%s\n%s", b, b2)
		}
		// an empty list stays an empty list: it denies, absence does not
		if strings.Contains(doc, `"Ingress":[]`) && !strings.Contains(string(b), `"Ingress":[]`) {
			t.Errorf("empty Ingress lost: %s", b)
		}
		if strings.Contains(doc, `"Destination":[]`) && !strings.Contains(string(b), `"Destination":[]`) {
			t.Errorf("empty Destination lost: %s", b)
		}
	}
}

func TestEmptyListIsNotAbsent(t *testing.T) {
	p, err := ParsePolicy("x", []byte(`{"Selector":["198.18.1.0/24"],"Ingress":[],"Egress":[{"Action":"Allow","Destination":[]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if p.Ingress == nil || len(p.Ingress) != 0 {
		t.Errorf("Ingress [] must be an empty non-nil list: %#v", p.Ingress)
	}
	if p.Egress[0].Peers == nil {
		t.Error("Destination [] must be an empty non-nil list (matches nothing), not nil (anywhere)")
	}
	q, err := ParsePolicy("x", []byte(`{"Selector":["198.18.1.0/24"],"Egress":[{"Action":"Allow"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if q.Ingress != nil || q.Egress[0].Peers != nil {
		t.Errorf("absent lists must be nil: %#v %#v", q.Ingress, q.Egress[0].Peers)
	}
}

// TestInvalidPolicyNamesTheField: each mistake is refused with the field
// (and the value) named.
func TestInvalidPolicyNamesTheField(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{`{"Selector":["198.18.0.0/16"],"Ingress":[],"Colour":"red"}`, `Colour: unknown field`},
		{`{"selector":["198.18.0.0/16"],"Ingress":[]}`, `selector: unknown field (field names are case-sensitive: "Selector")`},
		{`{"Selector":["198.18.0.0/33"],"Ingress":[]}`, `Selector[0] "198.18.0.0/33": not a CIDR or an IP address`},
		{`{"Selector":["198.18.1.5/16"],"Ingress":[]}`, `Selector[0] "198.18.1.5/16": host bits set (did you mean 198.18.0.0/16?)`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[{"Action":"Allow","Ports":["80"]}]}`, `Ingress[0].Ports: ports need a Protocol (TCP, UDP or SCTP)`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[{"Action":"Allow","Protocol":"ICMP","Ports":["80"]}]}`, `Ingress[0].Ports: protocol ICMP has no ports`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Ports":["8080","90000"]}]}`, `Ingress[0].Ports[1] "90000": want a port 1..65535`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Ports":["9100-9000"]}]}`, `Ingress[0].Ports[0] "9100-9000": range 9100-9000 is backwards`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[{"Action":"allow"}]}`, `Ingress[0].Action "allow": want Allow or Deny`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[{"Protocol":"TCP"}]}`, `Ingress[0].Action: missing`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[{"Action":"Allow","Protocol":"GRE"}]}`, `Ingress[0].Protocol "GRE": want TCP, UDP, SCTP, ICMP, ICMPv6 or a protocol number`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[{"Action":"Allow","Protocol":256}]}`, `Ingress[0].Protocol 256: protocol number out of range 1..255`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[{"Action":"Allow","Destination":["198.18.1.0/24"]}]}`, `Ingress[0].Destination: unknown field (a rule of Ingress names Source)`},
		{`{"Selector":["198.18.0.0/16"],"Egress":[{"Action":"Allow","Source":["198.18.1.0/24"]}]}`, `Egress[0].Source: unknown field (a rule of Egress names Destination)`},
		{`{"Selector":["198.18.0.0/16"],"Egress":[{"Action":"Allow","Destination":["set:Web"]}]}`, `Egress[0].Destination[0] "set:Web": netset name "Web"`},
		{`{"Selector":["host:192.0.2"],"Ingress":[]}`, `Selector[0] "host:192.0.2": not an IP address`},
		{`{"Selector":["::ffff:198.18.0.0/112"],"Ingress":[]}`, `IPv4-mapped`},
		{`{"Ingress":[]}`, `Selector: missing`},
		{`{"Selector":[],"Ingress":[]}`, `Selector []: empty`},
		{`{"Selector":["198.18.0.0/16"]}`, `neither Ingress nor Egress`},
		{`{"Selector":"198.18.0.0/16","Ingress":[]}`, `Selector "198.18.0.0/16": want a list, got a string`},
		{`{"Order":"1","Selector":["198.18.0.0/16"],"Ingress":[]}`, `Order "1": want a number, got a string`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":{}}`, `Ingress {}: want a list, got an object`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[],"Ingress":[]}`, `field "Ingress" given twice`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[]`, `not valid JSON`},
		{`{"Selector":["198.18.0.0/16"],"Ingress":[]} {}`, `trailing data`},
		{`[]`, `want a JSON object, got a list`},
		{`{"Selector":["198.18.0.0/16"],"Nets":[]}`, `Nets: unknown field (Nets belongs to a netset)`},
	} {
		_, err := ParsePolicy("web", []byte(tc.doc))
		if err == nil {
			t.Errorf("%s: accepted", tc.doc)
			continue
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: error does not wrap ErrInvalid: %v", tc.doc, err)
		}
		if !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "policy web: ") {
			t.Errorf("%s:\n got %v\nwant policy web: ...%s...", tc.doc, err, tc.want)
		}
	}
}

func TestEveryProblemIsReported(t *testing.T) {
	_, err := ParsePolicy("web", []byte(`{"Selector":["bad"],"Ingress":[{"Action":"Allow","Ports":["80"]}],"Extra":1}`))
	var ie *InvalidError
	if !errors.As(err, &ie) {
		t.Fatalf("want *InvalidError, got %v", err)
	}
	fields := []string{}
	for _, p := range ie.Problems {
		fields = append(fields, p.Field)
	}
	got := strings.Join(fields, ",")
	if got != "Extra,Selector[0],Ingress[0].Ports" {
		t.Errorf("fields %s", got)
	}
}

func TestPolicyNames(t *testing.T) {
	for _, n := range []string{"web", "a", "db-2", strings.Repeat("x", 63), "0"} {
		if err := CheckName(n); err != nil {
			t.Errorf("%q: %v", n, err)
		}
	}
	for _, n := range []string{"", "Web", "web_1", "web.1", "wéb", strings.Repeat("x", 64), "a/b"} {
		if err := CheckName(n); err == nil {
			t.Errorf("%q accepted", n)
		}
	}
	if _, err := ParsePolicy("Web", []byte(`{"Selector":["198.18.0.0/16"],"Ingress":[]}`)); err == nil || !strings.Contains(err.Error(), `name "Web"`) {
		t.Errorf("bad key name: %v", err)
	}
}

func TestParseNetset(t *testing.T) {
	n, err := ParseNetset("web", []byte(`{"Nets":["198.18.4.0/24","2001:db8:4::/64","198.18.9.7"]}`))
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("198.18.4.0/24"), netip.MustParsePrefix("2001:db8:4::/64"), netip.MustParsePrefix("198.18.9.7/32")}
	if len(n.Nets) != 3 || n.Nets[0] != want[0] || n.Nets[1] != want[1] || n.Nets[2] != want[2] {
		t.Errorf("nets %v", n.Nets)
	}
	b, _ := json.Marshal(n)
	if string(b) != `{"Nets":["198.18.4.0/24","2001:db8:4::/64","198.18.9.7/32"]}` {
		t.Errorf("marshal %s", b)
	}
	for _, tc := range []struct{ doc, want string }{
		{`{"Nets":["198.18.4.0/24","set:x"]}`, `Nets[1] "set:x": not a CIDR`},
		{`{}`, `Nets: missing`},
		{`{"Nets":[],"Sets":[]}`, `Sets: unknown field`},
	} {
		if _, err := ParseNetset("web", []byte(tc.doc)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %s", tc.doc, err, tc.want)
		}
	}
}

func TestParseDocuments(t *testing.T) {
	docs, err := ParseDocuments([]byte(`
{"Name":"db","Order":10,"Selector":["set:db"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["set:web"],"Ports":["5432"]}]}
[{"Kind":"Netset","Name":"db","Nets":["198.18.3.0/24"]},
 {"Kind":"Netset","Name":"web","Nets":[]}]
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(docs) != 3 || docs[0].Kind() != "policy" || docs[0].Name() != "db" || docs[1].Kind() != "netset" || docs[2].Name() != "web" {
		t.Fatalf("%+v", docs)
	}
	for _, tc := range []struct{ doc, want string }{
		{`{"Selector":["198.18.0.0/16"],"Ingress":[]}`, `document 1: Name: missing`},
		{`{"Name":"a","Selector":["198.18.0.0/16"],"Ingress":[]} {"Name":"a","Selector":["198.18.0.0/16"],"Egress":[]}`, `document 2 (policy a): also document 1`},
		{`{"Name":"a","Nets":[]}`, `document 1 (policy a): Nets: unknown field (a netset needs "Kind": "Netset")`},
		{`{"Kind":"Thing","Name":"a"}`, `Kind "Thing": want Policy or Netset`},
		{`{"Name":"ok","Selector":["198.18.0.0/16"],"Ingress":[]} {"Name":"bad","Selector":["x"],"Ingress":[]}`, `document 2 (policy bad): Selector[0] "x"`},
		{``, `no documents`},
		{`{"Name":`, `document 1: not valid JSON`},
	} {
		if _, err := ParseDocuments([]byte(tc.doc)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\n got %v\nwant %s", tc.doc, err, tc.want)
		}
	}
}
