package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestFailedNexlet: a local nexlet that keeps crashing is restarted with backoff, then
// marked failed in nexctl status, node info and STATUS; `nexctl nexlet restart`
// starts it again.
func TestFailedNexlet(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	ns := newNotifySocket(t)
	s := testnats.Start(t, testnats.Options{})
	dir := t.TempDir()
	crasher := filepath.Join(dir, "crasher")
	testkit.WriteFile(t, crasher, "#!/bin/sh\necho starting >&2\nsleep 0.05\nexit 3\n")
	os.Chmod(crasher, 0o755)
	n := startNode(t, nodeOpts{external: s.ClientURL(), notify: ns,
		extra: []string{"--agents.uri", "file://" + crasher, "--agent-restart-limit", "2", "--startup-timeout", "2s"}})
	ready := ns.waitFor(t, "READY=1", 90*time.Second)
	if !strings.Contains(ready, "not registered: crasher") {
		t.Fatalf("READY status should name the nexlet that did not register: %q", ready)
	}
	st := n.waitReady(t)

	var crash control.Nexlet
	testkit.EventuallyWithin(t, 60*time.Second, "crasher failed", func() bool {
		var cur control.Status
		json.Unmarshal([]byte(n.mustCtl(t, "status", "--json")), &cur)
		for _, x := range cur.Nexlets {
			if x.Name == "crasher" {
				crash = x
			}
		}
		return crash.State == "failed"
	})
	if crash.Restarts != 2 || !strings.Contains(crash.LastExit, "exit status 3") {
		t.Fatalf("failed nexlet %+v, want 2 restarts and exit status 3", crash)
	}
	ns.waitFor(t, "(1 failed)", 30*time.Second)

	var info protocol.NodeInfoResponse
	json.Unmarshal([]byte(n.mustCtl(t, "node", "info", st.NodeID, "--json")), &info)
	found := false
	for _, a := range info.NodeAgentSummaries {
		if a.AgentSummary.Name == "crasher" {
			found = true
			if a.AgentHealth != protocol.HealthOffline || !strings.HasPrefix(a.LastExit, "failed:") {
				t.Fatalf("node info for the failed nexlet: %+v", a)
			}
		}
	}
	if !found {
		t.Fatalf("node info does not list the failed nexlet: %+v", info.NodeAgentSummaries)
	}

	starts := func() int {
		return strings.Count(n.mustCtl(t, "logs", "--nexlet", "crasher", "-n", "1000"), "nexlet started")
	}
	before := starts()
	n.mustCtl(t, "nexlet", "restart", "crasher")
	// It crashes again, so it is started anew and given up again after its restarts.
	testkit.EventuallyWithin(t, 30*time.Second, "crasher started again", func() bool { return starts() > before })
	// The native nexlet was never affected.
	if out := n.mustCtl(t, "nexlets"); !strings.Contains(out, "healthy") {
		t.Fatalf("native nexlet not healthy:\n%s", out)
	}
}
