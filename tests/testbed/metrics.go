package testbed

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Metrics is one scrape of tulled's /metrics, by metric family name.
type Metrics map[string]*dto.MetricFamily

// Sample is one series of a family.
type Sample struct {
	Labels map[string]string
	Value  float64 // counter, gauge or untyped value; a histogram's sample count
}

// Scrape fetches and parses tulled's /metrics (Prometheus text format).
func (t *Tulled) Scrape(ctx context.Context) (Metrics, error) {
	code, body, err := t.Get(ctx, "/metrics")
	if err != nil {
		return nil, fmt.Errorf("host %s: scrape: %w", t.Host.Name, err)
	}
	if code != 200 {
		return nil, fmt.Errorf("host %s: scrape %s: status %d: %s", t.Host.Name, t.URL("/metrics"), code, firstLine(body))
	}
	m, err := ParseMetrics(body)
	if err != nil {
		return nil, fmt.Errorf("host %s: scrape %s: %w", t.Host.Name, t.URL("/metrics"), err)
	}
	return m, nil
}

// Scrape scrapes the host's current tulled.
func (h *Host) Scrape(ctx context.Context) (Metrics, error) {
	t := h.Tulled()
	if t == nil {
		return nil, fmt.Errorf("host %s: no tulled started", h.Name)
	}
	return t.Scrape(ctx)
}

// ParseMetrics parses the Prometheus text exposition format.
func ParseMetrics(text []byte) (Metrics, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	return Metrics(fams), nil
}

// Samples returns the series of family name whose labels include the given
// pairs ("reason", "spoofed_source", ...), sorted by their labels.
func (m Metrics) Samples(name string, labelPairs ...string) []Sample {
	fam, ok := m[name]
	if !ok {
		return nil
	}
	var out []Sample
	for _, met := range fam.GetMetric() {
		labels := map[string]string{}
		for _, lp := range met.GetLabel() {
			labels[lp.GetName()] = lp.GetValue()
		}
		match := true
		for i := 0; i+1 < len(labelPairs); i += 2 {
			if labels[labelPairs[i]] != labelPairs[i+1] {
				match = false
				break
			}
		}
		if !match {
			continue
		}
		s := Sample{Labels: labels}
		switch {
		case met.Counter != nil:
			s.Value = met.GetCounter().GetValue()
		case met.Gauge != nil:
			s.Value = met.GetGauge().GetValue()
		case met.Untyped != nil:
			s.Value = met.GetUntyped().GetValue()
		case met.Histogram != nil:
			s.Value = float64(met.GetHistogram().GetSampleCount())
		case met.Summary != nil:
			s.Value = float64(met.GetSummary().GetSampleCount())
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return labelString(out[i].Labels) < labelString(out[j].Labels) })
	return out
}

// Value returns the sum of the series of family name whose labels include
// the given pairs; 0 if there is none.
func (m Metrics) Value(name string, labelPairs ...string) float64 {
	var sum float64
	for _, s := range m.Samples(name, labelPairs...) {
		sum += s.Value
	}
	return sum
}

// Has reports whether family name is exposed.
func (m Metrics) Has(name string) bool {
	_, ok := m[name]
	return ok
}

func labelString(l map[string]string) string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%q,", k, l[k])
	}
	return b.String()
}

func firstLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// MetricsSummary scrapes every running tulled of the bed and lists its
// non-zero tulle_* counters and gauges (histograms left out), one series a
// line: what a failed test wants to see beside the logs.
func (b *Bed) MetricsSummary(ctx context.Context) string {
	b.mu.Lock()
	hosts := append([]*Host(nil), b.Hosts...)
	b.mu.Unlock()
	var sb strings.Builder
	for _, h := range hosts {
		t := h.Tulled()
		if t == nil || t.p.exited() {
			continue
		}
		m, err := t.Scrape(ctx)
		if err != nil {
			fmt.Fprintf(&sb, "%s: %v\n", h.Name, err)
			continue
		}
		names := make([]string, 0, len(m))
		for name, fam := range m {
			if strings.HasPrefix(name, "tulle_") && fam.GetType() != dto.MetricType_HISTOGRAM {
				names = append(names, name)
			}
		}
		sort.Strings(names)
		for _, name := range names {
			for _, s := range m.Samples(name) {
				if s.Value == 0 {
					continue
				}
				series := name
				if len(s.Labels) > 0 {
					series += "{" + strings.TrimSuffix(labelString(s.Labels), ",") + "}"
				}
				fmt.Fprintf(&sb, "%s: %s %v\n", h.Name, series, s.Value)
			}
		}
	}
	return sb.String()
}
