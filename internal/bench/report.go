// Package bench measures Nex nodes from the outside: it starts nexd processes and NATS
// servers on loopback, speaks only the $NEX protocol to them (plus the control socket
// for the control scenario), and reports latencies, rates and footprints.
package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"text/tabwriter"
	"time"
)

// Metric is one measured figure. Target, when set, is the goal in words and Met
// says whether the figure reached it.
type Metric struct {
	Name   string  `json:"name"`
	Value  float64 `json:"value"`
	Unit   string  `json:"unit"`
	Target string  `json:"target,omitempty"`
	Met    *bool   `json:"met,omitempty"`
}

// Result is what one scenario (or one variant of it) measured.
type Result struct {
	Scenario string   `json:"scenario"`
	Variant  string   `json:"variant,omitempty"`
	Metrics  []Metric `json:"metrics"`
	Notes    []string `json:"notes,omitempty"`
	Err      string   `json:"error,omitempty"`
}

// Report is the outcome of a run.
type Report struct {
	Started  time.Time `json:"started"`
	Duration string    `json:"duration"`
	Host     HostInfo  `json:"host"`
	Command  string    `json:"command"`
	Results  []Result  `json:"results"`
}

// HostInfo records the conditions a run happened under; other load skews every figure.
type HostInfo struct {
	CPUs        int     `json:"cpus"`
	Load1Before float64 `json:"load1_before"`
	Load1After  float64 `json:"load1_after"`
	NexdVersion string  `json:"nexd_version,omitempty"`
}

func (r *Result) add(name string, v float64, unit string) *Metric {
	r.Metrics = append(r.Metrics, Metric{Name: name, Value: v, Unit: unit})
	return &r.Metrics[len(r.Metrics)-1]
}

func (r *Result) ms(name string, d time.Duration) *Metric {
	return r.add(name, float64(d)/float64(time.Millisecond), "ms")
}

// addSummary adds count, p50, p90, p99 and max of a latency sample.
func (r *Result) addSummary(prefix string, s Summary) {
	r.ms(prefix+" p50", s.P50)
	r.ms(prefix+" p90", s.P90)
	r.ms(prefix+" p99", s.P99)
	r.ms(prefix+" max", s.Max)
}

func (r *Result) notef(format string, a ...any) { r.Notes = append(r.Notes, fmt.Sprintf(format, a...)) }

// atMost marks m against an upper-bound target.
func (m *Metric) atMost(limit float64, text string) {
	ok := m.Value <= limit
	m.Target, m.Met = text, &ok
}

// WriteJSON prints the report for machines.
func (rep *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

// WriteTable prints the report for people: one block per result.
func (rep *Report) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "nexbench  %s  (%d CPUs, load %.2f before, %.2f after, took %s)\n",
		rep.Started.UTC().Format(time.RFC3339), rep.Host.CPUs, rep.Host.Load1Before, rep.Host.Load1After, rep.Duration)
	if rep.Host.NexdVersion != "" {
		fmt.Fprintf(tw, "nexd: %s\n", rep.Host.NexdVersion)
	}
	fmt.Fprintf(tw, "command: %s\n", rep.Command)
	for _, r := range rep.Results {
		title := r.Scenario
		if r.Variant != "" {
			title += " / " + r.Variant
		}
		fmt.Fprintf(tw, "\n== %s\n", title)
		if r.Err != "" {
			fmt.Fprintf(tw, "  ERROR: %s\n", r.Err)
		}
		for _, m := range r.Metrics {
			verdict := ""
			if m.Met != nil {
				verdict = "MISSED " + m.Target
				if *m.Met {
					verdict = "ok " + m.Target
				}
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", m.Name, formatValue(m.Value), m.Unit, verdict)
		}
		for _, n := range r.Notes {
			fmt.Fprintf(tw, "  note: %s\n", n)
		}
	}
	return tw.Flush()
}

func formatValue(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case v == math.Trunc(v) && math.Abs(v) < 1e12:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.1f", v)
	case math.Abs(v) >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

// Summary is a latency sample's distribution.
type Summary struct {
	N                       int
	P50, P90, P99, Max, Avg time.Duration
}

// Summarize computes nearest-rank percentiles of ds (which it sorts).
func Summarize(ds []time.Duration) Summary {
	if len(ds) == 0 {
		return Summary{}
	}
	slices.Sort(ds)
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	pick := func(p float64) time.Duration {
		i := int(math.Ceil(p*float64(len(ds)))) - 1
		return ds[max(0, min(i, len(ds)-1))]
	}
	return Summary{N: len(ds), P50: pick(0.50), P90: pick(0.90), P99: pick(0.99), Max: ds[len(ds)-1], Avg: sum / time.Duration(len(ds))}
}

func (s Summary) String() string {
	return fmt.Sprintf("n=%d p50=%s p90=%s p99=%s max=%s", s.N, s.P50, s.P90, s.P99, s.Max)
}
