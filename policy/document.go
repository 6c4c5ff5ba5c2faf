package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Document is one document of a file given to `tulled policy apply`: a
// policy or a netset, with its name.
type Document struct {
	Policy *Policy // set for "Kind": "Policy" (the default)
	Netset *Netset // set for "Kind": "Netset"
}

// Name is the document's policy or netset name.
func (d Document) Name() string {
	if d.Policy != nil {
		return d.Policy.Name
	}
	return d.Netset.Name
}

// Kind is "policy" or "netset".
func (d Document) Kind() string {
	if d.Policy != nil {
		return "policy"
	}
	return "netset"
}

// ParseDocuments reads the documents of a policy file: JSON objects one
// after another, or lists of them. Each has a "Name" and optionally a
// "Kind" ("Policy", the default, or "Netset") beside the fields of the
// stored document:
//
//	{"Name": "db", "Order": 10, "Selector": ["set:db"], "Ingress": [...]}
//	{"Kind": "Netset", "Name": "db", "Nets": ["198.18.3.0/24"]}
//
// It reports the problems of every document (each naming the document and
// the field) and refuses a name given twice for the same kind.
func ParseDocuments(data []byte) ([]Document, error) {
	var raws []json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(data))
	for {
		var v json.RawMessage
		err := dec.Decode(&v)
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", len(raws)+1, jsonError(err))
		}
		if jsonKind(v) == "a list" {
			var l []json.RawMessage
			if err := json.Unmarshal(v, &l); err != nil {
				return nil, fmt.Errorf("document %d: %w", len(raws)+1, jsonError(err))
			}
			raws = append(raws, l...)
			continue
		}
		raws = append(raws, v)
	}
	if len(raws) == 0 {
		return nil, errors.New("no documents")
	}
	var docs []Document
	var errs []error
	seen := map[string]int{}
	for i, raw := range raws {
		d, err := parseDocument(i+1, raw)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		key := d.Kind() + " " + d.Name()
		if first, dup := seen[key]; dup {
			errs = append(errs, fmt.Errorf("document %d (%s): also document %d: a name may appear once per file", i+1, key, first))
			continue
		}
		seen[key] = i + 1
		docs = append(docs, d)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return docs, nil
}

func parseDocument(n int, raw json.RawMessage) (Document, error) {
	what := fmt.Sprintf("document %d", n)
	var ps problems
	o, err := readObject(raw)
	if err != nil {
		ps.add("", nil, "%v", err)
		return Document{}, &InvalidError{What: what, Problems: ps}
	}
	kind := "Policy"
	if v, ok := o.vals["Kind"]; ok {
		if s, ok := asString(&ps, "Kind", v); ok {
			kind = s
		}
		if kind != "Policy" && kind != "Netset" {
			ps.add("Kind", v, "want Policy or Netset")
		}
	}
	name := ""
	if v, ok := o.vals["Name"]; !ok {
		ps.add("Name", nil, "missing: every document needs a Name")
	} else if s, ok := asString(&ps, "Name", v); ok {
		name = s
		if err := CheckName(s); err != nil {
			ps.add("Name", v, "%v", err)
		}
	}
	if name != "" {
		what = fmt.Sprintf("document %d (%s %s)", n, map[string]string{"Policy": "policy", "Netset": "netset"}[kind], name)
		if kind != "Policy" && kind != "Netset" {
			what = fmt.Sprintf("document %d (%s)", n, name)
		}
	}
	var d Document
	switch kind {
	case "Netset":
		o.unknown(&ps, "", append([]string{"Kind", "Name"}, netsetFields...), nil)
		d.Netset = netsetBody(&ps, o)
		d.Netset.Name = name
	case "Policy":
		o.unknown(&ps, "", append([]string{"Kind", "Name"}, policyFields...), func(k string) string {
			if k == "Nets" {
				return `(a netset needs "Kind": "Netset")`
			}
			return ""
		})
		d.Policy = policyBody(&ps, o)
		d.Policy.Name = name
	}
	if len(ps) > 0 {
		return Document{}, &InvalidError{What: what, Problems: ps}
	}
	return d, nil
}
