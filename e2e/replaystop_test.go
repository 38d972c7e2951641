package e2e

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestReplayAfterStopTidyStartsNothing: nexd is killed (-9) right after a no-wait
// stop's answer, while the service's stop runs its grace (it ignores SIGTERM); the next
// nexd adopts the native nexlet, which registers with the stop still under way, so the
// node's state still has the service and the registration's answer replays it. The
// nexlet takes that replay only once the stop ended and its tidy is over
// (testhold.ReplayAfterTidy: a loaded nexlet reaching it late). The stopped service is
// not run again, nor listed; the service not stopped runs on, once. Before, the replay
// found neither the workload nor its tidy and started the stopped service again.
func TestReplayAfterStopTidyStartsNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	o := nodeOpts{external: s.ClientURL(), stateDir: t.TempDir(), extra: []string{"--state", "kv"},
		env: []string{testhold.Env + "=" + testhold.ReplayAfterTidy}}
	n := startNode(t, o)
	n.waitReady(t)
	o.cgroup = n.cgroup
	c := startDeafService(t, n, "replaystop", "4s")
	keep := startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3)
	testkit.EventuallyWithin(t, 60*time.Second, "the services run", func() bool {
		return c.runs() == 1 && len(c.mains()) == 1 && keep.runs() == 1 && len(keep.mains()) == 1
	})
	waitTrapped(t, "the service to stop", c.mains)
	if !noWaitStop(t, nc, c.id, n.cmd.Process.Pid) {
		t.Fatal("the no-wait stop was not answered \"stopping\"")
	}
	n.wait(t, 30*time.Second)
	n = startNode(t, o)
	n.waitReady(t)
	// The hold says when the replay of the stopped service waits and when it goes on:
	// the adopted nexlet's log reaches this nexd.
	testkit.EventuallyWithin(t, 60*time.Second, "the replay of the stopped service held, then taken", func() bool {
		out := n.out.String()
		return strings.Contains(out, "test hold: the replay waits") && strings.Contains(out, "test hold: the replay goes on")
	})
	// A replay that starts it runs its first line within moments; a listing takes the
	// node's word after the stop's end was reported.
	time.Sleep(2 * time.Second)
	ws := n.workloads(t)
	ranOn, ranAgain, listed, lost := len(c.mains()), c.runs()-1, 0, 0
	if slices.ContainsFunc(ws, func(w control.Workload) bool { return w.ID == c.id }) {
		listed = 1
	}
	if keep.runs() != 1 || len(keep.mains()) != 1 || !slices.ContainsFunc(ws, func(w control.Workload) bool { return w.ID == keep.id }) {
		lost = 1
	}
	t.Logf("replay after the stop's tidy: the stopped service %d process(es) running, %d run(s) again, %d listed; %d of 1 not stopped lost (runs %d)",
		ranOn, ranAgain, listed, lost, keep.runs())
	if ranOn+ranAgain+listed+lost != 0 {
		t.Errorf("the replay undid the stop or lost the other service: %d running, %d run again, %d listed, %d lost", ranOn, ranAgain, listed, lost)
	}
}
