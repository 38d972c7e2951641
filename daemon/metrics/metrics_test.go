package metrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/protocol"
)

// failingStore refuses every write.
type failingStore struct{ node.Store }

func (failingStore) Put(context.Context, string, string, protocol.StartWorkloadRequest) error {
	return errors.New("disk full")
}

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
			return []NexletHealth{{Name: "native", State: "running", Health: protocol.HealthHealthy}}, nil
		},
		Workloads: func(context.Context) ([]protocol.WorkloadSummary, error) {
			return []protocol.WorkloadSummary{{Namespace: &ns, WorkloadType: "native"}, {Namespace: &ns, WorkloadType: "native"}}, nil
		},
	})
	m.Reload(true)
	m.Reload(false)
	m.NexletExit("native", true)
	o := Observer{M: m}
	o.Auction(time.Millisecond)
	o.Deploy(time.Second, true)
	o.Stop(false)
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
		`nexd_state_workloads_stored_total 1`,
		`nexd_state_workloads_removed_total 1`,
		`nexd_state_errors_total 1`,
		`nexd_auction_seconds_count 1`,
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
