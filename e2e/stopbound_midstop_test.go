package e2e

import (
	"regexp"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestStopPastItsBoundAdoptedMidStop: as TestStopPastItsBoundInDrainKeepsWorkloads, but
// the next nexd starts at once, while the native nexlet still runs the SIGTERM-deaf
// service's stop at nexd's shutdown (its 8 s grace; a stop whose workload the node
// keeps in its state to start again). The next nexd adopts the nexlet while that stop
// is under way, and its replay of the service meets the service still held. Once the
// stop's grace is over the service must run again, listed, and stay in node state (the
// stop's end report must not remove it): not lost. Before, it ran nowhere and the next
// nexd removed it from its state on that report.
func TestStopPastItsBoundAdoptedMidStop(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	o := nodeOpts{external: s.ClientURL(), stateDir: t.TempDir(), extra: []string{"--state", "kv"},
		env: []string{testhold.Env + "=" + testhold.StopBoundShort}}
	n := startNode(t, o)
	n.waitReady(t)
	o.cgroup = n.cgroup
	deaf := startDeafService(t, n, "deafmid", "8s")
	testkit.EventuallyWithin(t, 60*time.Second, "the service runs", func() bool {
		return deaf.runs() == 1 && len(deaf.mains()) == 1
	})
	waitTrapped(t, "the SIGTERM-deaf service", deaf.mains)
	first := deaf.mains()[0]

	began := time.Now()
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 1 {
		t.Fatalf("nexd exited %d, want 1 (past its stop's bound)", code)
	}
	o.env = nil
	n = startNode(t, o)
	n.waitReady(t)
	if slices.Contains(deaf.mains(), first) {
		t.Logf("adopted while the stop at shutdown still ran (%v after SIGTERM)", time.Since(began).Round(time.Millisecond))
	} else {
		t.Logf("the stop at shutdown was over before the next nexd was ready (%v after SIGTERM): the case is not met", time.Since(began).Round(time.Millisecond))
	}
	// The grace ends 8 s after the SIGTERM reached it; then the service must run again.
	testkit.EventuallyWithin(t, 60*time.Second, "the first run gone", func() bool {
		return !slices.Contains(deaf.mains(), first)
	})
	running, listed := false, false
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		ws := n.workloads(t)
		running = len(deaf.mains()) == 1
		listed = slices.ContainsFunc(ws, func(w control.Workload) bool { return w.ID == deaf.id })
		if running && listed {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("after its stop at shutdown ended under the next nexd: running %v, listed %v, runs %d", running, listed, deaf.runs())
	removed := regexp.MustCompile(`msg="workload ended; removed from node state"[^\n]* workload_id=` + deaf.id).MatchString(n.out.String())
	if !running || !listed || removed {
		t.Errorf("the service kept in node state was lost: running %v, listed %v, removed from node state %v", running, listed, removed)
	}
}
