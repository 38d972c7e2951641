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
		if err := renderTop(&b, "lab-node (NABCDEF)", append([]topRow(nil), rows...), key); err != nil {
			t.Fatal(err)
		}
	}
	remote := remoteTopRows([]protocol.WorkloadSummary{{ID: "W9", Name: "far", WorkloadState: "running",
		StartTime: now.Add(-time.Hour).Format(time.RFC3339), Metadata: map[string]string{"restarts": "1"}}}, now)
	if err := renderTop(&b, "node NREMOTE", remote, "cpu"); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), "\x1b") {
		t.Error("plain mode must not contain escape sequences")
	}
	golden(t, "top_plain", b.Bytes())
}
