package metrics

import (
	"context"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/protocol"
)

// failingStore refuses every write.
type failingStore struct{ node.Store }

func (failingStore) Put(context.Context, string, string, protocol.StartWorkloadRequest) error {
	return errors.New("disk full")
}

// bounds are a node's counts of nexlets' calls dropped (NexletBounds), in its methods' order.
type bounds [4]uint64

func (b bounds) RenewalsDropped() uint64        { return b[0] }
func (b bounds) AgentRenewalsDropped() uint64   { return b[1] }
func (b bounds) ReregistrationsDropped() uint64 { return b[2] }
func (b bounds) ListAnswersRefused() uint64     { return b[3] }

// TestServedOverTCP feeds every kind of metric, scrapes the real listener on a free
// port, and checks that Close ends Serve.
func TestServedOverTCP(t *testing.T) {
	m := New()
	ns := "ns"
	m.WatchLive(Live{
		NATSReconnects: func() uint64 { return 7 },
		NATSConnected:  func() bool { return true },
		State:          func() string { return "running" },
		Nexlets: func(context.Context) ([]NexletHealth, error) {
			return []NexletHealth{{Name: "native", State: "running", Health: protocol.HealthHealthy},
				{Name: "upstream", State: "remote", Health: protocol.HealthHealthy, EndsUnheard: true}}, nil
		},
		Workloads: func(context.Context) ([]protocol.WorkloadSummary, error) {
			return []protocol.WorkloadSummary{{Namespace: &ns, WorkloadType: "native"}, {Namespace: &ns, WorkloadType: "native"}}, nil
		},
		AuctionDrops:     func() map[string]uint64 { return map[string]uint64{"flood": 12345} },
		AuctionsNotBid:   func() map[string]uint64 { return map[string]uint64{"tags": 3, "draining": 0} },
		ListChecksFailed: func() map[string]uint64 { return map[string]uint64{"answers_extra": 5} },
		Tombstones:       func() int { return 2 },
		ReplylessDropped: func() uint64 { return 1200 },
	})
	m.WatchNexletBounds(bounds{31, 29, 90, 15})
	m.Reload(true)
	m.Reload(false)
	m.NexletExit("native", true)
	o := Observer{M: m}
	o.Auction(time.Millisecond)
	o.Deploy(time.Second, true)
	o.Stop(node.StopNotFound)
	o.Stop(node.StopAlreadyStopped)
	st := m.CountStore(node.NewMemStore())
	if err := st.Put(context.Background(), "native", "W1", protocol.StartWorkloadRequest{Name: "w"}); err != nil {
		t.Fatal(err)
	}
	if err := st.Delete(context.Background(), "native", "W1"); err != nil {
		t.Fatal(err)
	}
	if err := m.CountStore(failingStore{node.NewMemStore()}).Put(context.Background(), "native", "W2", protocol.StartWorkloadRequest{}); err == nil {
		t.Fatal("the decorator swallowed the store's error")
	}

	l, err := m.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- l.Serve() }()
	resp, err := http.Get("http://" + l.Addr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`nexd_nats_reconnects_total 7`,
		`nexd_nats_connected 1`,
		`nexd_node_state{state="running"} 1`,
		`nexd_node_state{state="starting"} 0`,
		`nexd_workloads_running{namespace="ns",type="native"} 2`,
		`nexd_reloads_total{outcome="applied"} 1`,
		`nexd_reloads_total{outcome="rejected"} 1`,
		`nexd_nexlet_oom_kills_total{nexlet="native"} 1`,
		`nexd_deploys_total{outcome="ok"} 1`,
		`nexd_stops_total{outcome="not_found"} 1`,
		`nexd_stops_total{outcome="already_stopped"} 1`,
		`nexd_state_workloads_stored_total 1`,
		`nexd_state_workloads_removed_total 1`,
		`nexd_state_errors_total 1`,
		`nexd_auction_seconds_count 1`,
		`nexd_auctions_dropped_total{namespace="flood"} 12345`,
		`nexd_auctions_not_bid_total{reason="tags"} 3`,
		`nexd_auctions_not_bid_total{reason="draining"} 0`,
		`nexd_nexlet_list_checks_failed_total{check="answers_extra"} 5`,
		`nexd_state_tombstones 2`,
		`nexd_requests_replyless_dropped_total 1200`,
		`nexd_nexlet_workload_renewals_dropped_total 31`,
		`nexd_nexlet_user_renewals_dropped_total 29`,
		`nexd_nexlet_reregistrations_dropped_total 90`,
		`nexd_nexlet_list_answers_refused_total 15`,
		`nexd_nexlet_ends_unheard{nexlet="native"} 0`,
		`nexd_nexlet_ends_unheard{nexlet="upstream"} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve after Close: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Serve did not return after Close")
	}
}

// scrape parses what the handler serves with Prometheus's own text parser.
func scrape(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("Content-Type %q", ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(rec.Body.String()))
	if err != nil {
		t.Fatalf("the exposition does not parse: %v\n%s", err, rec.Body.String())
	}
	return fams
}

// TestExpositionParses: what nexd serves is the text format Prometheus reads, with
// cumulative histogram buckets, escaped label values, one family per name, and the
// Go runtime's and the process's series.
func TestExpositionParses(t *testing.T) {
	m := New()
	ns := "a \"quoted\" \\ name\nwith a newline"
	m.WatchLive(Live{
		NATSReconnects: func() uint64 { return 3 },
		NATSConnected:  func() bool { return false },
		State:          func() string { return "lameduck" },
		Workloads: func(context.Context) ([]protocol.WorkloadSummary, error) {
			return []protocol.WorkloadSummary{{Namespace: &ns, WorkloadType: "native", WorkloadState: protocol.WorkloadRunning}}, nil
		},
	})
	o := Observer{M: m}
	for _, d := range []time.Duration{50 * time.Microsecond, 100 * time.Microsecond, 3 * time.Millisecond, time.Hour} {
		o.Auction(d)
	}
	fams := scrape(t, m)
	h := fams["nexd_auction_seconds"].GetMetric()[0].GetHistogram()
	if h.GetSampleCount() != 4 || h.GetSampleSum() < 3600 {
		t.Errorf("auction histogram count %d sum %g, want 4 and over 3600", h.GetSampleCount(), h.GetSampleSum())
	}
	// le is inclusive: 50 µs and 100 µs in the first bucket (0.0001), 3 ms by 0.0032.
	for _, b := range h.GetBucket() {
		want := uint64(0)
		switch {
		case math.IsInf(b.GetUpperBound(), 1):
			want = 4
		case b.GetUpperBound() >= 0.0032:
			want = 3
		case b.GetUpperBound() >= 0.0001:
			want = 2
		}
		if b.GetCumulativeCount() != want {
			t.Errorf("bucket le=%g: %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), want)
		}
	}
	w := fams["nexd_workloads_running"].GetMetric()
	if len(w) != 1 || w[0].GetLabel()[0].GetValue() != ns || w[0].GetGauge().GetValue() != 1 {
		t.Errorf("nexd_workloads_running %v, want namespace %q = 1", w, ns)
	}
	if st := fams["nexd_node_state"].GetMetric(); len(st) != len(nodeStates) {
		t.Errorf("nexd_node_state has %d series, want %d", len(st), len(nodeStates))
	}
	if c := fams["nexd_nats_reconnects_total"]; c.GetType() != dto.MetricType_COUNTER || c.GetMetric()[0].GetCounter().GetValue() != 3 {
		t.Errorf("nexd_nats_reconnects_total: %v", c)
	}
	for _, name := range []string{"go_goroutines", "go_threads", "go_info", "go_memstats_heap_alloc_bytes", "go_memstats_sys_bytes",
		"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_max_fds", "process_start_time_seconds"} {
		f := fams[name]
		if f == nil || len(f.GetMetric()) == 0 {
			t.Errorf("%s missing", name)
			continue
		}
		if v := f.GetMetric()[0].GetGauge().GetValue() + f.GetMetric()[0].GetCounter().GetValue(); v <= 0 && name != "process_cpu_seconds_total" {
			t.Errorf("%s = %g, want > 0", name, v)
		}
	}
	start := fams["process_start_time_seconds"].GetMetric()[0].GetGauge().GetValue()
	if now := float64(time.Now().Unix()); start > now+1 || start < now-86400*365 {
		t.Errorf("process_start_time_seconds %g, now %g", start, now)
	}
}
