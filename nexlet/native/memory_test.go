package native

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestStartsMemoryOutlivesNexletUntilAKeptStop: the nexlet's memory of starts keeps its
// name across a crash of the nexlet (the records stay in its runtime directory, and the
// next nexlet holds the workloads it started), and a stop the node asked for keeps it (the
// stop is remembered); a stop at nexd's shutdown (nexd_keep), which removes the
// workload's record and remembers nothing, drops it at once, and the next nexlet names a
// new one. A new runtime directory (a reboot) has a new one. The node starts a stored job
// never confirmed and not held only under the name it was recorded with (daemon/node
// TestReconcileByStartMemory).
func TestStartsMemoryOutlivesNexletUntilAKeptStop(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	m1 := first.StartsMemory()
	if m1 == "" {
		t.Fatal("the nexlet names no memory of its starts")
	}
	for _, id := range []string{"asked", "kept"} {
		fn.mustStart(id, startReq(protocol.LifecycleService, id, map[string]any{"uri": script(t, `echo up; while :; do sleep 0.05; done`)}, fn.creds()))
		fn.waitLog(id, "stdout", "up")
	}
	if resp := fn.stop("asked", testNS); !resp.Stopped {
		t.Fatalf("stop: %+v", resp)
	}
	first.waitTidied()
	if got := first.StartsMemory(); got != m1 {
		t.Fatalf("a stop the node asked for changed the memory: %q, was %q", got, m1)
	}
	first.crash()

	second := fn.startNexlet(Config{RuntimeDir: runtime})
	if got := second.StartsMemory(); got != m1 {
		t.Fatalf("the next nexlet on the same records names memory %q, want %q", got, m1)
	}
	if held := second.HeldWorkloads(); !slices.Contains(held, "kept") {
		t.Fatalf("the next nexlet holds %v", held)
	}
	fn.mustStart("kept2", startReq(protocol.LifecycleService, "kept2", map[string]any{"uri": script(t, `echo up; while :; do sleep 0.05; done`)}, fn.creds()))
	fn.waitLog("kept2", "stdout", "up")
	r, err := fn.request(protocol.StopWorkloadSubject(testNode, "kept2"), protocol.StopWorkloadRequest{Namespace: testNS, Keep: true}, waitLong)
	if err != nil || r.code != "" {
		t.Fatalf("stop at shutdown: %v %s %s", err, r.code, r.errText)
	}
	second.waitTidied()
	if got := second.StartsMemory(); got != "" {
		t.Errorf("after a stop at shutdown removed a record, the nexlet still names memory %q", got)
	}
	second.crash()

	third := fn.startNexlet(Config{RuntimeDir: runtime})
	if got := third.StartsMemory(); got == "" || got == m1 {
		t.Errorf("the nexlet after a stop at shutdown names memory %q (was %q): want a new one", got, m1)
	}
	if other := fn.startNexlet(Config{}).StartsMemory(); other == "" || other == m1 || other == third.StartsMemory() {
		t.Errorf("a new runtime directory's memory %q: want a new one", other)
	}
}

// TestKeptStopOfAFinishedJobDropsTheMemory: a stop at nexd's shutdown (nexd_keep) of a
// job that had already ended removes its record and remembers no stop, as one of a
// running workload does, so it drops the memory of starts too. Before, the memory kept
// its name: the node's record of that job, never marked started (its mark cut by the
// shutdown), was taken at the next registration for a start that never reached the
// nexlet (not held, recorded under the memory it still names), and the job ran twice.
func TestKeptStopOfAFinishedJobDropsTheMemory(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime})
	m1 := first.StartsMemory()
	if m1 == "" {
		t.Fatal("the nexlet names no memory of its starts")
	}
	fn.mustStart("quick", startReq(protocol.LifecycleJob, "quick", map[string]any{"uri": script(t, `echo ran`)}, fn.creds()))
	fn.stoppedEvent("quick")
	if held := first.HeldWorkloads(); !slices.Contains(held, "quick") {
		t.Fatalf("the ended job is not held (kept for its retention): %v", held)
	}
	r, err := fn.request(protocol.StopWorkloadSubject(testNode, "quick"), protocol.StopWorkloadRequest{Namespace: testNS, Keep: true}, waitLong)
	if err != nil || r.code != "" {
		t.Fatalf("stop at shutdown: %v %s %s", err, r.code, r.errText)
	}
	if held := first.HeldWorkloads(); slices.Contains(held, "quick") {
		t.Fatalf("the kept stop of the ended job left it held: %v", held)
	}
	if got := first.StartsMemory(); got != "" {
		t.Errorf("after a stop at shutdown removed an ended job's record, the nexlet still names memory %q", got)
	}
	first.crash()
	if got := fn.startNexlet(Config{RuntimeDir: runtime}).StartsMemory(); got == "" || got == m1 {
		t.Errorf("the next nexlet names memory %q (was %q): want a new one", got, m1)
	}
}

// TestForgottenJobHeldUntilItsEndIsConfirmed: a finished job leaves the nexlet's table
// after its retention (finished-short: a second, not the hour), but its record, and so
// the job in HeldWorkloads, stays until a node confirmed its end out of node state
// (EndConfirmed, from the end report's answer): a node that kept its record unmarked
// would otherwise take the job for a start that never reached the nexlet and start it
// again (e2e TestForgottenJobNotRunAgain). A confirmed one goes whole. The memory's name
// stays. A next nexlet on the same records whose registration the node answers without
// the job (the node has no record of it) removes the record.
func TestForgottenJobHeldUntilItsEndIsConfirmed(t *testing.T) {
	fn := newFakeNode(t)
	runtime := t.TempDir()
	nx := fn.startNexlet(Config{RuntimeDir: runtime, TestHold: testhold.FinishedShort})
	m := nx.StartsMemory()
	ids := []string{"unconfirmed", "confirmed"}
	for _, id := range ids {
		fn.mustStart(id, startReq(protocol.LifecycleJob, id, map[string]any{"uri": script(t, `echo ran`)}, fn.creds()))
	}
	testkit.Eventually(t, "both jobs finished", func() bool {
		nx.mu.Lock()
		defer nx.mu.Unlock()
		for _, id := range ids {
			if w := nx.workloads[id]; w == nil || !w.finished {
				return false
			}
		}
		return true
	})
	nx.EndConfirmed("confirmed")
	testkit.Eventually(t, "both jobs out of the table", func() bool {
		_, _ = nx.Heartbeat() // prunes
		nx.mu.Lock()
		defer nx.mu.Unlock()
		return nx.workloads["unconfirmed"] == nil && nx.workloads["confirmed"] == nil
	})
	if held := nx.HeldWorkloads(); !slices.Contains(held, "unconfirmed") || slices.Contains(held, "confirmed") {
		t.Fatalf("held after the prune: %v; want the unconfirmed job only", held)
	}
	if got := nx.StartsMemory(); got != m {
		t.Fatalf("the prune changed the memory of starts: %q, was %q", got, m)
	}
	nx.crash()

	fn.startNexlet(Config{RuntimeDir: runtime}) // the node replays nothing
	testkit.Eventually(t, "the record the node did not replay removed", func() bool {
		_, err := os.Stat(filepath.Join(runtime, "procs", "unconfirmed"))
		return os.IsNotExist(err)
	})
}
