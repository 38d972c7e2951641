package e2e

import (
	"strings"
	"testing"
)

// TestNexctlTopPlain runs the real `nexctl top` without a terminal: one plain snapshot
// with the running workload's state and memory limit, locally and over NATS.
func TestNexctlTopPlain(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{})
	st := n.waitReady(t)
	w := n.runWorkload(t, "--name", "sleeper", "--", "/bin/sleep", "1000")
	out := n.mustCtl(t, "top", "--interval", "200ms", "--sort", "mem")
	if !strings.Contains(out, w.ID) || !strings.Contains(out, "sleeper") || !strings.Contains(out, "running") || strings.Contains(out, "\x1b") {
		t.Errorf("top (local):\n%q", out)
	}
	out = n.mustCtl(t, "top", "--node", st.Name, "--interval", "200ms")
	if !strings.Contains(out, w.ID) || !strings.Contains(out, "node "+st.NodeID[:12]) {
		t.Errorf("top --node:\n%s", out)
	}
}
