package main

import (
	"fmt"
	"os"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// Chart geometry: one row of plots per path.
const (
	chartWidth  = 20 * vg.Inch
	rowHeight   = 4.5 * vg.Inch
	chartDPI    = 100
	chartTiles  = 3 // throughput, RTT, CPU per GB
	chartMargin = vg.Inch / 8
)

// writeChart draws the summary as a PNG, a row per path (-path) of three
// plots, bars the medians and whiskers min-max over the repetitions: TCP throughput per mode (1 stream and N streams side by side),
// ping RTT per mode, and CPU seconds per GB (everything on the path, and
// the tulleds alone); the labels give the median and, for the other
// modes, the ratio of (or difference to) kernel VXLAN on the same path.
func writeChart(path string, cfg Config, rep Report) error {
	var rows [][]*plot.Plot
	for _, p := range cfg.Paths {
		var sum []ModeSummary
		for _, m := range rep.Summary {
			if m.Path == p {
				sum = append(sum, m)
			}
		}
		if len(sum) == 0 {
			continue
		}
		title := p // "container" (to container) or "host" (namespace to host namespace)
		thr, err := throughputPlot(cfg, sum, title)
		if err != nil {
			return fmt.Errorf("chart: %w", err)
		}
		rtt, err := rttPlot(sum, title)
		if err != nil {
			return fmt.Errorf("chart: %w", err)
		}
		cpu, err := cpuPlot(cfg, sum, title)
		if err != nil {
			return fmt.Errorf("chart: %w", err)
		}
		rows = append(rows, []*plot.Plot{thr, rtt, cpu})
	}
	if len(rows) == 0 {
		return nil
	}
	img := vgimg.NewWith(vgimg.UseWH(chartWidth, rowHeight*vg.Length(len(rows))), vgimg.UseDPI(chartDPI))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: len(rows), Cols: chartTiles, PadX: vg.Inch / 3, PadY: vg.Inch / 4,
		PadTop: chartMargin, PadBottom: chartMargin, PadLeft: chartMargin, PadRight: chartMargin}
	canvases := plot.Align(rows, tiles, dc)
	for i, row := range rows {
		for j, p := range row {
			p.Draw(canvases[i][j])
		}
	}

	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("chart %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("chart %s: %w", path, err)
	}
	return nil
}

// barWidth is the width of one bar when n groups of k bars share a tile.
func barWidth(n, k int) vg.Length {
	unit := 0.8 * float64(chartWidth) / chartTiles / float64(max(n, 1))
	return vg.Length(0.75 * unit / float64(k))
}

// tickLabel breaks a long mode name at its last hyphen, so that neighbouring
// names do not run into each other.
func tickLabel(mode string) string {
	if i := strings.LastIndexByte(mode, '-'); len(mode) > 12 && i > 0 {
		return mode[:i] + "\n" + mode[i+1:]
	}
	return mode
}

// modeTicks labels the x axis with the mode names at 0..n-1.
func modeTicks(p *plot.Plot, sum []ModeSummary) {
	ticks := make([]plot.Tick, len(sum))
	for i, m := range sum {
		ticks[i] = plot.Tick{Value: float64(i), Label: tickLabel(m.Mode)}
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	p.X.Min, p.X.Max = -0.6, float64(len(sum))-0.4
	p.Y.Min = 0
}

// barSeries adds one bar per mode at x = i + shift, with min-max whiskers
// and a label above each bar; missing values draw nothing.
func barSeries(p *plot.Plot, sum []ModeSummary, shift float64, width vg.Length, color int, name string,
	stat func(ModeSummary) Stat, label func(ModeSummary) string) error {
	vals := make(plotter.Values, len(sum))
	var xys plotter.XYs
	var errs plotter.YErrors
	var lxys plotter.XYs
	var labels []string
	for i, m := range sum {
		s := stat(m)
		if !s.Valid() {
			continue
		}
		vals[i] = s.Median
		x := float64(i) + shift
		xys = append(xys, plotter.XY{X: x, Y: s.Median})
		errs = append(errs, struct{ Low, High float64 }{s.Median - s.Min, s.Max - s.Median})
		lxys = append(lxys, plotter.XY{X: x, Y: s.Max})
		labels = append(labels, label(m))
	}
	bars, err := plotter.NewBarChart(vals, width)
	if err != nil {
		return err
	}
	bars.XMin = shift
	bars.Color = plotutil.Color(color)
	bars.LineStyle.Width = 0
	p.Add(bars)
	p.Legend.Add(name, bars)
	if len(xys) == 0 {
		return nil
	}
	p.Add(&plotter.YErrorBars{XYs: xys, YErrors: errs, LineStyle: plotter.DefaultLineStyle, CapWidth: width / 3})
	lab, err := plotter.NewLabels(plotter.XYLabels{XYs: lxys, Labels: labels})
	if err != nil {
		return err
	}
	for i := range lab.TextStyle {
		lab.TextStyle[i].Font.Size = vg.Points(8)
		lab.TextStyle[i].XAlign = draw.XCenter
		lab.TextStyle[i].YAlign = draw.YBottom
	}
	lab.Offset = vg.Point{Y: vg.Points(3)}
	p.Add(lab)
	return nil
}

func throughputPlot(cfg Config, sum []ModeSummary, path string) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = path + ": TCP throughput (Gbit/s; ratio to kernel VXLAN)"
	p.Y.Label.Text = "Gbit/s"
	modeTicks(p, sum)
	w := barWidth(len(sum), 2)
	label := func(get func(ModeSummary) Stat, ratio func(*Ratios) float64) func(ModeSummary) string {
		return func(m ModeSummary) string {
			s := fmt.Sprintf("%.2f", get(m).Median)
			if m.VsVXLAN != nil && ratio(m.VsVXLAN) != 0 {
				s += fmt.Sprintf("\n%.2fx", ratio(m.VsVXLAN))
			}
			return s
		}
	}
	one := func(m ModeSummary) Stat { return m.TCP1Gbit }
	many := func(m ModeSummary) Stat { return m.TCPNGbit }
	if err := barSeries(p, sum, -0.2, w, 0, "1 stream", one, label(one, func(r *Ratios) float64 { return r.TCP1 })); err != nil {
		return nil, err
	}
	if err := barSeries(p, sum, 0.2, w, 1, fmt.Sprintf("%d streams", cfg.Streams), many, label(many, func(r *Ratios) float64 { return r.TCPN })); err != nil {
		return nil, err
	}
	p.Legend.Top = true
	p.Legend.Left = true
	headroom(p, sum, func(m ModeSummary) float64 { return max(m.TCP1Gbit.Max, m.TCPNGbit.Max) })
	return p, nil
}

func rttPlot(sum []ModeSummary, path string) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = path + ": ping RTT (median; difference to kernel VXLAN)"
	p.Y.Label.Text = "microseconds"
	p.Y.Tick.Marker = wholeTicks{}
	modeTicks(p, sum)
	label := func(m ModeSummary) string {
		s := fmt.Sprintf("%.0f us", m.RTTMedianUs.Median)
		if m.VsVXLAN != nil && m.VsVXLAN.RTT != 0 {
			s += fmt.Sprintf("\n%+.0f us", m.VsVXLAN.RTTDiffUs)
		}
		return s
	}
	if err := barSeries(p, sum, 0, barWidth(len(sum), 1)/2, 2, "RTT", func(m ModeSummary) Stat { return m.RTTMedianUs }, label); err != nil {
		return nil, err
	}
	p.Legend = plot.NewLegend() // one series: no legend
	headroom(p, sum, func(m ModeSummary) float64 { return m.RTTMedianUs.Max })
	return p, nil
}

// cpuPlot draws the CPU seconds per GB of 1-stream runs: of everything on
// the path, and of the tulleds alone (Tulle modes).
func cpuPlot(cfg Config, sum []ModeSummary, path string) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = path + ": CPU seconds per GB, 1 stream"
	p.Y.Label.Text = "CPU s/GB"
	modeTicks(p, sum)
	w := barWidth(len(sum), 2)
	label := func(get func(ModeSummary) Stat) func(ModeSummary) string {
		return func(m ModeSummary) string { return fmt.Sprintf("%.2f", get(m).Median) }
	}
	all := func(m ModeSummary) Stat { return m.PathCPUPerGB1 }
	tulled := func(m ModeSummary) Stat { return m.CPUPerGB1 }
	if err := barSeries(p, sum, -0.2, w, 3, "all: iperf3, ksoftirqd, tulleds", all, label(all)); err != nil {
		return nil, err
	}
	if err := barSeries(p, sum, 0.2, w, 4, "tulleds", tulled, label(tulled)); err != nil {
		return nil, err
	}
	p.Legend.Top = true
	p.Legend.Left = true
	headroom(p, sum, func(m ModeSummary) float64 { return max(m.PathCPUPerGB1.Max, m.CPUPerGB1.Max) })
	return p, nil
}

// headroom leaves space above the highest whisker for the labels.
func headroom(p *plot.Plot, sum []ModeSummary, top func(ModeSummary) float64) {
	hi := 0.0
	for _, m := range sum {
		hi = max(hi, top(m))
	}
	if hi <= 0 {
		hi = 1
	}
	p.Y.Max = hi * 1.25
}

// wholeTicks are the default ticks labelled without decimals.
type wholeTicks struct{}

func (wholeTicks) Ticks(lo, hi float64) []plot.Tick {
	ts := plot.DefaultTicks{}.Ticks(lo, hi)
	for i := range ts {
		if ts[i].Label != "" {
			ts[i].Label = fmt.Sprintf("%.0f", ts[i].Value)
		}
	}
	return ts
}
