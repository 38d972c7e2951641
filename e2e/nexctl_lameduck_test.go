package e2e

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestNexctlLameduckWait drains real nodes with `nexctl node lameduck --wait`: exit 0
// when every workload stops on SIGTERM, exit 1 when one had to be killed at the end of
// its stop grace; the plain (non-terminal) progress says how many workloads are left.
func TestNexctlLameduckWait(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	for _, tc := range []struct {
		name    string
		command []string
		code    int
		killed  int
	}{
		{"stops on SIGTERM", []string{"/bin/sleep", "1000"}, 0, 0},
		{"ignores SIGTERM", []string{"/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done"}, 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			n := startNode(t, nodeOpts{extra: []string{"--events", "nats", "--stop-grace", "1s"}})
			st := n.waitReady(t)
			marker := fmt.Sprintf("nexd-e2e-lameduck-%d", time.Now().UnixNano())
			command := tc.command
			if tc.killed > 0 { // the shell's $0, to find it by
				command = append(slices.Clip(command), marker)
			}
			n.runWorkload(t, append([]string{"--name", "svc", "--"}, command...)...)
			if tc.killed > 0 {
				waitTrapped(t, "the workload", func() []int { return markerPIDs(marker) })
			}

			out, errOut, code := n.ctl(t, "node", "lameduck", st.NodeID[:10], "--delay", "1s", "--wait")
			if code != tc.code {
				t.Fatalf("lameduck --wait: exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out, errOut)
			}
			if !strings.Contains(out, "1 workload(s) left") || !strings.Contains(out, "drained") {
				t.Errorf("progress lacks the count or the end:\n%s", out)
			}
			if tc.code == 0 && !strings.Contains(out, "drained (the node reports its drain done)") {
				t.Errorf("the end is not the node's word:\n%s", out)
			}
			if tc.killed > 0 && !strings.Contains(errOut, "killed at the end of their stop grace") {
				t.Errorf("no kill reported: %s", errOut)
			}
			if code := n.wait(t, 60e9); code != 0 {
				t.Logf("nexd exit %d after lame duck", code)
			}
		})
	}
}

// TestNexctlLameduckWaitJSON: --wait --json prints one result with drained and killed,
// and the outcome the node told (here through its own embedded server, which stops with
// it: the word arrives before).
func TestNexctlLameduckWaitJSON(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{extra: []string{"--events", "nats", "--stop-grace", "1s"}})
	st := n.waitReady(t)
	out, errOut, code := n.ctl(t, "--json", "node", "lameduck", st.NodeID, "--delay", "500ms", "--wait")
	var res struct {
		NodeID  string `json:"node_id"`
		Success bool   `json:"success"`
		Drained bool   `json:"drained"`
		Killed  int    `json:"killed"`
		Outcome string `json:"outcome"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil || !res.Success || !res.Drained || res.NodeID != st.NodeID || res.Outcome != "drained" {
		t.Fatalf("exit %d, stdout %s, stderr %s", code, out, errOut)
	}
}

// TestNexctlLocalLameduckWait drains the local node through its control socket and
// follows it until nexd has stopped; a workload that ignores SIGTERM makes it exit 1.
func TestNexctlLocalLameduckWait(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{extra: []string{"--stop-grace", "1s"}})
	n.waitReady(t)
	marker := fmt.Sprintf("nexd-e2e-locallameduck-%d", time.Now().UnixNano())
	n.runWorkload(t, "--name", "stubborn", "--", "/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done", marker)
	waitTrapped(t, "the stubborn workload", func() []int { return markerPIDs(marker) })
	out, errOut, code := n.ctl(t, "lameduck", "--delay", "1s", "--wait")
	if code != 1 || !strings.Contains(out, "1 workload(s) left") || !strings.Contains(out, "drained") ||
		!strings.Contains(errOut, "killed at the end of their stop grace") {
		t.Fatalf("lameduck --wait: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
}
