package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestListLargerThanMaxPayload: the native nexlet holds more workloads than one
// QUERYWORKLOADS answer can carry through the NATS server (max_payload 64 KB here, as
// 1 MB is for 2,000-3,000 workloads). The node's list must hold every one, whole, and
// the shutdown must stop every one. Before, the nexlet's one-message answer failed
// ("maximum payload exceeded"), the list lacked all of its workloads (partial), and at
// shutdown nexd stopped none: the nexlet was killed after its grace with its workloads'
// uid leases.
func TestListLargerThanMaxPayload(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	const maxPayload = 64 << 10
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.MaxPayload = maxPayload }})
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv"}})
	nodeID := n.waitReady(t).NodeID
	const count = 300
	marker := fmt.Sprintf("nexd-e2e-biglist-%d", time.Now().UnixNano())
	n.runWorkloads(t, count, func(i int) []string {
		return []string{"--bids", "1", "--name", fmt.Sprintf("big-list-service-%03d", i), "--", "/bin/sh", "-c", "sleep 600; :", marker}
	})
	testkit.EventuallyWithin(t, 60*time.Second, "every workload runs", func() bool { return len(markerPIDs(marker)) >= count })

	// The list through the control socket (the node's QUERYWORKLOADS fan-out): whole,
	// with every workload, within 30 s (a partial list under load is asked again).
	var (
		ws             []control.Workload
		out, errOut    string
		code           int
		deadline       = time.Now().Add(wholeListWait)
		partialAnswers int
	)
	for {
		out, errOut, code = n.ctl(t, "--json", "workloads")
		if code == 1 && strings.Contains(errOut, "the list is partial") && time.Now().Before(deadline) {
			partialAnswers++
			time.Sleep(200 * time.Millisecond)
			continue
		}
		break
	}
	if code != 0 {
		t.Errorf("nexctl --json workloads: exit %d after %d partial answers\nstderr: %s", code, partialAnswers, errOut)
	} else if err := json.Unmarshal([]byte(out), &ws); err != nil {
		t.Errorf("nexctl --json workloads: %v", err)
	} else if len(ws) != count {
		t.Errorf("the node lists %d workloads, want %d", len(ws), count)
	}
	if b, _ := json.Marshal(ws); code == 0 && len(b) <= maxPayload {
		t.Errorf("the list is %d bytes: not over the server's max_payload of %d, so this tests nothing", len(b), maxPayload)
	}

	// A client's list over NATS (WPING) is one message a node, as upstream has it: one
	// that does not fit is an error naming max_payload, and nexctl names the node and
	// its error and exits 1, never "No workloads found". Before caaa126 the client heard
	// nothing from the node: "No workloads found", exit 0, and no word why; before
	// 'nexctl workload list' took a node's error for a failure, it warned and still
	// said "No workloads found", exit 0.
	if out, errOut, code := n.ctl(t, "workload", "list"); code != 1 || strings.Contains(out, "No workloads found") ||
		!strings.Contains(errOut, "node "+nodeID+" did not list its workloads") || !strings.Contains(errOut, "max_payload") {
		t.Errorf("nexctl workload list over NATS: exit %d, want 1 naming node %s and max_payload\nstdout: %.200s\nstderr: %s", code, nodeID, out, errOut)
	}

	n.signal(t, syscall.SIGTERM)
	n.wait(t, 120*time.Second)
	if p := markerPIDs(marker); len(p) != 0 {
		t.Errorf("%d of %d workloads run on after the shutdown", len(p), count)
	}
	if log := n.out.String(); !strings.Contains(grepLines(log, `msg="workloads stopped at shutdown"`), fmt.Sprintf(" stopped=%d", count)) {
		t.Errorf("the shutdown did not report %d workloads stopped:\n%s", count, grepLines(log, "shutdown")+"\n"+grepLines(log, "payload"))
	}
}
