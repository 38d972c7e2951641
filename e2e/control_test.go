package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestMetricsAndConcurrentStatus scrapes --metrics-listen and parses it, and keeps
// 100 clients calling status on the real socket while reloads run.
func TestMetricsAndConcurrentStatus(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	// Port 0: nexd binds a port of the kernel's choosing and logs the address.
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--metrics-listen", "127.0.0.1:0"}})
	n.waitReady(t)
	addr := n.logAttr(t, "metrics listening", "addr")

	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	families, err := parseMetrics(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("metrics do not parse: %v", err)
	}
	for _, name := range []string{"nexd_nats_reconnects_total", "nexd_auction_seconds", "nexd_deploy_seconds",
		"nexd_nexlet_workload_renewals_dropped_total", "nexd_nexlet_user_renewals_dropped_total",
		"nexd_nexlet_reregistrations_dropped_total", "nexd_nexlet_list_answers_refused_total",
		"go_goroutines", "process_resident_memory_bytes"} {
		if _, ok := families[name]; !ok {
			t.Errorf("metric %s missing", name)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	stop := make(chan struct{})
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := control.NewClient(n.socket)
			defer c.Close()
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				default:
				}
				st, err := c.Status(ctx)
				if err != nil {
					errs <- err
					return
				}
				if st.NodeID == "" || st.NexletDrops == nil {
					errs <- fmt.Errorf("empty status, or without the nexlets' calls dropped: %+v", st)
					return
				}
			}
		}()
	}
	rc := control.NewClient(n.socket)
	defer rc.Close()
	for i := 0; i < 5; i++ {
		res, err := rc.Reload(ctx)
		if err != nil || !res.OK {
			t.Fatalf("reload %d: %+v %v", i, res, err)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("status during reload: %v", err)
	}

	resp, err = http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	families, _ = parseMetrics(resp.Body)
	resp.Body.Close()
	applied := 0.0
	for _, m := range families["nexd_reloads_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "outcome" && l.GetValue() == "applied" {
				applied = m.GetCounter().GetValue()
			}
		}
	}
	if applied != 5 {
		t.Fatalf("nexd_reloads_total{outcome=applied} = %v, want 5", applied)
	}
}

func parseMetrics(r io.Reader) (map[string]*dto.MetricFamily, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(r)
}
