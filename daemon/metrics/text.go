package metrics

import (
	"bufio"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// The registry writes the Prometheus text exposition format (version 0.0.4) itself.
// client_golang was most of what nexd linked for metrics, and every process of the
// binary paid for it at start: its package initialisation, protobuf's descriptors
// and their pages (about 2 MB of the idle nexd + native nexlet PSS, which share
// the binary; README, Performance).

// sample is one line of a family: its name suffix (histograms: _bucket, _sum,
// _count), its labels, already formatted ({a="b"} or empty), and its value.
type sample struct {
	suffix, labels string
	value          float64
}

// family is one metric name with its help, type and what produces its samples.
type family struct {
	name, help, typ string
	collect         []func(add func(sample))
}

// registry holds families by name; registering a name again adds a producer to it
// (a gauge per label value, say).
type registry struct {
	mu     sync.Mutex
	fams   map[string]*family
	write1 sync.Mutex    // one scrape at a time
	scrape atomic.Uint64 // counts scrapes: producers of several families list once per scrape
}

func newRegistry() *registry { return &registry{fams: map[string]*family{}} }

func (r *registry) add(name, help, typ string, collect func(add func(sample))) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f := r.fams[name]
	if f == nil {
		f = &family{name: name, help: help, typ: typ}
		r.fams[name] = f
	}
	f.collect = append(f.collect, collect)
}

// write writes every family with at least one sample, sorted by name and, within a
// family, by labels, as client_golang did.
func (r *registry) write(w io.Writer) error {
	r.write1.Lock()
	defer r.write1.Unlock()
	r.scrape.Add(1)
	r.mu.Lock()
	fams := make([]family, 0, len(r.fams))
	for _, f := range r.fams {
		fams = append(fams, family{name: f.name, help: f.help, typ: f.typ, collect: slices.Clone(f.collect)})
	}
	r.mu.Unlock()
	slices.SortFunc(fams, func(a, b family) int { return strings.Compare(a.name, b.name) })
	bw := bufio.NewWriter(w)
	var ss []sample
	for _, f := range fams {
		ss = ss[:0]
		for _, c := range f.collect {
			c(func(s sample) { ss = append(ss, s) })
		}
		if len(ss) == 0 {
			continue
		}
		if f.typ != "histogram" && f.typ != "summary" { // theirs are in the order written
			slices.SortStableFunc(ss, func(a, b sample) int { return strings.Compare(a.labels, b.labels) })
		}
		bw.WriteString("# HELP " + f.name + " " + escapeHelp(f.help) + "\n# TYPE " + f.name + " " + f.typ + "\n")
		for _, s := range ss {
			bw.WriteString(f.name + s.suffix + s.labels + " " + formatValue(s.value) + "\n")
		}
	}
	return bw.Flush()
}

// labels formats name/value pairs as {a="x",b="y"}.
func labels(kv ...string) string {
	if len(kv) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteByte('{')
	for i := 0; i+1 < len(kv); i += 2 {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(kv[i] + `="` + escapeLabel(kv[i+1]) + `"`)
	}
	b.WriteByte('}')
	return b.String()
}

// escapeLabel and escapeHelp escape as the text format asks (a label value also its
// quotes). Written out rather than package-level strings.Replacers, which the package's
// init would build in the native nexlet too (docs/performance-notes.md, Memory).
func escapeLabel(s string) string { return escape(s, true) }
func escapeHelp(s string) string  { return escape(s, false) }

func escape(s string, quote bool) string {
	if !strings.ContainsAny(s, "\\\n\"") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\':
			b.WriteString(`\\`)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '"' && quote:
			b.WriteString(`\"`)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

func formatValue(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// counter counts up from zero.
type counter struct{ n atomic.Uint64 }

func (c *counter) Inc() { c.n.Add(1) }

// newCounter registers a counter without labels.
func (r *registry) newCounter(name, help string) *counter {
	c := &counter{}
	r.add(name, help, "counter", func(add func(sample)) { add(sample{value: float64(c.n.Load())}) })
	return c
}

// counterVec is a counter per value of one label; a value shows once counted.
type counterVec struct {
	mu   sync.Mutex
	vals map[string]*counter
}

func (r *registry) newCounterVec(name, help, label string) *counterVec {
	v := &counterVec{vals: map[string]*counter{}}
	r.add(name, help, "counter", func(add func(sample)) {
		v.mu.Lock()
		defer v.mu.Unlock()
		for lv, c := range v.vals {
			add(sample{labels: labels(label, lv), value: float64(c.n.Load())})
		}
	})
	return v
}

// WithLabelValues is the counter for the label's value.
func (v *counterVec) WithLabelValues(value string) *counter {
	v.mu.Lock()
	defer v.mu.Unlock()
	c := v.vals[value]
	if c == nil {
		c = &counter{}
		v.vals[value] = c
	}
	return c
}

// histogram counts observations into buckets with upper bounds.
type histogram struct {
	bounds []float64
	mu     sync.Mutex
	counts []uint64 // per bucket, the last one +Inf
	sum    float64
	count  uint64
}

// exponentialBuckets is count bounds from start, each factor times the one before.
func exponentialBuckets(start, factor float64, count int) []float64 {
	b := make([]float64, count)
	for i := range b {
		b[i] = start
		start *= factor
	}
	return b
}

func (r *registry) newHistogram(name, help string, bounds []float64) *histogram {
	h := &histogram{bounds: bounds, counts: make([]uint64, len(bounds)+1)}
	r.add(name, help, "histogram", func(add func(sample)) {
		h.mu.Lock()
		defer h.mu.Unlock()
		var cum uint64
		for i, b := range h.bounds {
			cum += h.counts[i]
			add(sample{suffix: "_bucket", labels: labels("le", formatValue(b)), value: float64(cum)})
		}
		add(sample{suffix: "_bucket", labels: labels("le", "+Inf"), value: float64(h.count)})
		add(sample{suffix: "_sum", value: h.sum})
		add(sample{suffix: "_count", value: float64(h.count)})
	})
	return h
}

// Observe counts one observation.
func (h *histogram) Observe(v float64) {
	i, _ := slices.BinarySearch(h.bounds, v) // the first bound >= v: le is inclusive
	h.mu.Lock()
	h.counts[i]++
	h.sum += v
	h.count++
	h.mu.Unlock()
}

// gaugeFunc registers a gauge (or, with typ "counter", a counter) read at scrape time,
// with fixed labels.
func (r *registry) gaugeFunc(name, help, typ, lbls string, fn func() float64) {
	r.add(name, help, typ, func(add func(sample)) { add(sample{labels: lbls, value: fn()}) })
}
