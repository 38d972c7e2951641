package daemon

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/protocol"
)

// metrics is the daemon's Prometheus registry, served on the control socket at
// /v1/metrics and optionally on --metrics-listen.
type metrics struct {
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
	srv            *http.Server
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
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

// register adds the collectors that read live daemon state at scrape time.
func (m *metrics) register(d *daemon) {
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "nexd_nats_reconnects_total", Help: "Reconnections of the node's NATS connection.",
	}, func() float64 {
		if d.conn == nil {
			return 0
		}
		return float64(d.conn.Info().Reconnects)
	}))
	m.reg.MustRegister(&workloadCollector{d: d, desc: prometheus.NewDesc("nexd_workloads_running",
		"Workloads this node runs, by namespace and type.", []string{"namespace", "type"}, nil)})
}

type workloadCollector struct {
	d    *daemon
	desc *prometheus.Desc
}

func (c *workloadCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *workloadCollector) Collect(ch chan<- prometheus.Metric) {
	if c.d.node == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	ws, err := c.d.node.Workloads(ctx)
	if err != nil {
		return
	}
	counts := map[[2]string]int{}
	for _, w := range ws {
		ns := ""
		if w.Namespace != nil {
			ns = *w.Namespace
		}
		counts[[2]string{ns, w.WorkloadType}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

func (m *metrics) nexletExit(name string, oom bool) {
	m.nexletRestarts.WithLabelValues(name).Inc()
	if oom {
		m.oomKills.WithLabelValues(name).Inc()
	}
}

// observer feeds the node's measurements into the metrics and revokes the credentials
// of workloads that ended.
type observer struct {
	m *metrics
	d *daemon
}

func (o observer) Auction(d time.Duration) { o.m.auctionLatency.Observe(d.Seconds()) }

func (o observer) Deploy(d time.Duration, ok bool) {
	o.m.deployLatency.Observe(d.Seconds())
	if ok {
		o.m.deploys.WithLabelValues("ok").Inc()
	} else {
		o.m.deploys.WithLabelValues("error").Inc()
	}
}

func (o observer) Stop(stopped bool) {
	if stopped {
		o.m.stops.WithLabelValues("stopped").Inc()
	} else {
		o.m.stops.WithLabelValues("not_found").Inc()
	}
}

// WorkloadEnded revokes what can be revoked; at least the minter forgets the workload.
func (o observer) WorkloadEnded(id string) {
	r, ok := o.d.minter.(interface {
		RevokeWorkload(context.Context, string) error
	})
	if !ok {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := r.RevokeWorkload(ctx, id); err != nil && !errors.Is(err, mint.ErrRevocationUnsupported) &&
			!errors.Is(err, mint.ErrUnknownWorkload) {
			o.d.log.Warn("could not revoke an ended workload's credentials", "workload_id", id, "err", err)
		}
	}()
}

// listen serves /metrics on addr (opt-in; examples use loopback).
func (m *metrics) listen(ctx context.Context, addr string, log *slog.Logger) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics_listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.handler())
	m.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := m.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics listener", "err", err)
		}
	}()
	log.Info("metrics listening", "addr", l.Addr().String())
	return nil
}

func (m *metrics) close() {
	if m.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		m.srv.Shutdown(ctx)
		cancel()
	}
}

// countingStore counts state store traffic and errors for the metrics.
type countingStore struct {
	node.Store
	m *metrics
}

func (s countingStore) Put(ctx context.Context, typ, id string, req protocol.StartWorkloadRequest) error {
	err := s.Store.Put(ctx, typ, id, req)
	if errors.Is(err, state.ErrValueTooLarge) && !errors.Is(err, node.ErrValueTooLarge) {
		// The node refuses such a deploy with a clear error instead of logging it.
		err = fmt.Errorf("%w: %w", node.ErrValueTooLarge, err)
	}
	if err != nil {
		s.m.kvErrors.Inc()
	} else {
		s.m.stored.Inc()
	}
	return err
}

func (s countingStore) Delete(ctx context.Context, typ, id string) error {
	err := s.Store.Delete(ctx, typ, id)
	if err != nil {
		s.m.kvErrors.Inc()
	} else {
		s.m.removed.Inc()
	}
	return err
}

func b64(s string) string {
	if s == "" {
		return ""
	}
	return base64.StdEncoding.EncodeToString([]byte(s))
}
