package e2e

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestAnsweredStopStaysStoppedAcrossKills: a service with a restart policy is
// stopped, and the stop is answered; nexd and its native nexlet are both killed (-9)
// right after the answer, before either cleaned up (held there by NEXD_TEST_HOLD: nexd
// before it forgets the workload, the nexlet before it removes its record). The next
// nexd (same state) must not start the stopped service again: one run in all, none
// running, none listed. Before, the service was still in node state, the next nexd
// replayed it, and the nexlet's policy ran it a second time.
func TestAnsweredStopStaysStoppedAcrossKills(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	dir := t.TempDir()
	hold := testhold.Env + "=" + testhold.StopReplied + "," + testhold.StopTidy
	n := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, env: []string{hold}, extra: []string{"--state", "kv"}})
	n.waitReady(t)
	c := startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3)
	testkit.EventuallyWithin(t, 60*time.Second, "the service runs", func() bool { return c.runs() == 1 && len(c.mains()) == 1 })
	out, errOut, code := n.ctl(t, "workload", "stop", c.id)
	if code != 0 || !strings.Contains(out, "successfully stopped") {
		t.Fatalf("stop: exit %d: %s%s", code, out, errOut)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "nexd and the nexlet held after the answer", func() bool {
		log := n.out.String()
		return strings.Contains(log, "hold="+testhold.StopReplied) && strings.Contains(log, "hold="+testhold.StopTidy)
	})
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	n.signal(t, syscall.SIGKILL)
	n.wait(t, 30*time.Second)

	n2 := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	n2.waitReady(t) // once the replayed workloads run again
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if r := c.runs(); r != 1 {
			t.Fatalf("the stopped service ran again after the kills: %d runs, processes %v", r, c.mains())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if m := c.mains(); len(m) != 0 {
		t.Errorf("processes of the stopped service: %v", m)
	}
	if w, ok := c.listed(t, n2); ok {
		t.Errorf("the stopped service is listed again: %+v", w)
	}
}
