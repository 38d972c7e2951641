// Package metrics is nexd's Prometheus registry: the counters and histograms the daemon
// and its components feed, the collectors that read live state at scrape time, the
// optional TCP listener (--metrics-listen), a node.Observer for the node API's
// measurements and a node.Store decorator that counts state store traffic. The same
// registry is served on the control socket at /v1/metrics.
package metrics

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nexd-project/nexd/protocol"
)

// Metrics is the daemon's registry and the metrics in it.
type Metrics struct {
	reg            *prometheus.Registry
	reloads        *prometheus.CounterVec
	nexletRestarts *prometheus.CounterVec
	oomKills       *prometheus.CounterVec
	stored         prometheus.Counter
	removed        prometheus.Counter
	kvErrors       prometheus.Counter
	deploys        *prometheus.CounterVec
	stops          *prometheus.CounterVec
	auctionLatency prometheus.Histogram
	deployLatency  prometheus.Histogram
}

// New builds the registry with the process and Go runtime collectors.
func New() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nexd_reloads_total", Help: "Configuration reloads by outcome (applied, rejected).",
	}, []string{"outcome"})
	m.nexletRestarts = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nexd_nexlet_exits_total", Help: "Nexlet process exits (each followed by a restart unless the limit is reached).",
	}, []string{"nexlet"})
	m.oomKills = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nexd_nexlet_oom_kills_total", Help: "Nexlet exits caused by the kernel OOM killer in the nexlet's cgroup.",
	}, []string{"nexlet"})
	m.stored = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nexd_state_workloads_stored_total", Help: "Workloads recorded in the state store after a successful deploy.",
	})
	m.removed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nexd_state_workloads_removed_total", Help: "Workloads removed from the state store (stopped, finished or given up).",
	})
	m.kvErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "nexd_state_errors_total", Help: "Failed state store operations.",
	})
	m.deploys = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nexd_deploys_total", Help: "Deploy requests handled by this node, by outcome.",
	}, []string{"outcome"})
	m.stops = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nexd_stops_total", Help: "Stop requests handled by this node, by outcome.",
	}, []string{"outcome"})
	m.auctionLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "nexd_auction_seconds", Help: "Time to answer an auction request.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
	})
	m.deployLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "nexd_deploy_seconds", Help: "Time from deploy request to the nexlet's reply.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
	})
	m.reg.MustRegister(m.reloads, m.nexletRestarts, m.oomKills, m.stored, m.removed, m.kvErrors,
		m.deploys, m.stops, m.auctionLatency, m.deployLatency,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Live are the readers the scrape-time collectors call.
type Live struct {
	NATSReconnects func() uint64
	NATSConnected  func() bool
	// JetStream is the state bucket's JetStream state: "ok", "degraded",
	// "unavailable", or "" (not known, or no KV bucket).
	JetStream func() string
	// Leafs are the embedded server's leaf remotes and how many are connected.
	Leafs     func() (remotes, connected int)
	Workloads func(context.Context) ([]protocol.WorkloadSummary, error)
	// State is the node's state (starting, running, lameduck, stopping).
	State func() string
	// Nexlets are the node's nexlets with their process state and health.
	Nexlets func(context.Context) ([]NexletHealth, error)
}

// NexletHealth is one nexlet as the health metrics see it.
type NexletHealth struct {
	Name, State, Health string
}

// nodeStates and nexletHealths are every label value the state gauges report, so a
// dashboard sees 0 rather than no series.
var (
	nodeStates      = []string{"starting", "running", "lameduck", "stopping"}
	jetStreamStates = []string{"ok", "degraded", "unavailable"}
	nexletHealths   = []string{protocol.HealthHealthy, protocol.HealthDegraded, protocol.HealthShuttingDown, protocol.HealthOffline, protocol.HealthUnknown}
)

// WatchLive registers the collectors that read live daemon state at scrape time. Call
// it once, with components that are already built.
func (m *Metrics) WatchLive(l Live) {
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "nexd_nats_reconnects_total", Help: "Reconnections of the node's NATS connection.",
	}, func() float64 { return float64(l.NATSReconnects()) }))
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "nexd_nats_connected", Help: "1 while the node's NATS connection is up, 0 during an outage (the node keeps running).",
	}, func() float64 {
		if l.NATSConnected() {
			return 1
		}
		return 0
	}))
	if l.JetStream != nil {
		for _, st := range jetStreamStates {
			m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "nexd_jetstream_state", Help: "1 for the state bucket's JetStream state (ok; degraded: replicas lost; unavailable: no quorum or no answer, e.g. this server cut off from its cluster), else 0; all 0 without a KV bucket.",
				ConstLabels: prometheus.Labels{"state": st},
			}, func() float64 {
				if l.JetStream() == st {
					return 1
				}
				return 0
			}))
		}
	}
	if l.Leafs != nil {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "nexd_nats_leaf_remotes", Help: "Leaf node remotes of the embedded NATS server (nats.leaf_remote); 0 without.",
		}, func() float64 { r, _ := l.Leafs(); return float64(r) }))
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "nexd_nats_leaf_connected", Help: "Leaf connections of the embedded NATS server up now: below nexd_nats_leaf_remotes, the site is cut off from its hub (its workloads still talk locally).",
		}, func() float64 { _, c := l.Leafs(); return float64(c) }))
	}
	m.reg.MustRegister(&workloadCollector{list: l.Workloads, desc: prometheus.NewDesc("nexd_workloads_running",
		"Workloads this node runs, by namespace and type.", []string{"namespace", "type"}, nil),
		byState: prometheus.NewDesc("nexd_workloads", "Workloads this node holds, by state.", []string{"state"}, nil)})
	if l.State != nil {
		for _, st := range nodeStates {
			m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "nexd_node_state", Help: "1 for the node's current state (starting, running, lameduck, stopping), else 0.",
				ConstLabels: prometheus.Labels{"state": st},
			}, func() float64 {
				if l.State() == st {
					return 1
				}
				return 0
			}))
		}
	}
	if l.Nexlets != nil {
		m.reg.MustRegister(&nexletCollector{list: l.Nexlets,
			health: prometheus.NewDesc("nexd_nexlet_health", "1 for each nexlet's current health, else 0.", []string{"nexlet", "health"}, nil),
			failed: prometheus.NewDesc("nexd_nexlet_failed", "1 when a nexlet gave up after its restart limit.", []string{"nexlet"}, nil)})
	}
}

type nexletCollector struct {
	list           func(context.Context) ([]NexletHealth, error)
	health, failed *prometheus.Desc
}

func (c *nexletCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.health; ch <- c.failed }

func (c *nexletCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	ns, err := c.list(ctx)
	if err != nil {
		return
	}
	for _, n := range ns {
		for _, h := range nexletHealths {
			v := 0.0
			if n.Health == h {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(c.health, prometheus.GaugeValue, v, n.Name, h)
		}
		v := 0.0
		if n.State == "failed" {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(c.failed, prometheus.GaugeValue, v, n.Name)
	}
}

type workloadCollector struct {
	list          func(context.Context) ([]protocol.WorkloadSummary, error)
	desc, byState *prometheus.Desc
}

func (c *workloadCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc; ch <- c.byState }

func (c *workloadCollector) Collect(ch chan<- prometheus.Metric) {
	// A scrape has no context of its own; bound the node query.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	ws, err := c.list(ctx)
	if err != nil {
		return
	}
	counts := map[[2]string]int{}
	states := map[string]int{}
	for _, w := range ws {
		states[string(w.WorkloadState)]++
		ns := ""
		if w.Namespace != nil {
			ns = *w.Namespace
		}
		counts[[2]string{ns, w.WorkloadType}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
	for st, n := range states {
		ch <- prometheus.MustNewConstMetric(c.byState, prometheus.GaugeValue, float64(n), st)
	}
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Reload counts one reload, applied or rejected.
func (m *Metrics) Reload(applied bool) {
	if applied {
		m.reloads.WithLabelValues("applied").Inc()
	} else {
		m.reloads.WithLabelValues("rejected").Inc()
	}
}

// NexletExit counts one nexlet exit, and an OOM kill when it was one.
func (m *Metrics) NexletExit(name string, oom bool) {
	m.nexletRestarts.WithLabelValues(name).Inc()
	if oom {
		m.oomKills.WithLabelValues(name).Inc()
	}
}
