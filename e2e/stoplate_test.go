package e2e

import (
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestStopAnsweredByALateHolder: the node holding a workload answers its stop well
// after another node's "not found" (NEXD_TEST_HOLD=stop-late: 0.3 s, a loaded node, as
// in a fresh-clone CI run). `nexctl workload stop` and `nexctl node lameduck --migrate`
// wait for the holder they know from the listing or the clone's answer and report the
// stop it made. Before, both ended --gather-stall (25 ms) after the other node's "not
// found": `workload stop` said the workload was not stopped, and the migrate that
// `clone … started, but the original … was not stopped: workload not found`, exit 1,
// while the holder had stopped it.
func TestStopAnsweredByALateHolder(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	a := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv"},
		env: []string{testhold.Env + "=" + testhold.StopLate}})
	ida := a.waitReady(t).NodeID
	one := a.runWorkload(t, "--name", "one", "--", "/bin/sleep", "600")
	svc := a.runWorkload(t, "--name", "svc", "--", "/bin/sleep", "600")
	b := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv"}})
	b.waitReady(t)

	out, errOut, code := a.ctl(t, "workload", "stop", one.ID)
	if code != 0 || !strings.Contains(out, "Workload "+one.ID+" successfully stopped") {
		t.Fatalf("stop of a workload whose node answers late: exit %d, %q %q", code, out, errOut)
	}

	out, errOut, code = a.ctl(t, "node", "lameduck", ida, "--migrate", "--delay", "30s")
	if code != 0 || !strings.Contains(out, "Migrated svc ["+svc.ID+"]") || !strings.Contains(out, "old copy stopped: true") {
		t.Fatalf("lameduck --migrate off a node that answers its stop late: exit %d, %q %q", code, out, errOut)
	}
	if ws := a.workloads(t); len(ws) != 0 {
		t.Fatalf("the draining node still runs %+v", ws)
	}
	ws := b.workloads(t)
	if len(ws) != 1 || ws[0].Name != "svc" || ws[0].ID == svc.ID {
		t.Fatalf("node b after the migration: %+v", ws)
	}
}
