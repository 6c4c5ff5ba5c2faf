package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/tulle-net/tulle/daemon/config"
	"github.com/tulle-net/tulle/policy"
	etcdreg "github.com/tulle-net/tulle/subnet/etcd"
)

// policyMain is `tulled policy VERB`: check and write policy documents,
// list and delete them, print the ruleset a host installs.
func policyMain(args, env []string, stdin io.Reader, stdout, stderr io.Writer) int {
	p, action, err := config.ParsePolicy(args, env)
	usage := func(w io.Writer) { config.PolicyUsage(w, p.Verb) }
	if code, done := commandLineDone("tulled policy", err, action, usage, stdout, stderr); done {
		return code
	}
	if p.Verb == "check" {
		docs, err := readPolicyFile(p.File, stdin)
		if err != nil {
			printInvalid(stderr, "check", p.File, err)
			return ExitFailure
		}
		np, nn := countDocs(docs)
		fmt.Fprintf(stdout, "%s: %d documents valid (%d policies, %d netsets)\n", fileName(p.File), len(docs), np, nn)
		return ExitOK
	}
	var docs []policy.Document
	if p.Verb == "apply" { // refuse before touching etcd
		if docs, err = readPolicyFile(p.File, stdin); err != nil {
			printInvalid(stderr, "apply", p.File, err)
			return ExitFailure
		}
	}
	reg, err := newRegistry(p.Etcd, p.Timeout/2, slog.New(slog.DiscardHandler))
	if err != nil {
		fmt.Fprintf(stderr, "tulled policy %s: etcd: %v\n", p.Verb, err)
		return ExitUsage
	}
	defer reg.Close()
	ctx, cancel := context.WithTimeout(context.Background(), p.Timeout)
	defer cancel()
	switch p.Verb {
	case "apply":
		err = policyApply(ctx, reg, docs, stdout)
	case "list":
		err = policyList(ctx, reg, p.JSON, stdout)
	case "delete":
		err = policyDelete(ctx, reg, p.Netsets, p.Names, stdout)
	case "ruleset":
		err = policyRuleset(ctx, reg, p.Host, stdout)
	}
	if err != nil {
		var ue *etcdreg.UnreachableError
		if errors.As(err, &ue) {
			err = fmt.Errorf("etcd at %s did not answer in time: %s", ue.Endpoints, ue.Cause)
		}
		fmt.Fprintf(stderr, "tulled policy %s: %v\n", p.Verb, err)
		return ExitFailure
	}
	return ExitOK
}

func fileName(f string) string {
	if f == "-" {
		return "standard input"
	}
	return f
}

func readPolicyFile(file string, stdin io.Reader) ([]policy.Document, error) {
	var data []byte
	var err error
	if file == "-" {
		data, err = io.ReadAll(stdin)
	} else {
		data, err = os.ReadFile(file)
	}
	if err != nil {
		return nil, err
	}
	return policy.ParseDocuments(data)
}

// printInvalid prints every problem on a line of its own.
func printInvalid(w io.Writer, verb, file string, err error) {
	what := "refused, nothing written"
	if verb == "check" {
		what = "invalid"
	}
	fmt.Fprintf(w, "tulled policy %s: %s %s:\n", verb, fileName(file), what)
	var walk func(error)
	walk = func(e error) {
		if ie, ok := e.(*policy.InvalidError); ok {
			for _, p := range ie.Problems {
				fmt.Fprintf(w, "  %s: %s\n", ie.What, p.Error())
			}
			return
		}
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		fmt.Fprintf(w, "  %v\n", e)
	}
	walk(err)
}

// kindSuffix is where documents of kind ("policy", "netset") live below
// the prefix.
func kindSuffix(kind string) string {
	if kind == "policy" {
		return policiesSuffix
	}
	return netsetsSuffix
}

func countDocs(docs []policy.Document) (policies, netsets int) {
	for _, d := range docs {
		if d.Policy != nil {
			policies++
		} else {
			netsets++
		}
	}
	return
}

// policyApply writes netsets first, so that a policy naming a new netset
// never meets it missing.
func policyApply(ctx context.Context, reg *etcdreg.Registry, docs []policy.Document, w io.Writer) error {
	ordered := slices.Clone(docs)
	slices.SortStableFunc(ordered, func(a, b policy.Document) int {
		return strings.Compare(a.Kind(), b.Kind()) * -1 // "policy" after "netset"
	})
	for _, d := range ordered {
		var v []byte
		var err error
		if d.Policy != nil {
			v, err = json.Marshal(d.Policy)
		} else {
			v, err = json.Marshal(d.Netset)
		}
		if err != nil {
			return fmt.Errorf("%s %s: %w", d.Kind(), d.Name(), err)
		}
		rev, err := reg.PutKey(ctx, kindSuffix(d.Kind())+d.Name(), v)
		if err != nil {
			return fmt.Errorf("%s %s: %w", d.Kind(), d.Name(), err)
		}
		fmt.Fprintf(w, "%s %s written (revision %d)\n", d.Kind(), d.Name(), rev)
	}
	return nil
}

// listedDoc is one document as `tulled policy list --json` shows it.
type listedDoc struct {
	Name     string          `json:"name"`
	Document json.RawMessage `json:"document,omitempty"` // as stored, when it is JSON
	Value    string          `json:"value,omitempty"`    // as stored, when it is not
	Error    string          `json:"error,omitempty"`    // why tulled refuses it
	policy   *policy.Policy
	netset   *policy.Netset
}

// readAllDocs reads the policies and the netsets in etcd.
func readAllDocs(ctx context.Context, reg *etcdreg.Registry) (pols, sets []listedDoc, err error) {
	if pols, err = readDocs(ctx, reg, policiesSuffix); err != nil {
		return nil, nil, err
	}
	if sets, err = readDocs(ctx, reg, netsetsSuffix); err != nil {
		return nil, nil, err
	}
	return pols, sets, nil
}

// readDocs reads the documents below suffix, each parsed.
func readDocs(ctx context.Context, reg *etcdreg.Registry, suffix string) ([]listedDoc, error) {
	kvs, _, err := reg.ListPrefix(ctx, suffix)
	if err != nil {
		return nil, err
	}
	out := []listedDoc{}
	for _, kv := range kvs {
		d := listedDoc{Name: kv.Key}
		if json.Valid(kv.Value) {
			d.Document = kv.Value
		} else {
			d.Value = string(kv.Value)
		}
		if suffix == policiesSuffix {
			d.policy, err = policy.ParsePolicy(kv.Key, kv.Value)
		} else {
			d.netset, err = policy.ParseNetset(kv.Key, kv.Value)
		}
		if err != nil {
			var ie *policy.InvalidError
			if errors.As(err, &ie) {
				parts := make([]string, len(ie.Problems))
				for i, p := range ie.Problems {
					parts[i] = p.Error()
				}
				d.Error = strings.Join(parts, "; ")
			} else {
				d.Error = err.Error()
			}
		}
		out = append(out, d)
	}
	return out, nil
}

func policyList(ctx context.Context, reg *etcdreg.Registry, asJSON bool, w io.Writer) error {
	pols, sets, err := readAllDocs(ctx, reg)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Policies []listedDoc `json:"policies"`
			Netsets  []listedDoc `json:"netsets"`
		}{pols, sets})
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "POLICY\tORDER\tSELECTOR\tINGRESS\tEGRESS\tSTATUS")
	for _, d := range pols {
		if d.policy == nil {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\tinvalid: %s\n", d.Name, d.Error)
			continue
		}
		p := d.policy
		order := "-"
		if p.Order != nil {
			order = fmt.Sprint(*p.Order)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\tok\n", p.Name, order, short(matchList(p.Selector)), ruleCount(p.Ingress), ruleCount(p.Egress))
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "NETSET\tNETS\t\t\t\tSTATUS")
	for _, d := range sets {
		if d.netset == nil {
			fmt.Fprintf(tw, "%s\t-\t\t\t\tinvalid: %s\n", d.Name, d.Error)
			continue
		}
		nets := make([]string, len(d.netset.Nets))
		for i, n := range d.netset.Nets {
			nets[i] = n.String()
		}
		fmt.Fprintf(tw, "%s\t%s\t\t\t\tok\n", d.Name, short(nets))
	}
	return tw.Flush()
}

func matchList(ms []policy.Match) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.String()
	}
	return out
}

// short shows the first three entries of a list and how many more.
func short(l []string) string {
	if len(l) <= 3 {
		return strings.Join(l, ",")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(l[:3], ","), len(l)-3)
}

func ruleCount(rs []policy.Rule) string {
	switch {
	case rs == nil:
		return "-"
	case len(rs) == 0:
		return "deny all"
	case len(rs) == 1:
		return "1 rule"
	}
	return fmt.Sprintf("%d rules", len(rs))
}

func policyDelete(ctx context.Context, reg *etcdreg.Registry, netsets bool, names []string, w io.Writer) error {
	kind := "policy"
	if netsets {
		kind = "netset"
	}
	var missing []string
	for _, n := range names {
		if err := policy.CheckName(n); err != nil {
			return fmt.Errorf("%s %w", kind, err)
		}
		existed, err := reg.DeleteKey(ctx, kindSuffix(kind)+n)
		if err != nil {
			return err
		}
		if !existed {
			missing = append(missing, n)
			continue
		}
		fmt.Fprintf(w, "%s %s deleted\n", kind, n)
	}
	if len(missing) > 0 {
		return fmt.Errorf("no such %s: %s", kind, strings.Join(missing, ", "))
	}
	return nil
}

// policyRuleset prints the ruleset the host with public IP host compiles
// from what etcd holds now. Refused documents are left out and named (the
// host itself would keep their previous version).
func policyRuleset(ctx context.Context, reg *etcdreg.Registry, host netip.Addr, w io.Writer) error {
	leases, err := reg.Leases(ctx)
	if err != nil {
		return err
	}
	in := policy.Input{Leases: leases, Netsets: map[string]*policy.Netset{}}
	for _, l := range leases {
		if l.Attrs.PublicIP != host && l.Attrs.PublicIPv6 != host {
			continue
		}
		for _, s := range []netip.Prefix{l.Subnet, l.IPv6Subnet} {
			if s.IsValid() {
				in.Local = append(in.Local, s)
			}
		}
	}
	if len(in.Local) == 0 {
		return fmt.Errorf("host %s holds no lease", host)
	}
	pols, sets, err := readAllDocs(ctx, reg)
	if err != nil {
		return err
	}
	for _, d := range pols {
		if d.policy == nil {
			fmt.Fprintf(w, "# refused: policy %s: %s\n", d.Name, d.Error)
			continue
		}
		in.Policies = append(in.Policies, d.policy)
	}
	for _, d := range sets {
		if d.netset == nil {
			fmt.Fprintf(w, "# refused: netset %s: %s\n", d.Name, d.Error)
			continue
		}
		in.Netsets[d.Name] = d.netset
	}
	_, err = policy.Compile(in).WriteTo(w)
	return err
}
