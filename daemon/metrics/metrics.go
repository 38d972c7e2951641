// Package metrics is nexd's Prometheus registry: the counters and histograms the daemon
// and its components feed, the collectors that read live state at scrape time, the
// optional TCP listener (--metrics-listen), a node.Observer for the node API's
// measurements and a node.Store decorator that counts state store traffic. The same
// registry is served on the control socket at /v1/metrics.
package metrics

import (
	"bytes"
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// Metrics is the daemon's registry and the metrics in it.
type Metrics struct {
	reg            *registry
	reloads        *counterVec
	nexletRestarts *counterVec
	oomKills       *counterVec
	sockRefused    *counter
	stored         *counter
	removed        *counter
	kvErrors       *counter
	deploys        *counterVec
	stops          *counterVec
	auctionLatency *histogram
	deployLatency  *histogram
}

// New builds the registry with the process and Go runtime metrics.
func New() *Metrics {
	r := newRegistry()
	m := &Metrics{reg: r,
		reloads:        r.newCounterVec("nexd_reloads_total", "Configuration reloads by outcome (applied, rejected).", "outcome"),
		nexletRestarts: r.newCounterVec("nexd_nexlet_exits_total", "Nexlet process exits (each followed by a restart unless the limit is reached).", "nexlet"),
		oomKills:       r.newCounterVec("nexd_nexlet_oom_kills_total", "Nexlet exits caused by the kernel OOM killer in the nexlet's cgroup.", "nexlet"),
		sockRefused:    r.newCounter("nexd_nexlet_socket_refused_total", "Connections refused on the adopted nexlets' socket: the peer was not a nexlet this nexd adopted."),
		stored:         r.newCounter("nexd_state_workloads_stored_total", "Workloads recorded in the state store after a successful deploy."),
		removed:        r.newCounter("nexd_state_workloads_removed_total", "Workloads removed from the state store (stopped, finished or given up)."),
		kvErrors:       r.newCounter("nexd_state_errors_total", "Failed state store operations."),
		deploys:        r.newCounterVec("nexd_deploys_total", "Deploy requests handled by this node, by outcome.", "outcome"),
		stops:          r.newCounterVec("nexd_stops_total", "Stop requests handled by this node, by outcome.", "outcome"),
		auctionLatency: r.newHistogram("nexd_auction_seconds", "Time to answer an auction request.", exponentialBuckets(0.0001, 2, 16)),
		deployLatency:  r.newHistogram("nexd_deploy_seconds", "Time from deploy request to the nexlet's reply.", exponentialBuckets(0.0005, 2, 16)),
	}
	r.watchRuntime()
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
	// AuctionDrops are the auctions the node dropped, by namespace (node.AuctionDrops).
	AuctionDrops func() map[string]uint64
	// AuctionsNotBid are the auctions the node did not bid on, by reason (node.NotBid).
	AuctionsNotBid func() map[string]uint64
	// ListChecksFailed are the failed checks of the list rounds for upstream-SDK
	// nexlets' ended workloads, by check (node.ListChecksFailed).
	ListChecksFailed func() map[string]uint64
	// Tombstones is how many stopped workloads' removals from node state are pending.
	Tombstones func() int
	// ReplylessDropped counts the requests the node dropped for having no reply
	// subject (node.ReplylessDropped).
	ReplylessDropped func() uint64
}

// NexletBounds are the node's counts of nexlets' calls it dropped or refused by its
// bounds on what one nexlet may cost it (*node.Node).
type NexletBounds interface {
	RenewalsDropped() uint64
	AgentRenewalsDropped() uint64
	ReregistrationsDropped() uint64
	ListAnswersRefused() uint64
}

// WatchNexletBounds registers the counters of b. Call it once, with the node built.
func (m *Metrics) WatchNexletBounds(b NexletBounds) {
	r := m.reg
	for _, c := range []struct {
		name, help string
		count      func() uint64
	}{
		{"nexd_nexlet_workload_renewals_dropped_total", "Renewals of workloads' NATS credentials dropped unanswered because a nexlet asked more than 100 a second (bursts of 1,000): a nexlet renews each workload once in 80 % of its credentials' lifetime, so any count is a nexlet gone wrong or rogue (an honest one whose renewal is dropped asks again within 30 s).", b.RenewalsDropped},
		{"nexd_nexlet_user_renewals_dropped_total", "Nexlets' renewals of their own NATS user dropped unanswered past their bound (10 at once, 8 over the user's lifetime): each served one mints a user and revokes the older ones, a rewrite of the account JWT, so any count is a nexlet gone wrong or rogue.", b.AgentRenewalsDropped},
		{"nexd_nexlet_reregistrations_dropped_total", "Registrations of a nexlet already registered with this node process dropped unanswered past the bound they share with its renewals of its own user: each served one mints a user for the nexlet and each workload handed back, so any count is a nexlet gone wrong or rogue.", b.ReregistrationsDropped},
		{"nexd_nexlet_list_answers_refused_total", "Nexlets' answers to workload lists refused because the node's memory for the answers of all lists under way was taken (list memory, 256 MiB by default; a nexlet's answers at most a quarter of it, its share; those to tenants' lists half of the share, the rest kept for the node's own lists): each such list came back partial, lacking that nexlet. A rogue nexlet answering lists with huge answers, or a flood of lists while a nexlet runs tens of thousands of workloads.", b.ListAnswersRefused},
	} {
		r.gaugeFunc(c.name, c.help, "counter", "", func() float64 { return float64(c.count()) })
	}
}

// NexletHealth is one nexlet as the health metrics see it.
type NexletHealth struct {
	Name, State, Health string
	// EndsUnheard: the node does not hear its workload ends (its list rounds are not whole).
	EndsUnheard bool
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
	r := m.reg
	r.gaugeFunc("nexd_nats_reconnects_total", "Reconnections of the node's NATS connection.", "counter", "",
		func() float64 { return float64(l.NATSReconnects()) })
	r.gaugeFunc("nexd_nats_connected", "1 while the node's NATS connection is up, 0 during an outage (the node keeps running).", "gauge", "",
		func() float64 { return b2f(l.NATSConnected()) })
	if l.JetStream != nil {
		for _, st := range jetStreamStates {
			r.gaugeFunc("nexd_jetstream_state", "1 for the state bucket's JetStream state (ok; degraded: replicas lost; unavailable: no quorum or no answer, e.g. this server cut off from its cluster), else 0; all 0 without a KV bucket.", "gauge",
				labels("state", st), func() float64 { return b2f(l.JetStream() == st) })
		}
	}
	if l.Leafs != nil {
		r.gaugeFunc("nexd_nats_leaf_remotes", "Leaf node remotes of the embedded NATS server (nats.leaf_remote); 0 without.", "gauge", "",
			func() float64 { n, _ := l.Leafs(); return float64(n) })
		r.gaugeFunc("nexd_nats_leaf_connected", "Leaf connections of the embedded NATS server up now: below nexd_nats_leaf_remotes, the site is cut off from its hub (its workloads still talk locally).", "gauge", "",
			func() float64 { _, c := l.Leafs(); return float64(c) })
	}
	if l.Workloads != nil {
		// One listing a scrape for both families (the node's answer is cached meanwhile).
		wl := &workloadCounts{list: l.Workloads, reg: r}
		r.add("nexd_workloads_running", "Workloads this node runs, by namespace and type.", "gauge", func(add func(sample)) {
			for k, n := range wl.get().running {
				add(sample{labels: labels("namespace", k[0], "type", k[1]), value: float64(n)})
			}
		})
		r.add("nexd_workloads", "Workloads this node holds, by state.", "gauge", func(add func(sample)) {
			for st, n := range wl.get().states {
				add(sample{labels: labels("state", st), value: float64(n)})
			}
		})
	}
	if l.State != nil {
		for _, st := range nodeStates {
			r.gaugeFunc("nexd_node_state", "1 for the node's current state (starting, running, lameduck, stopping), else 0.", "gauge",
				labels("state", st), func() float64 { return b2f(l.State() == st) })
		}
	}
	if l.AuctionDrops != nil {
		r.add("nexd_auctions_dropped_total", "Auctions the node dropped unanswered, by the namespace that sent more than the node answers (\"*\": namespaces past the first 256 that dropped; \"?\": dropped by the client library before the node saw their namespace; \"!\": refused because their subject names no valid namespace).", "counter", func(add func(sample)) {
			for ns, n := range l.AuctionDrops() {
				add(sample{labels: labels("namespace", ns), value: float64(n)})
			}
		})
	}
	if l.AuctionsNotBid != nil {
		r.add("nexd_auctions_not_bid_total", "Auctions the node did not bid on, by reason: draining (lame duck, stopping), tags (the auction's tags do not match the node's), no_nexlet (no healthy nexlet of the type), lifecycle (its nexlets of the type do not run it), max_workloads (they are full), credentials (a workload's NATS credentials in the auction's namespace would not fit nats-server's 4 KiB control line: a long nats.jsdomain), state_store (the state store cannot be written: JetStream cut off or full, or the local state or runtime directory full), bad_request, namespace (no valid namespace in the subject), too_large (body and headers over 64 KiB; in nexd_auctions_dropped_total too) and dropped (dropped unanswered: the node could not keep up; by namespace in nexd_auctions_dropped_total).", "counter", func(add func(sample)) {
			for reason, n := range l.AuctionsNotBid() {
				add(sample{labels: labels("reason", reason), value: float64(n)})
			}
		})
	}
	if l.Tombstones != nil {
		r.gaugeFunc("nexd_state_tombstones", "Stopped workloads whose removal from node state failed and is retried; a tombstone on local disk keeps each out of every replay meanwhile (nexctl status lists them).", "gauge", "",
			func() float64 { return float64(l.Tombstones()) })
	}
	if l.ReplylessDropped != nil {
		r.gaugeFunc("nexd_requests_replyless_dropped_total", "Requests to the node (any endpoint, auctions too) dropped unanswered and not carried out because they had no reply subject: no client sends one; anyone on the bus can (the log warns of them once a minute).", "counter", "",
			func() float64 { return float64(l.ReplylessDropped()) })
	}
	if l.ListChecksFailed != nil {
		r.add("nexd_nexlet_list_checks_failed_total", "Checks failed by the node's list rounds that hear upstream-SDK nexlets' workload ends (a round hears none unless all pass), by check: answers_missing, answers_extra (a nexlet answered in another's name), answer_failed, listed_twice, no_ping_answer, count_mismatch, ask_failed.", "counter", func(add func(sample)) {
			for check, n := range l.ListChecksFailed() {
				add(sample{labels: labels("check", check), value: float64(n)})
			}
		})
	}
	if l.Nexlets != nil {
		nl := func() []NexletHealth {
			ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
			defer cancel()
			ns, _ := l.Nexlets(ctx)
			return ns
		}
		r.add("nexd_nexlet_health", "1 for each nexlet's current health, else 0.", "gauge", func(add func(sample)) {
			for _, n := range nl() {
				for _, h := range nexletHealths {
					add(sample{labels: labels("nexlet", n.Name, "health", h), value: b2f(n.Health == h)})
				}
			}
		})
		r.add("nexd_nexlet_failed", "1 when a nexlet gave up after its restart limit.", "gauge", func(add func(sample)) {
			for _, n := range nl() {
				add(sample{labels: labels("nexlet", n.Name), value: b2f(n.State == "failed")})
			}
		})
		r.add("nexd_nexlet_ends_unheard", "1 while the node does not hear a nexlet's workload ends: a nexlet on upstream's SDK whose list rounds were not whole 3 times in a row (its jobs that end meanwhile run again at its next registration).", "gauge", func(add func(sample)) {
			for _, n := range nl() {
				add(sample{labels: labels("nexlet", n.Name), value: b2f(n.EndsUnheard)})
			}
		})
	}
}

// scrapeTimeout bounds a node query made for a scrape, which has no context of its own.
const scrapeTimeout = 3 * time.Second

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// workloadCounts lists the node's workloads once for both workload families of a
// scrape.
type workloadCounts struct {
	list func(context.Context) ([]protocol.WorkloadSummary, error)
	reg  *registry
	mu   sync.Mutex
	gen  uint64 // the scrape last counted
	last wlCounts
}

type wlCounts struct {
	running map[[2]string]int
	states  map[string]int
}

func (w *workloadCounts) get() wlCounts {
	w.mu.Lock()
	defer w.mu.Unlock()
	g := w.reg.scrape.Load()
	if g == w.gen {
		return w.last
	}
	w.gen = g
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	ws, err := w.list(ctx)
	if err != nil {
		w.last = wlCounts{}
		return w.last
	}
	c := wlCounts{running: map[[2]string]int{}, states: map[string]int{}}
	for _, wl := range ws {
		c.states[string(wl.WorkloadState)]++
		ns := ""
		if wl.Namespace != nil {
			ns = *wl.Namespace
		}
		c.running[[2]string{ns, wl.WorkloadType}]++
	}
	w.last = c
	return c
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		// Rendered first: a slow client must not hold up the next scrape.
		var b bytes.Buffer
		_ = m.reg.write(&b)
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		_, _ = w.Write(b.Bytes())
	})
}

// Reload counts one reload, applied or rejected.
func (m *Metrics) Reload(applied bool) {
	if applied {
		m.reloads.WithLabelValues("applied").Inc()
	} else {
		m.reloads.WithLabelValues("rejected").Inc()
	}
}

// NexletSocketRefused counts one connection refused on the adopted nexlets' socket.
func (m *Metrics) NexletSocketRefused() { m.sockRefused.Inc() }

// NexletExit counts one nexlet exit, and an OOM kill when it was one.
func (m *Metrics) NexletExit(name string, oom bool) {
	m.nexletRestarts.WithLabelValues(name).Inc()
	if oom {
		m.oomKills.WithLabelValues(name).Inc()
	}
}
