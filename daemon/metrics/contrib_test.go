package metrics

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// TestContribUsesExportedMetrics: every metric the shipped Grafana dashboard and
// Prometheus alerts query is one nexd exports, so neither silently shows nothing.
func TestContribUsesExportedMetrics(t *testing.T) {
	m := New()
	ns := "lab"
	m.WatchLive(Live{
		NATSReconnects: func() uint64 { return 0 },
		NATSConnected:  func() bool { return true },
		JetStream:      func() string { return "ok" },
		Leafs:          func() (int, int) { return 1, 1 },
		Workloads: func(context.Context) ([]protocol.WorkloadSummary, error) {
			return []protocol.WorkloadSummary{{ID: "W1", Namespace: &ns, WorkloadType: "native", WorkloadState: protocol.WorkloadRunning}}, nil
		},
		State: func() string { return "running" },
		Nexlets: func(context.Context) ([]NexletHealth, error) {
			return []NexletHealth{{Name: "native", State: "running", Health: "healthy"}}, nil
		},
		ListChecksFailed: func() map[string]uint64 { return map[string]uint64{"answers_extra": 0} },
		AuctionsNotBid:   func() map[string]uint64 { return map[string]uint64{"tags": 0} },
		Tombstones:       func() int { return 0 },
		ReplylessDropped: func() uint64 { return 0 },
	})
	m.WatchNexletBounds(bounds{})
	// Labelled series exist once something happened.
	m.Reload(true)
	m.NexletExit("native", true)
	o := Observer{M: m}
	o.Deploy(time.Millisecond, true)
	o.Stop("stopped")
	o.Auction(time.Millisecond)

	exported := map[string]bool{}
	for name := range scrape(t, m) {
		exported[name] = true
	}
	metric := regexp.MustCompile(`\b(nexd|go|process)_[a-z_]+\b`)
	for _, file := range []string{"../../contrib/grafana/nexd.json", "../../contrib/prometheus/alerts.yml"} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		used := map[string]bool{}
		for _, name := range metric.FindAllString(string(b), -1) {
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				if base, ok := strings.CutSuffix(name, suf); ok && exported[base] {
					name = base
				}
			}
			used[name] = true
		}
		if len(used) < 5 {
			t.Errorf("%s uses only %d metrics; the pattern is broken", file, len(used))
		}
		var missing []string
		for name := range used {
			if !exported[name] {
				missing = append(missing, name)
			}
		}
		sort.Strings(missing)
		if len(missing) > 0 {
			t.Errorf("%s uses metrics nexd does not export: %v", filepath.Base(file), missing)
		}
	}
	for _, want := range []string{"nexd_node_state", "nexd_nexlet_health", "nexd_nexlet_failed", "nexd_workloads"} {
		if !exported[want] {
			t.Errorf("%s not exported", want)
		}
	}
}
