package e2e

import (
	"os"
	"path/filepath"
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
// service's stop at nexd's shutdown (a stop whose workload the node keeps in its state
// to start again). The next nexd adopts the nexlet while that stop is under way, and
// its replay of the service meets the service still held. Once the stop is over the
// service must run again, listed, and stay in node state (the stop's end report must
// not remove it): not lost. Before, it ran nowhere and the next nexd removed it from
// its state on that report.
//
// The stop is kept under way until the replay met it: the nexlet holds the kill at
// the end of the stop's grace until the test releases it (NEXD_TEST_HOLD
// stop-grace-held), which it does once the nexlet says a replay found the stop under
// way. A round whose replay came only after the hold's bound (30 s) let the stop end
// proves nothing (the next nexd so slow to start); it is tried again with the next
// nexd, at most midStopRounds times, then the test fails. Before, the stop's grace
// was a fixed 8 s, and a next nexd slower than 5 s to replay let the test pass
// without meeting the case.
func TestStopPastItsBoundAdoptedMidStop(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	release := t.TempDir()
	o := nodeOpts{external: s.ClientURL(), stateDir: t.TempDir(), extra: []string{"--state", "kv"},
		env: []string{testhold.Env + "=" + testhold.StopBoundShort + "," + testhold.StopGraceHeld + "," + testhold.ReleaseIn(release)}}
	n := startNode(t, o)
	n.waitReady(t)
	o.cgroup = n.cgroup
	deaf := startDeafService(t, n, "deafmid", "2s")
	for round := 1; ; round++ {
		if round > midStopRounds {
			t.Fatalf("in none of %d rounds did the next nexd's replay meet the stop at shutdown under way", midStopRounds)
		}
		var met bool
		if n, met = adoptMidStop(t, n, o, deaf, release, round); met {
			break
		}
	}
	// The stop at the last nexd's shutdown (the test's cleanup) need not wait.
	if err := testhold.Release(release, testhold.StopGraceHeld); err != nil {
		t.Fatal(err)
	}
}

// midStopRounds bounds TestStopPastItsBoundAdoptedMidStop's rounds.
const midStopRounds = 3

// adoptMidStop is a round of TestStopPastItsBoundAdoptedMidStop: n, running deaf, is
// stopped past its bound and the next nexd (returned) started at once; the stop at
// shutdown is released once the next nexd's replay met it (met), and the service
// must run again, listed and kept in node state.
func adoptMidStop(t *testing.T, n *node, o nodeOpts, deaf crashLoop, release string, round int) (next *node, met bool) {
	t.Helper()
	testkit.EventuallyWithin(t, 60*time.Second, "the service runs", func() bool { return len(deaf.mains()) == 1 })
	waitTrapped(t, "the SIGTERM-deaf service", deaf.mains)
	first := deaf.mains()[0]
	// A release a last round's hold did not take (its bound passed) is not this one's.
	if err := os.Remove(filepath.Join(release, testhold.StopGraceHeld)); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}

	began := time.Now()
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 1 {
		t.Fatalf("round %d: nexd exited %d, want 1 (past its stop's bound)", round, code)
	}
	n = startNode(t, o)
	n.waitReady(t)
	meets := regexp.MustCompile(`msg="test hold: a replay met the workload's stop under way"[^\n]*\bworkload_id=` + deaf.id + `\b`)
	testkit.EventuallyWithin(t, 60*time.Second, "the replay meeting the stop, or the stop's end", func() bool {
		met = meets.MatchString(n.out.String())
		return met || !slices.Contains(deaf.mains(), first)
	})
	if met {
		t.Logf("round %d: the next nexd's replay met the stop at shutdown under way (%v after SIGTERM); released", round, time.Since(began).Round(time.Millisecond))
		if err := testhold.Release(release, testhold.StopGraceHeld); err != nil {
			t.Fatal(err)
		}
	} else {
		t.Logf("round %d: the stop at shutdown ended before the next nexd's replay met it (%v after SIGTERM): not proved", round, time.Since(began).Round(time.Millisecond))
	}
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
	t.Logf("round %d: after its stop at shutdown ended under the next nexd: running %v, listed %v, runs %d", round, running, listed, deaf.runs())
	removed := regexp.MustCompile(`msg="workload ended; removed from node state"[^\n]* workload_id=` + deaf.id).MatchString(n.out.String())
	if !running || !listed || removed {
		t.Fatalf("round %d: the service kept in node state was lost: running %v, listed %v, removed from node state %v", round, running, listed, removed)
	}
	return n, met
}
