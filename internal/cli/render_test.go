package cli

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/protocol"
)

var update = flag.Bool("update", false, "rewrite golden files")

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("golden %s: %v (run with -update to create it)", path, err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("output differs from %s:\n--- got\n%s--- want\n%s", path, got, want)
	}
}

var now = time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)

func fixedNodes() []protocol.NodePingResponse {
	return []protocol.NodePingResponse{
		{NodeID: "NBBB", Version: "0.3.0", State: protocol.NodeRunning, AgentCount: 2, StartTime: now.Add(-(26*time.Hour + 3*time.Minute + 4*time.Second)),
			Tags: map[string]string{protocol.TagNexus: "west", protocol.TagNode: "beta", "region": "lab", "arch": "amd64"}},
		{NodeID: "NAAA", Version: "0.3.0", State: protocol.NodeLameduck, AgentCount: 1, StartTime: now.Add(-90 * time.Second),
			Tags: map[string]string{protocol.TagNexus: "west", protocol.TagNode: "alpha", protocol.TagLameduck: "true"}},
		{NodeID: "NCCC", Version: "v1.0.0-upstream", State: protocol.NodeRunning, AgentCount: 0, StartTime: now,
			Tags: map[string]string{protocol.TagNexus: "east"}},
	}
}

func TestRenderNodeList(t *testing.T) {
	var b bytes.Buffer
	if err := renderNodeList(&b, fixedNodes(), now); err != nil {
		t.Fatal(err)
	}
	golden(t, "node_list", b.Bytes())

	b.Reset()
	if err := renderNodeList(&b, nil, now); err != nil {
		t.Fatal(err)
	}
	if b.String() != "No nodes found\n" {
		t.Fatalf("empty list = %q", b.String())
	}
}

func fixedWorkloads() []protocol.WorkloadSummary {
	def, prod := "default", "prod"
	return []protocol.WorkloadSummary{
		{ID: "W2", Name: "web", Namespace: &prod, StartTime: "2026-11-27T11:00:00Z", Runtime: "1h0m0s", WorkloadType: "native",
			WorkloadLifecycle: "service", WorkloadState: protocol.WorkloadRunning, Tags: map[string]string{"tier": "front"}},
		{ID: "W1", Name: "report", Namespace: &def, StartTime: "2026-11-27T11:30:00Z", Runtime: "12ms", WorkloadType: "native",
			WorkloadLifecycle: "function", WorkloadState: protocol.WorkloadWarm, Metadata: map[string]string{"exit_code": "0"}, Tags: map[string]string{}},
		{ID: "W3", Name: "batch", StartTime: "2026-11-27T11:45:00Z", WorkloadType: "native",
			WorkloadLifecycle: "job", WorkloadState: protocol.WorkloadStopped, Tags: map[string]string{}},
	}
}

func TestRenderWorkloadList(t *testing.T) {
	tests := []struct {
		name, ns string
		meta     bool
	}{
		{"workload_list_system", protocol.SystemNamespace, false},
		{"workload_list_system_meta", protocol.SystemNamespace, true},
		{"workload_list_default", "default", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := renderWorkloadList(&b, tt.ns, fixedWorkloads(), tt.meta); err != nil {
				t.Fatal(err)
			}
			golden(t, tt.name, b.Bytes())
		})
	}
	var b bytes.Buffer
	if err := renderWorkloadList(&b, "default", nil, false); err != nil || b.String() != "No workloads found\n" {
		t.Fatalf("empty list = %q, %v", b.String(), err)
	}
}

func TestRenderNodeInfo(t *testing.T) {
	info := protocol.NodeInfoResponse{NodeID: "NAAA", Uptime: "1h2m3s", Version: "0.3.0", XKey: "XKEY",
		Tags: map[string]string{protocol.TagNexus: "west", protocol.TagNode: "alpha", "region": "lab"},
		NodeAgentSummaries: []protocol.NodeAgentSummary{
			{AgentID: "A2", AgentHealth: protocol.HealthDegraded, AgentLastHeartbeatTime: now,
				EndsUnheard:  &protocol.EndsUnheard{Since: now.Add(-90 * time.Second), Rounds: 18, Checks: "listed_twice,answers_extra"},
				AgentSummary: protocol.AgentSummary{Name: "wasm", Version: "0.1", Type: "wasm", StartTime: now.Add(-time.Hour), State: "running", SupportedLifecycles: "function", WorkloadCount: 0}},
			{AgentID: "A1", AgentHealth: protocol.HealthHealthy, AgentHealthStoplight: protocol.Stoplight(protocol.HealthHealthy), AgentLastHeartbeatTime: now, MaxWorkloads: 10,
				AgentSummary: protocol.AgentSummary{Name: "go_exec", Version: "0.3.0", Type: "native", StartTime: now.Add(-time.Hour), State: "running", SupportedLifecycles: "job,service", WorkloadCount: 3}},
			{AgentID: "A3", AgentHealth: protocol.HealthHealthy, AgentHealthStoplight: protocol.Stoplight(protocol.HealthHealthy), AgentLastHeartbeatTime: now, MaxWorkloads: 1,
				AgentSummary: protocol.AgentSummary{Name: "one_only", Version: "0.3.0", Type: "native", StartTime: now.Add(-time.Hour), State: "running", SupportedLifecycles: "job,service", WorkloadCount: 1}},
		}}
	for _, full := range []bool{false, true} {
		var b bytes.Buffer
		if err := renderNodeInfo(&b, info, full, now); err != nil {
			t.Fatal(err)
		}
		name := "node_info"
		if full {
			name += "_full"
		}
		golden(t, name, b.Bytes())
	}
	// A nexd node with tombstones: the row, the table (the oldest 2 of 3 it has).
	info.AuctionsNotBid = map[string]uint64{"tags": 4}
	info.Tombstones = []protocol.Tombstone{{ID: "W0", Type: "native", Since: now.Add(-time.Hour)},
		{ID: "W2", Type: "native", Namespace: "default", Since: now.Add(-3 * time.Minute)}}
	info.TombstoneCount = 3
	var b bytes.Buffer
	if err := renderNodeInfo(&b, info, false, now); err != nil {
		t.Fatal(err)
	}
	golden(t, "node_info_tombstones", b.Bytes())
}

func TestRenderLocal(t *testing.T) {
	hb := now.Add(-5 * time.Second)
	until := now.Add(2 * time.Minute)
	st := control.Status{NodeID: "NAAA", Name: "alpha", Nexus: "west", Version: "0.3.0", Commit: "abc123",
		Uptime: control.Duration(3 * time.Hour), State: control.StateLameduck, LameduckUntil: &until,
		NATS:           control.NATSStatus{Server: "nats://127.0.0.1:4222", RTT: control.Duration(1500 * time.Microsecond), Reconnects: 1, Connected: true},
		Cgroup:         control.CgroupStatus{Mode: "v1", Enforced: []string{"memory", "pids"}, Reason: "cgroup v2 not delegated"},
		Workloads:      map[string]int{"running": 2, "error": 1},
		AuctionsNotBid: map[string]uint64{"tags": 40, "draining": 2, "no_nexlet": 0},
		NexletDrops:    &control.NexletDrops{WorkloadRenewals: 3120, Reregistrations: 90},
		Tombstones: []control.Tombstone{{ID: "W2", Type: "native", Namespace: "default", Since: now.Add(-3 * time.Minute)},
			{ID: "W0", Type: "native", Since: now.Add(-time.Hour)}},
	}
	var b bytes.Buffer
	if err := renderStatus(&b, st, now); err != nil {
		t.Fatal(err)
	}
	if err := renderNexlets(&b, []control.Nexlet{{Name: "native", Type: "native", PID: 4242, State: "running", Restarts: 1, Health: "healthy",
		LastHeartbeat: &hb, LastExit: "exit status 1", MemoryBytes: 12 << 20, CPU: control.Duration(1500 * time.Millisecond)},
		{Name: "upstream", Type: "wasm", State: "remote", Health: "healthy", LastHeartbeat: &hb,
			EndsUnheard: &protocol.EndsUnheard{Since: now.Add(-2 * time.Minute), Rounds: 24, Checks: "answers_extra"}}}, now); err != nil {
		t.Fatal(err)
	}
	if err := renderLocalWorkloads(&b, []control.Workload{{ID: "W1", Name: "web", Namespace: "default", Type: "native", Lifecycle: "service",
		State: "running", StartTime: now.Add(-time.Minute), MemoryBytes: 2048, CPU: control.Duration(time.Second)}}, now); err != nil {
		t.Fatal(err)
	}
	golden(t, "local", b.Bytes())
}

// TestRenderStatusStarting: a node still waiting for NATS has no cgroup mode yet; its
// status says so (before, the row read ", no limits enforced").
func TestRenderStatusStarting(t *testing.T) {
	st := control.Status{NodeID: "NAAA", Name: "alpha", State: control.StateStarting,
		Detail: "degraded: waiting for NATS (8s); not bidding yet"}
	var b bytes.Buffer
	if err := renderStatus(&b, st, now); err != nil {
		t.Fatal(err)
	}
	if out := b.String(); !regexp.MustCompile(`│ Cgroups +│ not set up yet +│`).MatchString(out) || strings.Contains(out, ", no limits") {
		t.Fatalf("starting node's status:\n%s", out)
	}
}

func TestFriendlyDuration(t *testing.T) {
	tests := map[time.Duration]string{
		0:                       "0s",
		-time.Second:            "0s",
		1500 * time.Millisecond: "2s",
		61 * time.Second:        "1m 1s",
		26*time.Hour + 3*time.Minute + 4*time.Second: "1d 2h 3m 4s",
		48 * time.Hour: "2d",
	}
	for d, want := range tests {
		if got := friendlyDuration(d); got != want {
			t.Errorf("friendlyDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestRenderConfigTable(t *testing.T) {
	raw := []byte(`{"files": ["/etc/nex/config.json"], "settings": {
  "nexus": {"value": "east", "origin": "/etc/nex/config.json"},
  "tags": {"value": {"region": "lab"}, "origin": "flag --tags"},
  "nats.password": {"value": "[redacted]", "origin": "env NEX_NATS_PASSWORD"},
  "nats.servers": {"value": [], "origin": "default"},
  "state": {"value": "", "origin": "default"}},
  "warnings": ["/etc/nex/config.json: json: no effect in nexd"]}`)
	var b bytes.Buffer
	ok, err := renderConfig(&b, raw)
	if !ok || err != nil {
		t.Fatalf("renderConfig: %v %v", ok, err)
	}
	golden(t, "config_table", b.Bytes())
}

// TestEndedWorkloadHasNoUptime: a job that ended (or a workload in error) shows no
// uptime in nexctl workloads and top; before, its uptime grew from its start for ever
// (a job of `echo hi` read "14m 4s" fourteen minutes later).
func TestEndedWorkloadHasNoUptime(t *testing.T) {
	started := now.Add(-14 * time.Minute)
	var b bytes.Buffer
	if err := renderLocalWorkloads(&b, []control.Workload{
		{ID: "W1", Name: "job1", Namespace: "system", Type: "native", Lifecycle: "job", State: "stopped", StartTime: started},
		{ID: "W2", Name: "web", Namespace: "system", Type: "native", Lifecycle: "service", State: "running", StartTime: started},
	}, now); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	if !regexp.MustCompile(`│ W1 +│ job1 .*│ stopped │ -- +│`).MatchString(out) || !regexp.MustCompile(`│ W2 +│ web .*│ running │ 14m +│`).MatchString(out) {
		t.Errorf("nexctl workloads:\n%s", out)
	}
	rows := localTopRows(nil, []control.Workload{{ID: "W1", Name: "job1", State: "stopped", StartTime: started}}, 0, now)
	if len(rows) != 1 || rows[0].Uptime != 0 || uptimeText(rows[0]) != "-" {
		t.Errorf("top row of an ended job: %+v", rows)
	}
}
