package policy

import (
	"encoding/json"
	"testing"
)

// FuzzParseDocuments: any input is refused or read; what is read writes
// back (as stored in etcd) to a document that reads back the same.
func FuzzParseDocuments(f *testing.F) {
	f.Add([]byte(`{"Name":"web","Order":100,"Selector":["198.18.0.0/16","set:web","host:192.0.2.7"],"Ingress":[{"Action":"Allow","Protocol":"TCP","Source":["set:web"],"Ports":["8080","9000-9100"]}],"Egress":[]}`))
	f.Add([]byte(`[{"Kind":"Netset","Name":"db","Nets":["198.18.3.0/24","2001:db8::1"]}]`))
	f.Add([]byte(`{"Name":"x","Selector":["::/0"],"Egress":[{"Action":"Deny","Protocol":47,"Destination":[]}]}`))
	f.Add([]byte(`{"Name":"x","Selector":["198.18.0.0/33"],"Ingress":[{"Ports":["0"]}],"Colour":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		docs, err := ParseDocuments(data)
		if err != nil {
			return
		}
		for _, d := range docs {
			var b []byte
			if d.Policy != nil {
				b, err = json.Marshal(d.Policy)
				if err == nil {
					var p *Policy
					if p, err = ParsePolicy(d.Name(), b); err == nil {
						b2, _ := json.Marshal(p)
						if string(b2) != string(b) {
							t.Fatalf("policy not stable:\n%s\n%s", b, b2)
						}
					}
				}
			} else {
				b, err = json.Marshal(d.Netset)
				if err == nil {
					_, err = ParseNetset(d.Name(), b)
				}
			}
			if err != nil {
				t.Fatalf("%s %s read but its stored form %s is refused: %v", d.Kind(), d.Name(), b, err)
			}
		}
	})
}
