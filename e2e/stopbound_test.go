package e2e

import (
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestStopPastItsBoundExits: a foreground nexd (no systemd) whose stop is still on a
// step at the stop's bound (here NATS black-holed, so the connection's drain waits; the
// bound cut to 3 s by NEXD_TEST_HOLD=stop-bound-short, 2×stop_grace+80 s otherwise)
// exits 1 at the bound, having logged the step and every goroutine's stack, and leaves
// the native nexlet and its workloads running: the next nexd (NATS back) adopts them
// (live_restore), none lost, none run again. Before, nothing bounded a foreground
// stop: a step stuck past its own bound held nexd for as long as it lasted.
func TestStopPastItsBoundExits(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	c := startNATSGoneCase(t, nodeOpts{extra: []string{"--live-restore", "--state", "kv"},
		env: []string{testhold.Env + "=" + testhold.StopBoundShort}})
	n := c.n
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}

	c.p.Blackhole()
	began := time.Now()
	n.signal(t, syscall.SIGTERM)
	code := n.wait(t, 60*time.Second)
	took := time.Since(began)
	out := n.out.String()
	m := regexp.MustCompile(`msg="stopping: past the stop's bound[^"]*" bound=(\S+) on=("[^"]*"|\S+) goroutines="goroutine \d+ \[`).FindStringSubmatch(out)
	t.Logf("SIGTERM with NATS gone: nexd exited %d after %v; past the bound: %q", code, took.Round(time.Millisecond), m)
	if code != 1 {
		t.Errorf("nexd exited %d, want 1 (its stop past its bound)", code)
	}
	// At the bound, 3.02 s here unloaded; the slack is for a loaded machine (the
	// goroutines' stacks logged, -race). Exit 0 after the NATS drain's own 10 s bound,
	// as before, fails on the exit code and the log line.
	if took < testhold.StopBoundShortBy || took > testhold.StopBoundShortBy+20*time.Second {
		t.Errorf("nexd exited %v after SIGTERM, want at its stop's bound, %v", took, testhold.StopBoundShortBy)
	}
	if m == nil {
		t.Fatalf("no log line naming the step the stop was on, with the goroutines' stacks:\n%s", out)
	}
	if strings.Contains(out, `msg="nexd stopped"`) {
		t.Error("the stop past its bound went on to its end")
	}
	if syscall.Kill(nexlet, 0) != nil {
		t.Error("the native nexlet did not outlive nexd's exit")
	}

	o := c.o
	o.env = nil
	_, lost, restarted := c.adoptAfterNATSBack(t, o)
	t.Logf("after the next nexd adopted them: %d of %d kept, %d lost, %d run again", len(c.ids)-lost-restarted, len(c.ids), lost, restarted)
	if lost+restarted > 0 {
		t.Errorf("%d lost, %d run again across the stop past its bound", lost, restarted)
	}
}

// TestStopPastItsBoundInDrainKeepsWorkloads: a foreground nexd without live_restore
// whose workload drain is still waiting at the stop's bound (one service ignores
// SIGTERM and has a 6 s grace; the bound cut to 3 s) exits 1 there, leaving the native
// nexlet to finish the stops it was asked for (each a stop at nexd's shutdown, whose
// workload stays in node state). The next nexd adopts the nexlet and starts both
// services again: none lost. Before the native nexlet stopped listing such stops as
// asked for (nexd_stopped) at its next registration, the next nexd removed both from its
// state instead.
func TestStopPastItsBoundInDrainKeepsWorkloads(t *testing.T) {
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
	quick := startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3)
	deaf := startDeafService(t, n, "deafdrain", "6s")
	loops := []crashLoop{quick, deaf}
	testkit.EventuallyWithin(t, 60*time.Second, "the services run", func() bool {
		return quick.runs() == 1 && len(quick.mains()) == 1 && deaf.runs() == 1 && len(deaf.mains()) == 1
	})
	waitTrapped(t, "the SIGTERM-deaf service", deaf.mains)

	began := time.Now()
	n.signal(t, syscall.SIGTERM)
	code := n.wait(t, 60*time.Second)
	took := time.Since(began)
	on := regexp.MustCompile(`msg="stopping: past the stop's bound[^"]*" bound=\S+ on=("[^"]*"|\S+) goroutines=`).FindStringSubmatch(n.out.String())
	t.Logf("SIGTERM with a SIGTERM-deaf service: nexd exited %d after %v; past the bound: %q", code, took.Round(time.Millisecond), on)
	if code != 1 || on == nil || on[1] != `"the workload drain"` {
		t.Fatalf("want exit 1 at the bound, stuck on the workload drain; got %d after %v, %q:\n%s", code, took, on, n.out.String())
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the nexlet finishes the stops", func() bool {
		return len(quick.mains()) == 0 && len(deaf.mains()) == 0
	})

	n = startNode(t, o)
	n.waitReady(t)
	lost := 0
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		lost = 0
		ws := n.workloads(t)
		for _, c := range loops {
			if len(c.mains()) != 1 || !slices.ContainsFunc(ws, func(w control.Workload) bool { return w.ID == c.id }) {
				lost++
			}
		}
		if lost == 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("after the next nexd: %d of %d services lost (runs %d and %d: started again)", lost, len(loops), quick.runs(), deaf.runs())
	if lost != 0 {
		t.Errorf("%d of %d services the stop kept in node state were lost", lost, len(loops))
	}
}
