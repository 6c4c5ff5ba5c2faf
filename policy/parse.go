package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
)

// FieldError is one problem of a document, naming the field:
// `Ingress[0].Ports[1] "90000": want a port 1..65535 or a range FIRST-LAST`.
type FieldError struct {
	Field string // path in the document; "" for the document as a whole
	Value string // the offending value as written (JSON), if any
	Msg   string
}

func (e FieldError) Error() string {
	var b strings.Builder
	b.WriteString(e.Field)
	if e.Value != "" {
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(e.Value)
	}
	if b.Len() > 0 {
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// InvalidError says why a document was refused: every problem found, each
// naming its field.
type InvalidError struct {
	What     string // "policy web", "netset db", "document 2"
	Problems []FieldError
}

func (e *InvalidError) Error() string {
	parts := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		parts[i] = p.Error()
	}
	return e.What + ": " + strings.Join(parts, "; ")
}

// ErrInvalid is wrapped by every *InvalidError (errors.Is).
var ErrInvalid = errors.New("invalid policy document")

func (e *InvalidError) Is(target error) bool { return target == ErrInvalid }

// problems collects FieldErrors.
type problems []FieldError

func (p *problems) add(field string, value json.RawMessage, format string, args ...any) {
	v := ""
	if value != nil {
		v = string(value)
		if len(v) > 80 {
			v = v[:77] + "..."
		}
	}
	*p = append(*p, FieldError{Field: field, Value: v, Msg: fmt.Sprintf(format, args...)})
}

// object is a JSON object with its keys in document order.
type object struct {
	keys []string
	vals map[string]json.RawMessage
}

// readObject reads a JSON object, refusing duplicate keys (Go's
// encoding/json would silently keep the last).
func readObject(data []byte) (*object, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, jsonError(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("want a JSON object, got %s", jsonKind(data))
	}
	o := &object{vals: map[string]json.RawMessage{}}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, jsonError(err)
		}
		k := tok.(string) // object keys are strings
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, jsonError(err)
		}
		if _, dup := o.vals[k]; dup {
			return nil, fmt.Errorf("field %q given twice", k)
		}
		o.keys = append(o.keys, k)
		o.vals[k] = v
	}
	if _, err := dec.Token(); err != nil {
		return nil, jsonError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data after the JSON object")
	}
	return o, nil
}

func jsonError(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errors.New("not valid JSON: unexpected end")
	}
	return fmt.Errorf("not valid JSON: %w", err)
}

// unknown reports each key of o not in allowed, with a hint when only the
// case differs.
func (o *object) unknown(ps *problems, path string, allowed []string, hint func(k string) string) {
	for _, k := range o.keys {
		known := false
		for _, a := range allowed {
			if k == a {
				known = true
				break
			}
		}
		if known {
			continue
		}
		msg := "unknown field"
		for _, a := range allowed {
			if strings.EqualFold(k, a) {
				msg = fmt.Sprintf("unknown field (field names are case-sensitive: %q)", a)
			}
		}
		if hint != nil {
			if h := hint(k); h != "" {
				msg += " " + h
			}
		}
		ps.add(join(path, k), nil, "%s", msg)
	}
}

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

func jsonKind(v json.RawMessage) string {
	v = bytes.TrimSpace(v)
	if len(v) == 0 {
		return "nothing"
	}
	switch v[0] {
	case '{':
		return "an object"
	case '[':
		return "a list"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

func asString(ps *problems, field string, v json.RawMessage) (string, bool) {
	var s string
	if err := json.Unmarshal(v, &s); err != nil || jsonKind(v) != "a string" {
		ps.add(field, v, "want a string, got %s", jsonKind(v))
		return "", false
	}
	return s, true
}

func asList(ps *problems, field string, v json.RawMessage) ([]json.RawMessage, bool) {
	var l []json.RawMessage
	if jsonKind(v) != "a list" || json.Unmarshal(v, &l) != nil {
		ps.add(field, v, "want a list, got %s", jsonKind(v))
		return nil, false
	}
	if l == nil {
		l = []json.RawMessage{}
	}
	return l, true
}

func matches(ps *problems, field string, v json.RawMessage) []Match {
	l, ok := asList(ps, field, v)
	if !ok {
		return nil
	}
	return each(ps, field, l, asString, ParseMatch)
}

// each reads the elements of the list l at field: each one's text (by
// text: what JSON kinds it takes) parsed by parse. An element refused is
// named by its index and left out; the result is never nil.
func each[T any](ps *problems, field string, l []json.RawMessage, text func(*problems, string, json.RawMessage) (string, bool), parse func(string) (T, error)) []T {
	out := make([]T, 0, len(l))
	for i, e := range l {
		f := fmt.Sprintf("%s[%d]", field, i)
		s, ok := text(ps, f, e)
		if !ok {
			continue
		}
		v, err := parse(s)
		if err != nil {
			ps.add(f, e, "%v", err)
			continue
		}
		out = append(out, v)
	}
	return out
}

// stringOrNumber is v's text: a string's, or a number as written (want
// says what the field takes, for the problem when v is neither).
func stringOrNumber(ps *problems, field string, v json.RawMessage, want string) (string, bool) {
	switch jsonKind(v) {
	case "a string":
		var s string
		_ = json.Unmarshal(v, &s)
		return s, true
	case "a number":
		return string(v), true
	}
	ps.add(field, v, "want %s, got %s", want, jsonKind(v))
	return "", false
}

var policyFields = []string{"Order", "Selector", "Ingress", "Egress"}

// ParsePolicy reads a policy as stored at <prefix>/policies/<name>.
// Every problem is reported, each naming its field; the error wraps
// ErrInvalid.
func ParsePolicy(name string, data []byte) (*Policy, error) {
	p, err := parseStored("policy", name, data, policyFields, netsetHint, policyBody)
	if err != nil {
		return nil, err
	}
	p.Name = name
	return p, nil
}

// parseStored reads an object of kind stored under name: the name, the
// JSON object, its fields (unknown ones named, with hint's advice) and,
// through body, their values.
func parseStored[T any](kind, name string, data []byte, fields []string, hint func(string) string, body func(*problems, *object) *T) (*T, error) {
	var ps problems
	if err := CheckName(name); err != nil {
		ps.add("", nil, "%v", err)
	}
	o, err := readObject(data)
	if err != nil {
		ps.add("", nil, "%v", err)
		return nil, &InvalidError{What: kind + " " + name, Problems: ps}
	}
	o.unknown(&ps, "", fields, hint)
	v := body(&ps, o)
	if len(ps) > 0 {
		return nil, &InvalidError{What: kind + " " + name, Problems: ps}
	}
	return v, nil
}

func netsetHint(k string) string {
	if k == "Nets" {
		return "(Nets belongs to a netset)"
	}
	return ""
}

// policyBody reads the policy fields of o; unknown keys are the caller's.
func policyBody(ps *problems, o *object) *Policy {
	p := &Policy{}
	if v, ok := o.vals["Order"]; ok {
		f, err := strconv.ParseFloat(string(v), 64)
		if jsonKind(v) != "a number" || err != nil {
			ps.add("Order", v, "want a number, got %s", jsonKind(v))
		} else {
			p.Order = &f
		}
	}
	if v, ok := o.vals["Selector"]; ok {
		p.Selector = matches(ps, "Selector", v)
		if p.Selector != nil && len(p.Selector) == 0 && jsonKind(v) == "a list" && string(bytes.TrimSpace(v)) == "[]" {
			ps.add("Selector", v, "empty: a policy must select some workloads (0.0.0.0/0 and ::/0 select all)")
		}
	} else {
		ps.add("Selector", nil, "missing: a policy must select some workloads (0.0.0.0/0 and ::/0 select all)")
	}
	if v, ok := o.vals["Ingress"]; ok {
		p.Ingress = rules(ps, "Ingress", v, true)
	}
	if v, ok := o.vals["Egress"]; ok {
		p.Egress = rules(ps, "Egress", v, false)
	}
	_, in := o.vals["Ingress"]
	_, eg := o.vals["Egress"]
	if !in && !eg {
		ps.add("", nil, "neither Ingress nor Egress: the policy would do nothing (an empty list denies all of that direction)")
	}
	return p
}

var (
	ingressFields = []string{"Action", "Protocol", "Source", "Ports"}
	egressFields  = []string{"Action", "Protocol", "Destination", "Ports"}
)

func rules(ps *problems, field string, v json.RawMessage, ingress bool) []Rule {
	l, ok := asList(ps, field, v)
	if !ok {
		return []Rule{}
	}
	out := make([]Rule, 0, len(l))
	for i, rv := range l {
		path := fmt.Sprintf("%s[%d]", field, i)
		o, err := readObject(rv)
		if err != nil {
			ps.add(path, nil, "%v", err)
			continue
		}
		allowed, peerField, other := ingressFields, "Source", "Destination"
		if !ingress {
			allowed, peerField, other = egressFields, "Destination", "Source"
		}
		o.unknown(ps, path, allowed, func(k string) string {
			if k == other {
				return fmt.Sprintf("(a rule of %s names %s)", field, peerField)
			}
			return ""
		})
		r := Rule{}
		if a, ok := o.vals["Action"]; !ok {
			ps.add(path+".Action", nil, "missing: want Allow or Deny")
		} else if s, ok := asString(ps, path+".Action", a); ok {
			switch s {
			case "Allow":
				r.Action = Allow
			case "Deny":
				r.Action = Deny
			default:
				ps.add(path+".Action", a, "want Allow or Deny")
			}
		}
		if pv, ok := o.vals["Protocol"]; ok {
			if s, ok := stringOrNumber(ps, path+".Protocol", pv, "a protocol name or number"); ok {
				p, err := parseProtocol(s)
				if err != nil {
					ps.add(path+".Protocol", pv, "%v", err)
				}
				r.Protocol = p
			}
		}
		if pv, ok := o.vals[peerField]; ok {
			r.Peers = matches(ps, path+"."+peerField, pv)
			if r.Peers == nil {
				r.Peers = []Match{}
			}
		}
		if pv, ok := o.vals["Ports"]; ok {
			r.Ports = ports(ps, path+".Ports", pv)
			if r.Protocol == 0 {
				ps.add(path+".Ports", nil, "ports need a Protocol (TCP, UDP or SCTP)")
			} else if !r.Protocol.HasPorts() {
				ps.add(path+".Ports", nil, "protocol %s has no ports (only TCP, UDP and SCTP do)", r.Protocol)
			}
		}
		out = append(out, r)
	}
	return out
}

func ports(ps *problems, field string, v json.RawMessage) []PortRange {
	l, ok := asList(ps, field, v)
	if !ok {
		return nil
	}
	if len(l) == 0 {
		ps.add(field, v, "empty: leave Ports out to allow every port")
	}
	portText := func(ps *problems, f string, e json.RawMessage) (string, bool) {
		return stringOrNumber(ps, f, e, `a port or a range "FIRST-LAST"`)
	}
	return each(ps, field, l, portText, parsePort)
}

var netsetFields = []string{"Nets"}

// ParseNetset reads a netset as stored at <prefix>/netsets/<name>:
// {"Nets": ["198.18.4.0/24", "2001:db8:4::/64", "198.18.9.7"]}.
func ParseNetset(name string, data []byte) (*Netset, error) {
	n, err := parseStored("netset", name, data, netsetFields, nil, netsetBody)
	if err != nil {
		return nil, err
	}
	n.Name = name
	return n, nil
}

func netsetBody(ps *problems, o *object) *Netset {
	n := &Netset{Nets: []netip.Prefix{}}
	v, ok := o.vals["Nets"]
	if !ok {
		ps.add("Nets", nil, "missing: want a list of CIDRs or addresses")
		return n
	}
	l, ok := asList(ps, "Nets", v)
	if !ok {
		return n
	}
	n.Nets = each(ps, "Nets", l, asString, parsePrefix)
	return n
}
