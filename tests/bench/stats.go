package main

import (
	"math"
	"slices"
)

// Stat summarises repeated measurements of one figure.
type Stat struct {
	N      int     `json:"n"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

// Valid reports whether the figure was measured at least once.
func (s Stat) Valid() bool { return s.N > 0 }

// summarize returns the median, min and max of v (the zero Stat for none).
// NaN values (failed measurements) are left out.
func summarize(v []float64) Stat {
	xs := make([]float64, 0, len(v))
	for _, x := range v {
		if !math.IsNaN(x) {
			xs = append(xs, x)
		}
	}
	if len(xs) == 0 {
		return Stat{}
	}
	slices.Sort(xs)
	n := len(xs)
	med := xs[n/2]
	if n%2 == 0 {
		med = (xs[n/2-1] + xs[n/2]) / 2
	}
	return Stat{N: n, Median: med, Min: xs[0], Max: xs[n-1]}
}

// mean returns the arithmetic mean of v (NaN for none).
func mean(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	var s float64
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

// ratio returns a/b, or NaN when either is missing or b is zero.
func ratio(a, b Stat) float64 {
	if !a.Valid() || !b.Valid() || b.Median == 0 {
		return math.NaN()
	}
	return a.Median / b.Median
}
