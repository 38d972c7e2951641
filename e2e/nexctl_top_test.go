package e2e

import (
	"strconv"
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
	// Over NATS the node reads the workload's cgroup too: CPU and memory against the
	// default limit, as locally (where this host has cgroups for it).
	if n.cgroup == "" {
		t.Log("no cgroup root on this host: CPU and memory not checked")
		return
	}
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, w.ID) {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 9 {
			t.Fatalf("top --node row %q", line)
		}
		if _, err := strconv.ParseFloat(f[4], 64); err != nil || !strings.Contains(line, "/ 512.0 MiB") {
			t.Errorf("top --node row lacks CPU or memory against the 512M default limit: %q", line)
		}
		return
	}
	t.Errorf("no row for %s:\n%s", w.ID, out)
}
