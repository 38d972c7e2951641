package native

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// replayOver waits until the runner's replay of id is over: the node's list no longer
// shows it as replaying (absent, or the nexlet's own row).
func replayOver(t *testing.T, fn *fakeNode, id string) {
	t.Helper()
	testkit.EventuallyWithin(t, waitLong, "the replay of "+id+" over", func() bool {
		s, ok := fn.summary(id)
		return !ok || s.Metadata["replaying"] != "true"
	})
}

// TestReplayAfterStopTidyStartsNothing: a replay that reaches the nexlet after the
// stop's tidy is over, of a service whose stop was under way when the nexlet
// registered (the node's state then still had it, and the answer replays it), starts
// nothing: a nexd killed right after a no-wait stop's answer, whose successor adopted
// the nexlet while the stop ran, and a loaded nexlet that took the replay late
// (testhold.ReplayAfterTidy holds the replay until the tidy is over). The service was
// stopped and deployed again under the same id before, so the registration also lists
// it among the stops it remembers: what counts is that this stop came after it.
// Before, the replay found neither the workload nor its tidy and started the stopped
// service again (c8bc89d closed the window while the tidy ran, not after it).
func TestReplayAfterStopTidyStartsNothing(t *testing.T) {
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{TestHold: testhold.ReplayAfterTidy})
	// It ignores SIGTERM: its stop lasts its 1 s grace, and the registration comes
	// while it is under way.
	req := startReq(protocol.LifecycleService, "svc", map[string]any{"uri": script(t, `trap '' TERM; echo up; while :; do sleep 0.05; done`),
		"stop_grace": "1s"}, fn.creds())
	fn.mustStart("svc", req)
	fn.waitLog("svc", "stdout", "up")
	if resp := fn.stop("svc", testNS); !resp.Stopped {
		t.Fatalf("first stop: %+v", resp)
	}
	fn.mustStart("svc", req) // the same id deployed again
	testkit.EventuallyWithin(t, waitLong, "svc runs again", func() bool { return len(fn.procsOf("svc")) > 0 })
	stopped := make(chan protocol.StopWorkloadResponse, 1)
	go func() { stopped <- fn.stop("svc", testNS) }()
	testkit.EventuallyWithin(t, waitLong, "the stop recorded", func() bool {
		tn.mu.Lock()
		defer tn.mu.Unlock()
		w := tn.workloads["svc"]
		return w != nil && w.stopMarked
	})
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"svc": req}
	fn.mu.Unlock()
	if err := tn.r.Reregister(); err != nil { // a new nexd adopted the nexlet
		t.Fatal(err)
	}
	if resp := <-stopped; !resp.Stopped {
		t.Fatalf("second stop: %+v", resp)
	}
	replayOver(t, fn, "svc")
	started, procs := fn.countEvents(protocol.EventWorkloadStarted, "svc"), fn.procsOf("svc")
	_, listed := fn.summary("svc")
	t.Logf("replay after the stop's tidy: %d WORKLOADSTARTED (2 deploys), %d process(es), listed %v", started, len(procs), listed)
	if started != 2 || len(procs) != 0 || listed {
		t.Errorf("the replay started the stopped service again: %d WORKLOADSTARTED, want 2; processes %v; listed %v", started, procs, listed)
	}
}

// TestReplayOfStopBeforeRegistrationStarts: a replay of a workload the nexlet stopped
// before it registered (it says so in the registration's Stopped list) starts it: the
// node removes such a record and replays it only when it holds a newer one, a deploy
// of the same id that its nexd recorded and died before it sent. The guard against
// stale replays (TestReplayAfterStopTidyStartsNothing) leaves it alone. A deploy of
// the same id after a stop runs, and a later replay adopts it.
func TestReplayOfStopBeforeRegistrationStarts(t *testing.T) {
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{TestHold: testhold.ReplayAfterTidy})
	req := startReq(protocol.LifecycleService, "svc", map[string]any{"uri": script(t, `echo up; exec sleep 1000`)}, fn.creds())
	fn.mustStart("svc", req)
	fn.waitLog("svc", "stdout", "up")
	if resp := fn.stop("svc", testNS); !resp.Stopped {
		t.Fatalf("stop: %+v", resp)
	}
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"svc": req}
	fn.mu.Unlock()
	if err := tn.r.Reregister(); err != nil {
		t.Fatal(err)
	}
	replayOver(t, fn, "svc")
	var procs []int
	testkit.EventuallyWithin(t, waitLong, "the replayed svc runs", func() bool { procs = fn.procsOf("svc"); return len(procs) > 0 })
	// Its WORKLOADSTARTED comes over the feed after the process shows: counted at
	// once, it was not in yet in a run under -race at load (1, want 2).
	testkit.EventuallyWithin(t, waitLong, "the replay's WORKLOADSTARTED", func() bool {
		return fn.countEvents(protocol.EventWorkloadStarted, "svc") >= 2
	})
	if n := fn.countEvents(protocol.EventWorkloadStarted, "svc"); n != 2 {
		t.Errorf("%d WORKLOADSTARTED, want 2 (the deploy, the replay)", n)
	}

	// Stopped again, deployed again under the same id, then replayed: it runs once.
	if resp := fn.stop("svc", testNS); !resp.Stopped {
		t.Fatalf("stop: %+v", resp)
	}
	fn.mustStart("svc", req)
	testkit.EventuallyWithin(t, waitLong, "svc deployed again runs", func() bool { procs = fn.procsOf("svc"); return len(procs) > 0 })
	if err := tn.r.Reregister(); err != nil {
		t.Fatal(err)
	}
	replayOver(t, fn, "svc")
	time.Sleep(100 * time.Millisecond) // a second copy would have begun by now
	after := fn.procsOf("svc")
	started := fn.countEvents(protocol.EventWorkloadStarted, "svc")
	t.Logf("deployed again after its stop and replayed: %d WORKLOADSTARTED (3 starts), processes %v then %v", started, procs, after)
	if started != 3 || len(after) != 1 || after[0] != procs[0] {
		t.Errorf("want the deploy after the stop adopted by the replay: 3 WORKLOADSTARTED, its one process %v kept; got %d, %v", procs, started, after)
	}
}

// TestKeptStopNotListedAsStopped: a stop at nexd's shutdown (nexd_keep), after which
// the same nexlet process registers again (nexd killed after its shutdown's stops and
// before it stopped its nexlets, or past its stop's bound: the next nexd adopts the
// nexlet), is not listed as a stop asked for (nexd_stopped), and the replay starts the
// workload again. Before, the nexlet remembered it as any stop and listed it, and the
// node removed from its state the workload it meant to keep.
func TestKeptStopNotListedAsStopped(t *testing.T) {
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{})
	req := startReq(protocol.LifecycleService, "kept", map[string]any{"uri": script(t, `echo up; exec sleep 1000`)}, fn.creds())
	fn.mustStart("kept", req)
	fn.waitLog("kept", "stdout", "up")
	r, err := fn.request(protocol.StopWorkloadSubject(testNode, "kept"), protocol.StopWorkloadRequest{Namespace: testNS, Keep: true}, waitLong)
	if err != nil || r.code != "" {
		t.Fatalf("stop at shutdown: %v %s %s", err, r.code, r.errText)
	}
	tn.waitTidied()
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"kept": req}
	fn.mu.Unlock()
	if err := tn.r.Reregister(); err != nil {
		t.Fatal(err)
	}
	fn.mu.Lock()
	stopped := fn.lastReg.Stopped
	fn.mu.Unlock()
	replayOver(t, fn, "kept")
	var procs []int
	testkit.EventuallyWithin(t, waitLong, "the kept service runs again", func() bool { procs = fn.procsOf("kept"); return len(procs) > 0 })
	t.Logf("registration after a stop at nexd's shutdown: nexd_stopped %v; the replay runs %v", stopped, procs)
	if slices.Contains(stopped, "kept") {
		t.Errorf("a stop at nexd's shutdown is listed as asked for (%v): the node drops the workload it keeps", stopped)
	}
}

// TestReplayDuringKeptStopStartsAgain: a replay that comes while a stop at nexd's
// shutdown (nexd_keep) is under way (that nexd died in its drain, and the next one
// adopted the nexlet) starts the workload again once that stop is over, and the stop's
// WORKLOADSTOPPED says it was kept (nexd_kept), so the node does not remove the
// workload from its state on the end report. Before, the replay took the stopping
// workload as held, and once its grace was over it ran nowhere.
func TestReplayDuringKeptStopStartsAgain(t *testing.T) {
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{})
	req := startReq(protocol.LifecycleService, "kept", map[string]any{"uri": script(t, `trap 'echo term' TERM; echo up; while :; do sleep 0.05; done`),
		"stop_grace": "1s"}, fn.creds())
	fn.mustStart("kept", req)
	fn.waitLog("kept", "stdout", "up")
	first := fn.procsOf("kept")
	stopped := make(chan error, 1)
	go func() {
		r, err := fn.request(protocol.StopWorkloadSubject(testNode, "kept"), protocol.StopWorkloadRequest{Namespace: testNS, Keep: true}, waitLong)
		if err == nil && r.code != "" {
			err = fmt.Errorf("%s %s", r.code, r.errText)
		}
		stopped <- err
	}()
	fn.waitLog("kept", "stdout", "term") // in its grace
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"kept": req}
	fn.mu.Unlock()
	if err := tn.r.Reregister(); err != nil { // a new nexd adopted the nexlet
		t.Fatal(err)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("stop at shutdown: %v", err)
	}
	var procs []int
	testkit.EventuallyWithin(t, waitLong, "the kept service runs again after its stop", func() bool {
		procs = fn.procsOf("kept")
		return len(procs) > 0 && !slices.ContainsFunc(procs, func(p int) bool { return slices.Contains(first, p) })
	})
	ev := fn.stoppedEvent("kept")
	t.Logf("replay during a stop at nexd's shutdown: processes %v, then %v; WORKLOADSTOPPED kept %v", first, procs, ev.Kept)
	if !ev.Kept {
		t.Errorf("the WORKLOADSTOPPED of a stop at nexd's shutdown does not say so: %+v", ev)
	}
}
