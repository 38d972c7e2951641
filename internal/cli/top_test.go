package cli

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/protocol"
)

func TestTopPlainGolden(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	prev := []control.Workload{
		{ID: "W1", CPU: control.Duration(2 * time.Second)},
		{ID: "W2", CPU: control.Duration(time.Second)},
	}
	cur := []control.Workload{
		{ID: "W1", Name: "web", Namespace: "lab", State: "running", StartTime: now.Add(-90 * time.Minute),
			CPU: control.Duration(2*time.Second + 500*time.Millisecond), MemoryBytes: 64 << 20, MemoryMax: 256 << 20, Restarts: 2},
		{ID: "W2", Name: "batch-with-a-very-long-name", Namespace: "default", State: "running", StartTime: now.Add(-26 * time.Hour),
			CPU: control.Duration(1*time.Second + 100*time.Millisecond), MemoryBytes: 300 << 20},
		{ID: "W3", Name: "new", Namespace: "lab", State: "starting", StartTime: now.Add(-time.Second)},
	}
	rows := localTopRows(prev, cur, time.Second, now)
	var b bytes.Buffer
	for _, key := range []string{"cpu", "mem", "name", "restarts"} {
		if err := renderTop(&b, "lab-node (NABCDEF)", append([]topRow(nil), rows...), key, ""); err != nil {
			t.Fatal(err)
		}
	}
	remote := remoteTopRows(nil, []protocol.WorkloadSummary{{ID: "W9", Name: "far", WorkloadState: "running",
		StartTime: now.Add(-time.Hour).Format(time.RFC3339), Metadata: map[string]string{"restarts": "1"}}}, 0, now)
	if err := renderTop(&b, "node NREMOTE", remote, "cpu", ""); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), "\x1b") {
		t.Error("plain mode must not contain escape sequences")
	}
	golden(t, "top_plain", b.Bytes())
}

// TestTopNodePlainGolden: top --node's plain snapshot of a nexd node that adds its
// workloads' cgroup figures (CPU from two listings a second apart, memory against the
// limit), beside an upstream-like workload without them.
func TestTopNodePlainGolden(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	lab, def := "lab", "default"
	start := now.Add(-3 * time.Hour).Format(time.RFC3339)
	w := func(id, name string, ns *string, res *protocol.WorkloadResources) protocol.WorkloadSummary {
		return protocol.WorkloadSummary{ID: id, Name: name, Namespace: ns, WorkloadState: "running", StartTime: start,
			Metadata: map[string]string{"restarts": "0"}, Resources: res}
	}
	prev := []protocol.WorkloadSummary{
		w("W1", "api", &lab, &protocol.WorkloadResources{CPUUsageNsec: 4e9, MemoryBytes: 100 << 20, MemoryMax: 512 << 20}),
		w("W2", "worker", &def, &protocol.WorkloadResources{CPUUsageNsec: 9e9, MemoryBytes: 20 << 20}),
	}
	cur := []protocol.WorkloadSummary{
		w("W1", "api", &lab, &protocol.WorkloadResources{CPUUsageNsec: 4e9 + 250e6, MemoryBytes: 120 << 20, MemoryMax: 512 << 20}),
		w("W2", "worker", &def, &protocol.WorkloadResources{CPUUsageNsec: 9e9 + 1500e6, MemoryBytes: 24 << 20, OOMKills: 1}),
		w("W3", "fresh", &lab, &protocol.WorkloadResources{CPUUsageNsec: 1e6, MemoryBytes: 1 << 20, MemoryMax: 64 << 20}),
		w("W4", "elsewhere", &lab, nil), // a remote nexlet's: no cgroup here
	}
	var b bytes.Buffer
	for _, key := range []string{"cpu", "mem"} {
		if err := renderTop(&b, "node NREMOTE12345", remoteTopRows(prev, cur, time.Second, now), key, ""); err != nil {
			t.Fatal(err)
		}
	}
	// A partial listing says so under the title: the figures lack a nexlet's workloads.
	p := &partialList{node: "NREMOTE12345", PartialList: protocol.PartialList{NodeName: "lab", Wait: "2s", MissingCount: 1,
		Missing: []protocol.MissingNexlet{{ID: "AECHO", Name: "echo-a", Reason: "no answer within 2s"}}}}
	if err := renderTop(&b, "node NREMOTE12345", remoteTopRows(prev, cur, time.Second, now), "cpu", p.Error()); err != nil {
		t.Fatal(err)
	}
	golden(t, "top_node_plain", b.Bytes())
}
