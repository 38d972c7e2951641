package native

import (
	"encoding/json"
	"log/slog"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestReplayOfHeldWorkloadHoldsNoPidfd: a replay of a workload the nexlet holds and
// runs (each registration's, after nexd's restart) sets its limits again through a
// sandbox made for it (limitAgain). Without cgroups that sandbox is a process group
// found from the pid record, which holds its leader's pidfd (procid.NewPgrp), and it
// was dropped without Close: one descriptor more per replay and held workload until
// a garbage collection, never with go_gc_percent < 0 (GOGC=off). Now it is let go.
func TestReplayOfHeldWorkloadHoldsNoPidfd(t *testing.T) {
	n := benchNexlet(t, 0)
	if n.iso.mode() != "none" {
		t.Skipf("isolation %s: the process group's sandbox is the none mode's", n.iso.mode())
	}
	run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "exec sleep 600"}}
	startServices(t, n, "replayfd", 1, run)
	id := "replayfd0"
	var pid int
	testkit.Eventually(t, "the workload runs", func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		if w := n.workloads[id]; w != nil && w.pid > 0 && w.state == protocol.WorkloadRunning {
			pid = w.pid
		}
		return pid > 0
	})
	// No collection meanwhile: a dropped *os.File's finalizer would close it.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	before := testkit.PidfdsOf(pid)
	const replays = 10
	req := startReq(protocol.LifecycleService, id, run, protocol.NatsConnectionData{NatsServers: []string{"nats://127.0.0.1:4222"}})
	for range replays {
		if _, err := n.StartWorkload(id, &req, true); err != nil {
			t.Fatal(err)
		}
	}
	if after := testkit.PidfdsOf(pid); after != before {
		t.Errorf("%d replays of a held running workload: the nexlet holds %d pidfds of its process, %d before", replays, after, before)
	}
}

// TestStopPastKillDeadlineHoldsNoPidfd: a workload's main process exits at its stop's
// SIGTERM, but a process it left in its group outlives the group's SIGKILL (frozen:
// in D state until thawed, as on a hung mount). The stop and its tidy each wait the
// kill's deadline (30 s, 1 s here: Nexlet.killWait) and go on; the group's Pgrp had
// opened its leader's pidfd at the leader's exit (its members noted before the reap),
// and nothing closed it once the group was not seen to end: the pidfd stayed open
// until a garbage collection, never with go_gc_percent < 0 (GOGC=off). Now the
// sandbox's removal lets go of it.
func TestStopPastKillDeadlineHoldsNoPidfd(t *testing.T) {
	n := benchNexlet(t, 0)
	if n.iso.mode() != "none" {
		t.Skipf("isolation %s: the process group's sandbox is the none mode's", n.iso.mode())
	}
	n.killWait = time.Second
	// No collection meanwhile: a dropped *os.File's finalizer would close it.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	before := testkit.Pidfds()
	id, member, thaw := frozenMemberWorkload(t, n, "frozen")
	start := time.Now()
	how, err := n.StopWorkloadReport(id, &protocol.StopWorkloadRequest{Namespace: testNS})
	t.Logf("stop: %q, %v, after %v", how, err, time.Since(start))
	testkit.Eventually(t, "the stop's tidy done", func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		_, tidying := n.tidying[id]
		return n.workloads[id] == nil && !tidying
	})
	if st, err := procid.ReadStat(member); err != nil || st.State != 'D' {
		t.Fatalf("the frozen member %d: %v, state %c; want it alive in D state past the kills", member, err, st.State)
	}
	// Thawed, it dies of its pending SIGKILL: the group ends, and nothing of the
	// nexlet's should still name it.
	thaw()
	testkit.Eventually(t, "the thawed member killed", func() bool { _, err := procid.ReadStat(member); return err != nil })
	var after int
	if !testkit.WaitFor(15*time.Second, func() bool { after = testkit.Pidfds(); return after <= before }) {
		t.Errorf("a stop whose group outlived its SIGKILL deadline: the nexlet holds %d pidfds after its tidy, %d before the workload", after, before)
	}
}

// frozenMemberWorkload starts a service whose main process exits at its stop's SIGTERM
// and leaves a member in its process group, then freezes that member (testkit.FreezeV1): the
// group outlives its SIGKILL until thawed. It returns the workload's id, the member and
// thaw.
func frozenMemberWorkload(t *testing.T, n *Nexlet, name string) (id string, member int, thaw func()) {
	t.Helper()
	run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "sleep 600 & exec sleep 600"}}
	startServices(t, n, name, 1, run)
	id = name + "0"
	var leader int
	testkit.Eventually(t, "the workload runs with a member in its group", func() bool {
		n.mu.Lock()
		if w := n.workloads[id]; w != nil && w.pid > 0 && w.state == protocol.WorkloadRunning {
			leader = w.pid
		}
		n.mu.Unlock()
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == leader || leader == 0 {
				continue
			}
			if st, err := procid.ReadStat(pid); err == nil && st.PGRP == leader {
				member = pid
			}
		}
		return member > 0
	})
	return id, member, testkit.FreezeV1(t, member)
}

// TestStopPastKillDeadlineWaitsOnce: a stopped workload's group outlives its SIGKILL (a
// frozen member, as TestStopPastKillDeadlineHoldsNoPidfd's). The stop's kill waited
// its deadline (Nexlet.killWait, 30 s by default), and then the stop's tidy, finding
// the group not emptied, killed and waited the whole deadline again: a minute in all.
// Each wait that ends with survivors logs how long it waited ("waited"), by the
// nexlet's own clock; the stop and its tidy now share one deadline, so what they
// waited together stays within one killWait (and a little for the last pass).
func TestStopPastKillDeadlineWaitsOnce(t *testing.T) {
	var logs testkit.Buffer
	n := benchNexletLog(t, 0, "", slog.New(slog.NewJSONHandler(&logs, nil)))
	if n.iso.mode() != "none" {
		t.Skipf("isolation %s: the process group's sandbox is the none mode's", n.iso.mode())
	}
	const killWait = 2 * time.Second
	n.killWait = killWait
	id, member, thaw := frozenMemberWorkload(t, n, "waitonce")
	how, err := n.StopWorkloadReport(id, &protocol.StopWorkloadRequest{Namespace: testNS})
	t.Logf("stop: %q, %v", how, err)
	testkit.Eventually(t, "the stop's tidy done", func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		_, tidying := n.tidying[id]
		return n.workloads[id] == nil && !tidying
	})
	if st, err := procid.ReadStat(member); err != nil || st.State != 'D' {
		t.Fatalf("the frozen member %d: %v, state %c; want it alive in D state past the kills", member, err, st.State)
	}
	thaw()
	var waits []time.Duration
	for line := range strings.SplitSeq(logs.String(), "\n") {
		var rec struct {
			Msg    string        `json:"msg"`
			ID     string        `json:"workload_id"`
			Waited time.Duration `json:"waited"`
		}
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "workload processes survive SIGKILL" && rec.ID == id {
			waits = append(waits, rec.Waited)
		}
	}
	var total time.Duration
	for _, w := range waits {
		total += w
	}
	t.Logf("kill waits that ended with survivors: %v, %v in all (killWait %v)", waits, total, killWait)
	if len(waits) == 0 {
		t.Fatalf("no kill wait logged its survivors:\n%s", logs.String())
	}
	if total > killWait*3/2 {
		t.Errorf("a stop whose group outlives SIGKILL and its tidy waited %v in all (%v), want one kill wait of %v", total, waits, killWait)
	}
}
