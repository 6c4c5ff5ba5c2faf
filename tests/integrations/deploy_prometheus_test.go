package integrations

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// ruleFile is the part of a Prometheus rule file the tests read.
type ruleFile struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert       string            `json:"alert"`
			Record      string            `json:"record"`
			Expr        string            `json:"expr"`
			For         string            `json:"for"`
			Labels      map[string]string `json:"labels"`
			Annotations map[string]string `json:"annotations"`
		} `json:"rules"`
	} `json:"groups"`
}

func readRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := os.ReadFile(deployFile(t, "prometheus/tulle-alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(b, &rf); err != nil {
		t.Fatalf("tulle-alerts.yml: %v", err)
	}
	return rf
}

func TestAlertRulesPassPromtoolCheckAndTheirUnitTests(t *testing.T) {
	promtool := requireTool(t, "promtool")
	dir := deployFile(t, "prometheus")
	out := run(t, promtool, "check", "rules", filepath.Join(dir, "tulle-alerts.yml"))
	if !strings.Contains(out, "SUCCESS") {
		t.Errorf("promtool check rules:\n%s", out)
	}
	out = run(t, promtool, "check", "config", filepath.Join(dir, "prometheus.yml"))
	if !strings.Contains(out, "prometheus.yml is valid prometheus config") {
		t.Errorf("promtool check config:\n%s", out)
	}
	// The unit tests state, for each alert, when it fires and when not.
	out = run(t, promtool, "test", "rules", filepath.Join(dir, "tulle-alerts.test.yml"))
	if !strings.Contains(out, "SUCCESS") {
		t.Errorf("promtool test rules:\n%s", out)
	}
}

func TestEveryAlertIsUnitTestedAndDocumented(t *testing.T) {
	rf := readRules(t)
	tests, err := os.ReadFile(deployFile(t, "prometheus/tulle-alerts.test.yml"))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"TulleDown", "TulleNotReady", "TulleEtcdUnreachable", "TulleLeaseRenewalFailing",
		"TulleLeaseExpiringSoon", "TulleDroppingPackets", "TulleRejectingForeignTraffic",
		"TullePeerNotAnswering", "TullePeerSilent", "TulleMalformedLeases"}
	var got []string
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			got = append(got, r.Alert)
			if !strings.Contains(string(tests), "alertname: "+r.Alert+",") && !strings.Contains(string(tests), "alertname: "+r.Alert+"\n") {
				t.Errorf("alert %s has no test in tulle-alerts.test.yml", r.Alert)
			}
			if sev := r.Labels["severity"]; !slices.Contains([]string{"critical", "warning", "info"}, sev) {
				t.Errorf("alert %s: severity %q, want critical, warning or info", r.Alert, sev)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s: needs a summary and a description", r.Alert)
			}
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("alerts = %v, want %v", got, want)
	}
}

func TestAlertRulesUseOnlyMetricsTulledExports(t *testing.T) {
	for _, name := range ruleMetricNames(t) {
		if !knownMetric(name) {
			t.Errorf("tulle-alerts.yml uses %s, which tulled does not export", name)
		}
	}
}

func ruleMetricNames(t *testing.T) []string {
	t.Helper()
	var names []string
	for _, g := range readRules(t).Groups {
		for _, r := range g.Rules {
			for _, n := range metricNames(r.Expr) {
				if !slices.Contains(names, n) {
					names = append(names, n)
				}
			}
		}
	}
	if len(names) < 8 {
		t.Fatalf("found only %v in the rules: is the expression parser broken?", names)
	}
	return names
}

// dashboard is the part of a Grafana dashboard the tests read.
type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string          `json:"name"`
			Type  string          `json:"type"`
			Query json.RawMessage `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		UID string `json:"uid"`
	} `json:"datasource"`
	GridPos *struct{ H, W, X, Y int } `json:"gridPos"`
	Targets []struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's panels
}

func readDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile(deployFile(t, "grafana/tulle.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("grafana/tulle.json: %v", err)
	}
	return d
}

func allPanels(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, allPanels(p.Panels)...)
	}
	return out
}

// dashboardExprs returns every PromQL query of the dashboard, with the
// Grafana variables replaced so Prometheus can parse it.
func dashboardExprs(t *testing.T, d dashboard) []string {
	t.Helper()
	var out []string
	for _, p := range allPanels(d.Panels) {
		for _, tg := range p.Targets {
			out = append(out, tg.Expr)
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q struct{ Query string }
		if err := json.Unmarshal(v.Query, &q); err != nil {
			t.Fatalf("variable %s: query: %v", v.Name, err)
		}
		// label_values(<selector>, <label>) is Grafana's; check the selector.
		sel, ok := strings.CutPrefix(q.Query, "label_values(")
		if !ok {
			t.Fatalf("variable %s: query %q: want label_values(...)", v.Name, q.Query)
		}
		out = append(out, sel[:strings.LastIndex(sel, ",")])
	}
	return out
}

func TestDashboardIsAWellFormedGrafanaDashboard(t *testing.T) {
	d := readDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Errorf("uid %q, title %q: both are needed", d.UID, d.Title)
	}
	ids := map[int]string{}
	var titles []string
	for _, p := range allPanels(d.Panels) {
		if prev, dup := ids[p.ID]; dup {
			t.Errorf("panel id %d used by %q and %q", p.ID, prev, p.Title)
		}
		ids[p.ID] = p.Title
		if p.GridPos == nil || p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q: gridPos %+v", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		titles = append(titles, p.Title)
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q: datasource must be the ${datasource} variable", p.Title)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
	}
	// What the issue asks the dashboard to show.
	for _, want := range []string{"Sent to peer", "Received from peer", "Drops by reason", "Mean packets per batch", "Lease time left", "etcd connected"} {
		if !slices.Contains(titles, want) {
			t.Errorf("no panel %q (panels: %q)", want, titles)
		}
	}
}

func TestDashboardQueriesUseOnlyMetricsTulledExports(t *testing.T) {
	d := readDashboard(t)
	for _, e := range dashboardExprs(t, d) {
		names := metricNames(e)
		if len(names) == 0 {
			t.Errorf("query %q selects no metric", e)
		}
		for _, n := range names {
			if !knownMetric(n) {
				t.Errorf("query %q uses %s, which tulled does not export", e, n)
			}
		}
	}
}

// TestDashboardQueriesParseAsPromQL hands every query, as a recording rule,
// to promtool: Prometheus' own parser.
func TestDashboardQueriesParseAsPromQL(t *testing.T) {
	promtool := requireTool(t, "promtool")
	d := readDashboard(t)
	r := strings.NewReplacer(`$__rate_interval`, `5m`, `"$job"`, `".*"`, `"$instance"`, `".*"`)
	var sb strings.Builder
	sb.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	for i, e := range dashboardExprs(t, d) {
		q, err := json.Marshal(r.Replace(e)) // a JSON string is a YAML string
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&sb, "      - record: tulle_dashboard_query_%d\n        expr: %s\n", i, q)
	}
	path := filepath.Join(t.TempDir(), "dashboard-queries.yml")
	if err := os.WriteFile(path, []byte(sb.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	out := run(t, promtool, "check", "rules", path)
	if !strings.Contains(out, "SUCCESS") {
		t.Errorf("promtool check rules on the dashboard's queries:\n%s", out)
	}
}
